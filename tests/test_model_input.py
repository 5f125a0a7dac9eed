"""Bad model input: a mistyped path, an unsupported architecture or tensor type; clear words, nothing half-written."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from app.errors import ParleyError
from app.model.arch import SUPPORTED_ARCHITECTURES
from app.model.loader import load_model, resolve_model_folder


def models_left(home: Path) -> list[str]:
    folder = home / "models"
    return sorted(p.name for p in folder.iterdir() if p.name != "fingerprints.json") if folder.is_dir() else []


@pytest.mark.parametrize("spec", ["/no/such/folder", "./typo-model", "~/models/missing", "a/b/c", "missing.gguf"])
def test_wrong_local_path_says_no_such_file_or_folder(spec, parley_home):
    with pytest.raises(ParleyError, match="No such file or folder") as err:
        resolve_model_folder(spec)
    assert "Hugging Face" not in str(err.value)
    assert models_left(parley_home) == []


def test_unknown_repo_id_offline_says_both(monkeypatch, parley_home):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # no network in tests
    with pytest.raises(ParleyError, match="No such file or folder: someone/no-such-model.*Hugging Face"):
        resolve_model_folder("someone/no-such-model")


def test_cli_prints_the_path_error(capsys, parley_home):
    from app.cli import main

    assert main(["--model", "/no/such/folder", "chat", "assistant", "hi"]) == 1
    assert "No such file or folder: /no/such/folder" in capsys.readouterr().err


def test_unsupported_architecture_names_it_and_the_supported_ones(tiny_model_dir, tmp_path, parley_home):
    folder = Path(shutil.copytree(tiny_model_dir, tmp_path / "mamba-ish"))
    config = json.loads((folder / "config.json").read_text())
    config["model_type"] = "mamba"
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ParleyError) as err:
        load_model(str(folder))
    message = str(err.value)
    assert "'mamba'" in message and "mamba-ish" in message
    assert all(arch in message for arch in SUPPORTED_ARCHITECTURES)
    assert models_left(parley_home) == []


def test_unsupported_tensor_type_names_it(tmp_path, parley_home):
    """mxfp4 weights (no affine biases) cannot be dequantized by the CPU path: say so instead of crashing."""
    import mlx.core as mx
    import mlx.nn as nn
    from mlx.utils import tree_flatten
    from mlx_lm.models import llama

    from app.model.tiny import build_tiny_model

    folder = build_tiny_model(tmp_path / "fp4")
    config = json.loads((folder / "config.json").read_text())
    model = llama.Model(llama.ModelArgs.from_dict(config))
    nn.quantize(model, group_size=32, bits=4, mode="mxfp4")
    config["quantization"] = {"group_size": 32, "bits": 4, "mode": "mxfp4"}
    mx.save_safetensors(str(folder / "model.safetensors"), dict(tree_flatten(model.parameters())))
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ParleyError, match="mxfp4.*Supported"):
        load_model(str(folder))


def test_cache_commands_read_a_nested_gemma3_config(tmp_path, parley_home, capsys):
    """`parley cache` builds its pool from config.json alone: gemma3 keeps num_hidden_layers in text_config."""
    from app.cli import main
    from app.model.tiny_zoo import build_tiny_arch

    folder = build_tiny_arch(tmp_path / "g3", "gemma3", "q4g64")
    assert main(["--model", str(folder), "cache", "verify"]) == 0
