"""`parley models`: list, add (GGUF converted once; mlx-lm folder registered), remove; --model NAME."""

from __future__ import annotations

import json

from app.cli import main
from app.model.tiny_gguf import write_tiny_gguf


def listed(capsys) -> list[dict]:
    capsys.readouterr()
    assert main(["models", "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_add_gguf_list_use_by_name_remove(tmp_path, parley_home, capsys):
    from app.model.loader import resolve_model_folder

    path, _, _ = write_tiny_gguf(tmp_path / "Tiny-Qwen.Q8_0.gguf", "qwen2", "Q8_0")
    assert main(["models", "add", str(path)]) == 0
    assert "added Tiny-Qwen.Q8_0-" in capsys.readouterr().out
    [model] = listed(capsys)
    assert model["architecture"] == "qwen2" and model["quantization"] == "8-bit (group 32)"
    assert model["source"] == f"GGUF {path.resolve()}" and model["size_bytes"] > 0
    assert resolve_model_folder(model["name"]) == parley_home / "models" / model["name"]
    assert main(["models"]) == 0
    table = capsys.readouterr().out
    assert "NAME" in table and model["name"] in table and "qwen2" in table
    assert main(["models", "remove", model["name"]]) == 0
    assert listed(capsys) == [] and not (parley_home / "models" / model["name"]).exists()


def test_registered_folder_is_forgotten_not_deleted(tiny_model_dir, parley_home, capsys):
    from app.model.loader import load_model

    assert main(["models", "add", str(tiny_model_dir)]) == 0
    [model] = listed(capsys)
    assert model["name"] == tiny_model_dir.name and model["source"] == str(tiny_model_dir.resolve())
    assert model["quantization"] == "4-bit (group 32)" and model["architecture"] == "llama"
    assert load_model(model["name"]).folder == tiny_model_dir.resolve()
    assert main(["models", "remove", model["name"]]) == 0
    assert "forgot" in capsys.readouterr().out
    assert listed(capsys) == [] and (tiny_model_dir / "config.json").is_file()


def test_removing_an_unknown_name_lists_the_known_ones(tiny_model_dir, parley_home, capsys):
    main(["models", "add", str(tiny_model_dir)])
    capsys.readouterr()
    assert main(["models", "remove", "nope"]) == 1
    err = capsys.readouterr().err
    assert "No model named 'nope'" in err and tiny_model_dir.name in err


def test_adding_a_missing_path_says_so(tmp_path, parley_home, capsys):
    assert main(["models", "add", str(tmp_path / "missing.gguf")]) == 1
    assert "No such file or folder" in capsys.readouterr().err
    assert listed(capsys) == []
