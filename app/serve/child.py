"""A live `parley serve` in a child process on a free loopback port: for the tests and `parley bench serve`.

Standard library only (urllib), so `parley bench serve` needs nothing beyond Parley's own dependencies.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LiveServer:
    """`python -m app --model DIR serve` on 127.0.0.1; `stop()` is a graceful ctrl+c (caches saved)."""

    def __init__(self, model_dir: Path | str | None, home: Path, api_key: str | None = None,
                 global_args: list[str] | None = None):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = home.parent / f"serve-{self.port}.log"
        home.mkdir(parents=True, exist_ok=True)
        args = [sys.executable, "-m", "app", *(["--model", str(model_dir)] if model_dir else []), *(global_args or []),
                "serve", "--port", str(self.port), *(["--api-key", api_key] if api_key else [])]
        env = {**os.environ, "PARLEY_HOME": str(home)}
        self._log_file = open(self.log, "wb")
        self.proc = subprocess.Popen(args, env=env, stdout=self._log_file, stderr=subprocess.STDOUT)

    def wait_ready(self, timeout: float = 120.0) -> "LiveServer":
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"parley serve exited with {self.proc.returncode}:\n{self.log.read_text()}")
            try:
                with urllib.request.urlopen(f"{self.url}/health", timeout=2) as r:
                    if r.status == 200:
                        return self
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.05)
        raise TimeoutError(f"parley serve did not answer /health within {timeout} s:\n{self.log.read_text()}")

    def health(self) -> dict:
        with urllib.request.urlopen(f"{self.url}/health", timeout=10) as r:
            return json.loads(r.read())

    def stop(self, timeout: float = 60.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self._log_file.close()
        return self.proc.returncode

    def __enter__(self) -> "LiveServer":
        return self.wait_ready()

    def __exit__(self, *exc) -> None:
        self.stop()
