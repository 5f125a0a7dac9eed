"""`--model PATH.gguf`: GGUF files of every supported architecture and tensor type, converted once, exactly.

Tiny GGUF files are written on the fly with the `gguf` package's writer (`app.model.tiny_gguf`) the way
llama.cpp lays them out; Parley's converted model must compute what mlx-lm's own model computes with the
weights the file holds (as `gguf` dequantizes them).
"""

from __future__ import annotations

import numpy as np
import pytest

import mlx.core as mx

from app.errors import ParleyError
from app.model.gguf_tensors import SUPPORTED_TYPES
from app.model.tiny_gguf import write_tiny_gguf
from tests.engine_helpers import teacher_forced_logits

PROMPT = [5 + (i * 7) % 300 for i in range(13)]
FORCED = [11, 42, 7, 250]
ARCHS = ("llama", "qwen2", "qwen3", "gemma2", "gemma3", "phi3")


def reference_logits(reference: dict, config: dict) -> list[np.ndarray]:
    from mlx_lm.models.cache import make_prompt_cache
    from mlx_lm.utils import _get_classes

    model_class, args_class = _get_classes(config)
    model = model_class(args_class.from_dict(config))
    weights = {k: mx.array(v) for k, v in reference.items()}
    if hasattr(model, "sanitize"):
        weights = model.sanitize(weights)
    model.load_weights(list(weights.items()))
    cache = make_prompt_cache(model)
    out = [model(mx.array([PROMPT]), cache=cache)[0, -1]]
    for t in FORCED:
        out.append(model(mx.array([[t]]), cache=cache)[0, -1])
    return [np.array(o) for o in out]


def parley_logits(lm) -> list[np.ndarray]:
    return teacher_forced_logits(lm, PROMPT, FORCED, chunk=5)


def check(arch: str, kind: str, tmp_path) -> None:
    from app.model.loader import load_model

    path, reference, config = write_tiny_gguf(tmp_path / f"tiny-{arch}-{kind}.gguf", arch, kind)
    lm = load_model(str(path))
    if kind == "Q6_K":  # no MLX layout for its 16-weight groups: it becomes fp16, as documented
        reference = {k: v.astype(np.float16).astype(np.float32) if v.ndim == 2 else v for k, v in reference.items()}
    for i, (a, b) in enumerate(zip(parley_logits(lm), reference_logits(reference, config))):
        scale = float(np.abs(b).max())
        assert np.abs(a - b).max() <= 2e-5 * scale + 1e-6, f"{arch} {kind} position {i}"


@pytest.mark.parametrize("arch", ARCHS)
def test_gguf_architectures_match_mlx_lm(arch, tmp_path):
    check(arch, "Q4_K", tmp_path)


@pytest.mark.parametrize("kind", SUPPORTED_TYPES)
def test_gguf_tensor_types_match_mlx_lm(kind, tmp_path):
    check("llama", kind, tmp_path)


def test_gguf_is_converted_once_with_progress_and_reused(tmp_path, parley_home):
    from app.model.loader import resolve_model_folder

    path, _, _ = write_tiny_gguf(tmp_path / "once.gguf", "qwen2", "Q8_0")
    calls = []
    folder = resolve_model_folder(str(path), progress=lambda d, t, label: calls.append((d, t, label)))
    assert folder.parent == parley_home / "models" and calls and calls[-1][0] == calls[-1][1]
    stamp = (folder / "model.safetensors").stat().st_mtime_ns
    again = []
    assert resolve_model_folder(str(path), progress=lambda *a: again.append(a)) == folder
    assert again == [] and (folder / "model.safetensors").stat().st_mtime_ns == stamp


def test_pre_tokenizers_follow_the_file(tmp_path):
    from app.model.gguf_convert import open_gguf, read_meta
    from app.model.gguf_tokenizer import build_tokenizer

    splits = {}
    for pre in ("llama-bpe", "qwen2", "smollm", "gpt2"):
        path, _, _ = write_tiny_gguf(tmp_path / f"{pre}.gguf", "llama", "F32", pre=pre)
        tok = build_tokenizer(read_meta(open_gguf(path)), str(path))
        splits[pre] = [p for p, _ in tok.pre_tokenizer.pre_tokenize_str("abc 12345")]
    assert splits["llama-bpe"] == ["abc", "Ġ", "123", "45"]
    assert splits["qwen2"] == ["abc", "Ġ", "1", "2", "3", "4", "5"]
    assert splits["smollm"] == ["abc", "Ġ", "1", "2", "3", "4", "5"]
    assert splits["gpt2"] == ["abc", "Ġ12345"]


def test_sentencepiece_tokenizer_merges_by_score_and_falls_back_to_bytes(tmp_path):
    from app.model.gguf_convert import open_gguf, read_meta
    from app.model.gguf_tokenizer import build_tokenizer

    path, _, _ = write_tiny_gguf(tmp_path / "spm.gguf", "gemma3", "F32")
    tok = build_tokenizer(read_meta(open_gguf(path)), str(path))
    enc = tok.encode("the quick brown, fox")
    assert enc.tokens[:2] == ["the", "\u2581quick"] or enc.tokens[:3] == ["t", "he", "\u2581quick"]
    assert "<0x2C>" in enc.tokens  # "," is not in the vocabulary: byte fallback
    assert tok.decode(enc.ids) == "the quick brown, fox"
    assert tok.encode(" the").tokens == ["\u2581the"]


def models_left(home) -> list[str]:
    folder = home / "models"
    return sorted(p.name for p in folder.iterdir() if p.name != "fingerprints.json") if folder.is_dir() else []


def test_unsupported_gguf_architecture_is_named(tmp_path, parley_home):
    from gguf import GGUFWriter

    from app.model.loader import load_model

    path = tmp_path / "mamba.gguf"
    w = GGUFWriter(str(path), "mamba")
    w.add_tensor("token_embd.weight", np.zeros((4, 4), np.float32))
    w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file(), w.close()
    with pytest.raises(ParleyError, match="'mamba' is not supported.*llama, qwen2"):
        load_model(str(path))
    assert models_left(parley_home) == []


def test_unsupported_tensor_type_is_named_and_nothing_is_left(tmp_path, parley_home):
    from app.model.loader import load_model

    path, _, _ = write_tiny_gguf(tmp_path / "q50.gguf", "qwen2", "Q8_0",
                                 type_of=lambda name: "Q5_0" if "ffn_down" in name else None)
    with pytest.raises(ParleyError) as err:
        load_model(str(path))
    assert "Q5_0" in str(err.value) and "q50.gguf" in str(err.value)
    assert all(t in str(err.value) for t in SUPPORTED_TYPES)
    assert models_left(parley_home) == []


def test_damaged_gguf_is_named(tmp_path, parley_home):
    from app.model.loader import load_model

    path, _, _ = write_tiny_gguf(tmp_path / "whole.gguf", "qwen2", "Q8_0")
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(path.read_bytes()[:5000])
    with pytest.raises(ParleyError, match="cut.gguf"):
        load_model(str(cut))
    assert models_left(parley_home) == []


@pytest.mark.real_model
def test_embedded_gguf_by_path_gives_the_same_model(parley_home):
    from app.model.loader import embedded_gguf, load_model

    default, by_path = load_model(None), load_model(str(embedded_gguf()))
    assert by_path.folder != default.folder
    ids = default.tokenizer.encode_chat([{"role": "user", "content": "What is the capital of France?"}])
    assert by_path.tokenizer.encode_chat([{"role": "user", "content": "What is the capital of France?"}]) == ids
    a = np.array(default.model(mx.array([ids]))[0, -1])
    b = np.array(by_path.model(mx.array([ids]))[0, -1])
    assert np.array_equal(a, b)
