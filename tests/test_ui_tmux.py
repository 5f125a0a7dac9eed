"""The app in a real terminal: scripts/tmux_smoke.sh starts it under tmux, types, and checks the screen."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "tmux_smoke.sh"


@pytest.mark.slow  # tmux and a subprocess
@pytest.mark.skipif(shutil.which("tmux") is None, reason="tmux is not installed")
def test_tmux_smoke(tmp_path):
    env = {**os.environ, "PARLEY_PYTHON": sys.executable, "TMPDIR": str(tmp_path)}
    result = subprocess.run(["bash", str(SCRIPT)], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, f"stdout:\n{result.stdout}\nstderr:\n{result.stderr}"
    assert "tmux_smoke: ok" in result.stdout
