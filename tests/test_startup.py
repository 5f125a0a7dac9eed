"""`parley chat` start-up: only what the command needs is imported; what an earlier start made is reused
only while the model it was made from is unchanged."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# Packages a one-turn `parley chat` has no use for (UI, server, plots, GGUF reader, HF tokenizers/downloads).
NOT_NEEDED = {"textual", "starlette", "uvicorn", "matplotlib", "gguf", "transformers", "openai", "httpx",
              "click"}  # sqlite-utils' CLI-only dependency (app.catalog.light_sqlite_utils)


def run_python(code: str, home: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PARLEY_HOME": str(home)}
    return subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)


def test_chat_imports_no_ui_server_or_transformers(tiny_model_dir, parley_home):
    code = f"""
import json, sys
from app.cli import main
rc = main(["--model", {str(tiny_model_dir)!r}, "chat", "assistant", "hi", "--new", "--max-tokens", "2", "--json"])
print(json.dumps({{"rc": rc, "loaded": sorted({{m.split(".")[0] for m in sys.modules}}),
                  "commands": sorted(m for m in sys.modules if m.startswith("app.cli."))}}))
"""
    done = run_python(code, parley_home)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.strip().splitlines()
    assert json.loads(lines[0])["generated_tokens"] >= 1  # the chat's own JSON: the turn really ran
    result = json.loads(lines[-1])
    assert result["rc"] == 0
    assert "mlx_lm" in result["loaded"] and "jinja2" in result["loaded"]  # what it does need
    assert not NOT_NEEDED & set(result["loaded"]), NOT_NEEDED & set(result["loaded"])
    assert result["commands"] == ["app.cli.chat"]  # no other command's module


def test_mlx_lm_without_its_init_still_offers_its_whole_api(parley_home):
    """The deferred package: submodules import cheaply, the package's own names and tokenizer still work."""
    code = """
import json, sys
from app.model import light_mlx_lm
light_mlx_lm.install()
import mlx_lm.utils
from mlx_lm.models import llama
cheap = "transformers" not in sys.modules
from mlx_lm import load, generate  # names the real __init__ defines: it runs now
import mlx_lm.tokenizer_utils as tu
print(json.dumps({"cheap": cheap, "load": load is mlx_lm.utils.load, "generate": callable(generate),
                  "wrapper": tu.TokenizerWrapper.__module__, "version": mlx_lm.__version__}))
"""
    done = run_python(code, parley_home)
    assert done.returncode == 0, done.stderr
    got = json.loads(done.stdout.strip().splitlines()[-1])
    assert got["cheap"] and got["load"] and got["generate"]
    assert got["wrapper"] == "mlx_lm.tokenizer_utils" and got["version"]


def test_chat_exit_code_and_output_survive_the_prompt_exit(tiny_model_dir, parley_home):
    """`python -m app chat` ends with os._exit: the JSON must still be flushed, the reply saved, the code kept."""
    base = [sys.executable, "-m", "app", "--model", str(tiny_model_dir), "chat", "assistant"]
    env = {**os.environ, "PARLEY_HOME": str(parley_home)}
    first = subprocess.run([*base, "hi", "--new", "--max-tokens", "2", "--json"], cwd=REPO, env=env,
                           capture_output=True, text=True, timeout=600)
    assert first.returncode == 0, first.stderr
    one = json.loads(first.stdout)
    second = subprocess.run([*base, "again", "--max-tokens", "2", "--json"], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=600)
    two = json.loads(second.stdout)
    assert two["conversation"] == one["conversation"] and two["cache"] == "disk"  # saved before the exit
    assert two["ttft_ms"] >= two["queued_ms"] >= 0
    bad = subprocess.run([*base, "   ", "--json"], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert bad.returncode != 0 and "empty" in bad.stderr


@pytest.fixture
def embedded_from(monkeypatch):
    """Point the embedded model at a GGUF of the test's choosing."""
    from app.model import loader

    def use(path: Path) -> None:
        monkeypatch.setattr(loader, "embedded_gguf", lambda: path)

    return use


@pytest.fixture(scope="module")
def gguf_copy(tmp_path_factory):
    """A private copy of the embedded GGUF (the tests change it), and a way to flip one byte of its weights."""
    import shutil

    from app.model.loader import embedded_gguf

    return Path(shutil.copy(embedded_gguf(), tmp_path_factory.mktemp("gguf") / "embedded.gguf"))


def flip_last_byte(path: Path) -> None:
    """Same size, other content (the file ends in tensor data), newer modification time."""
    before = path.stat().st_mtime_ns
    with path.open("r+b") as fh:
        fh.seek(-1, os.SEEK_END)
        last = fh.read(1)
        fh.seek(-1, os.SEEK_END)
        fh.write(bytes([last[0] ^ 0x01]))
    os.utime(path, ns=(before + 1_000_000, before + 1_000_000))


def test_embedded_conversion_is_reused_then_redone_when_the_gguf_changes(gguf_copy, parley_home, embedded_from):
    from app.model.loader import model_fingerprint, resolve_model_folder

    embedded_from(gguf_copy)
    folder = resolve_model_folder(None)
    made = (folder / "model.safetensors").stat().st_mtime_ns
    first = model_fingerprint(folder)
    assert resolve_model_folder(None) == folder
    assert (folder / "model.safetensors").stat().st_mtime_ns == made  # unchanged file: not converted again

    flip_last_byte(gguf_copy)  # the package was upgraded: same path and size, other weights
    assert resolve_model_folder(None) == folder
    assert (folder / "model.safetensors").stat().st_mtime_ns != made
    assert model_fingerprint(folder) != first  # caches keyed on the old model are not served


def test_a_damaged_or_foreign_stamp_means_convert_again(gguf_copy, tmp_path, parley_home, embedded_from):
    import shutil

    from app.model.gguf_convert import SOURCE_FILE, is_converted_from
    from app.model.loader import resolve_model_folder

    embedded_from(gguf_copy)
    folder = resolve_model_folder(None)
    other = Path(shutil.copy(gguf_copy, tmp_path / "other.gguf"))
    assert is_converted_from(folder, gguf_copy) and not is_converted_from(folder, other)
    (folder / SOURCE_FILE).write_text("{not json")
    assert not is_converted_from(folder, gguf_copy)
    resolve_model_folder(None)
    assert is_converted_from(folder, gguf_copy)


def test_fingerprint_memo_follows_a_rewritten_weight_file(tiny_model_dir, tmp_path, parley_home):
    """The memo skips hashing only while every file's size and mtime are as when it was hashed."""
    import shutil

    from app.model.loader import model_fingerprint

    folder = Path(shutil.copytree(tiny_model_dir, tmp_path / "copy"))
    first = model_fingerprint(folder)
    weights = folder / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0x01  # same size, other content (the last byte of a tensor)
    weights.write_bytes(bytes(data))
    os.utime(weights, ns=(weights.stat().st_atime_ns, weights.stat().st_mtime_ns + 1_000_000))
    assert model_fingerprint(folder) != first


@pytest.mark.parametrize("argv", [
    ["chat", "assistant", "hi", "--new", "--json"],
    ["--model", "chat", "--budget-mb=64", "chat", "assistant", "hi"],  # a model named like a command
    ["--kv-scheme", "q8", "import", "card.json"],
    ["personas"], ["models"], ["models", "add", "x.gguf"], ["bench", "serve", "--clients", "1", "4"], ["cache", "gc"],
])
def test_the_named_command_alone_parses_as_the_whole_command_line(argv):
    from app.cli import build_parser, command_named

    only = command_named(argv)
    assert only is not None
    assert vars(build_parser(only).parse_args(argv)) == vars(build_parser().parse_args(argv))


@pytest.mark.parametrize("argv", [[], ["--help", "chat"], ["--model", "m"], ["import_card", "x"], ["nonsense"]])
def test_help_no_command_or_an_unknown_word_builds_every_command(argv):
    from app.cli import command_named

    assert command_named(argv) is None


def test_numpys_own_blas_starts_with_one_thread_and_mlxs_keeps_its_threads(parley_home):
    """numpy's bundled OpenBLAS would spin a worker per core at import; the BLAS MLX uses keeps its threads."""
    code = """
import ctypes, json, os
from app import fastblas
fastblas.preload()
import numpy as np
def threads(path, names):
    if not path:
        return None
    lib = ctypes.CDLL(path)
    for name in names:
        if hasattr(lib, name):
            return getattr(lib, name)()
q, r = np.linalg.qr(np.random.default_rng(1234).standard_normal((80, 80)))  # numpy's one LAPACK use still works
mapped = {line.split()[-1] for line in open("/proc/self/maps") if "numpy.libs" in line and "openblas" in line}
print(json.dumps({"numpy": threads(mapped.pop() if len(mapped) == 1 else None, ["scipy_openblas_get_num_threads64_", "openblas_get_num_threads64_",
                                                         "openblas_get_num_threads"]),
                  "system": threads(fastblas.loaded, ["openblas_get_num_threads"]), "cores": os.cpu_count(),
                  "env": os.environ.get("OPENBLAS_NUM_THREADS"), "finite": bool(np.isfinite(q).all())}))
"""
    env = {k: v for k, v in os.environ.items() if k != "OPENBLAS_NUM_THREADS"}
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, env={**env, "PARLEY_HOME": str(parley_home)},
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    got = json.loads(done.stdout.strip().splitlines()[-1])
    assert got["env"] is None and got["finite"]  # the setting was for that one load only
    if got["numpy"] is None:
        pytest.skip("this numpy has no bundled OpenBLAS (nothing to start with one thread)")
    assert got["numpy"] == 1
    if got["system"] is not None and got["cores"] > 1:
        assert got["system"] > 1


@pytest.mark.parametrize("freeze", [False, True])
def test_the_collector_pauses_for_the_start_and_resumes_once(freeze):
    import gc

    from app.cli.chat import collector_paused

    assert gc.isenabled()
    frozen = gc.get_freeze_count()
    try:
        with collector_paused(freeze) as resume:
            assert not gc.isenabled()
            made = [[] for _ in range(1000)]  # young objects of the start
            resume()  # the model is up: the turn runs with the collector on
            assert gc.isenabled()
            assert (gc.get_freeze_count() > frozen) == freeze  # frozen only in a process that exits next
            resume()  # the block's end calls it again: nothing more happens
        assert gc.isenabled() and made
    finally:
        gc.unfreeze()


def test_the_collector_is_back_on_when_the_start_fails():
    import gc

    from app.cli.chat import collector_paused

    with pytest.raises(RuntimeError):
        with collector_paused(False):
            raise RuntimeError("the engine did not start")
    assert gc.isenabled()
