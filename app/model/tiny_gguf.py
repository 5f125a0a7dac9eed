"""Tiny random-weight GGUF files, written on the fly with the `gguf` package's writer (tests).

`write_tiny_gguf` lays a random model out as llama.cpp's converter does
(tensor names, Q/K row permutation for llama, 1 + w gemma norms, Llama 3
`rope_freqs`, tokenizer in the metadata) and returns the fp32 weights the
file holds once dequantized by `gguf`, in mlx-lm names and layout: what
mlx-lm's own model must compute with to be the reference for the converted one.
K-quant tensors are random blocks with sane scales (the `gguf` package has
dequantizers for them but no quantizers).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from app.model import gguf_arch
from app.model.tiny import CHATML, SPECIALS, build_tokenizer

GGUF_SHAPE = {"hidden_size": 256, "intermediate_size": 512, "num_attention_heads": 4, "num_key_value_heads": 2,
              "head_dim": 64, "num_hidden_layers": 2}
_K_BLOCK = {"Q4_K": 144, "Q5_K": 176, "Q6_K": 210}


def tiny_gguf_config(arch: str) -> dict:
    """The mlx-lm config of the reference model for a tiny GGUF of `arch` (what the converter must produce)."""
    from app.model.tiny_zoo import tiny_arch_config

    base = tiny_arch_config({"gemma3": "gemma3_text"}.get(arch, arch))
    config = {**base, **GGUF_SHAPE}
    if arch == "llama":
        config["rope_scaling"] = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                  "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    if arch == "phi3":
        config["num_key_value_heads"] = 4
        config.pop("head_dim")
    if arch in ("gemma2", "gemma3"):
        config["query_pre_attn_scalar"] = GGUF_SHAPE["head_dim"]
    if arch == "gemma3":
        config["sliding_window_pattern"] = 6  # what llama.cpp assumes; mlx-lm needs at least one full pattern
        config["num_hidden_layers"] = 6
        config["rope_local_base_freq"] = 10000.0
    return config


def write_tiny_gguf(dest: Path, arch: str, tensor_type: str, seed: int = 0, pre: str | None = None,
                    type_of=None) -> tuple[Path, dict, dict]:
    """Write `dest` (a .gguf); return (path, reference fp32 weights by mlx-lm name, reference config).

    Matrices are stored as `tensor_type` (`type_of(gguf_name)`, where given, overrides it), vectors as F32."""
    import mlx.core as mx
    from gguf import GGMLQuantizationType, GGUFWriter
    from mlx.utils import tree_flatten
    from mlx_lm.utils import _get_classes

    config = tiny_gguf_config(arch)
    spm = arch.startswith("gemma")
    tokens, types, scores, merges = _sentencepiece_vocab() if spm else _bpe_vocab()
    config["vocab_size"] = len(tokens)
    model_class, args_class = _get_classes(config)
    mx.random.seed(seed)
    model = model_class(args_class.from_dict(config))
    rng = np.random.default_rng(seed)
    params = {k: np.array(v.astype(mx.float32)) for k, v in tree_flatten(model.parameters())}
    if config.get("tie_word_embeddings", True):
        params.pop("lm_head.weight", None)
    writer = GGUFWriter(str(dest), arch)
    _metadata(writer, arch, config, tokens, types, scores, merges, pre)
    reference = {}
    names = _gguf_names(arch)
    for name, w in sorted(params.items()):
        if name.endswith("norm.weight"):
            w = w * rng.uniform(0.5, 1.5, w.shape).astype(np.float32)  # no all-ones norms: a skipped norm must show
        gname = names[name]
        kind = (type_of and type_of(gname)) or tensor_type if w.ndim == 2 else "F32"
        data, ref = _encode(w, kind, rng)
        which = gguf_arch.needs_unpermute(arch, gname)
        if which:
            heads = config["num_attention_heads" if which == "q" else "num_key_value_heads"]
            data = _permute_rows(data, heads)
        if gguf_arch.norm_offset(arch, gname):
            data = data + np.float32(1.0)
        writer.add_tensor(gname, data, raw_dtype=None if kind in ("F32", "F16") else GGMLQuantizationType[kind])
        reference[name] = ref
    if arch == "llama":
        factors = gguf_arch.llama3_factors(config["rope_scaling"], config["head_dim"], config["rope_theta"])
        writer.add_tensor("rope_freqs.weight", factors.astype(np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return dest, reference, config


def _encode(w: np.ndarray, kind: str, rng) -> tuple[np.ndarray, np.ndarray]:
    """(what the file holds, its dequantized fp32 values) for weight `w` stored as `kind`."""
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize, quantize

    if kind == "F32":
        return w, w
    if kind == "F16":
        return w.astype(np.float16), w.astype(np.float16).astype(np.float32)
    if kind in _K_BLOCK:
        data = _random_k_blocks(w.shape[0], w.shape[1], kind, rng)
    else:
        data = quantize(w, GGMLQuantizationType[kind])
    return data, dequantize(data, GGMLQuantizationType[kind]).reshape(w.shape).astype(np.float32)


def _random_k_blocks(rows: int, cols: int, kind: str, rng) -> np.ndarray:
    size, n = _K_BLOCK[kind], cols // 256
    b = rng.integers(0, 256, size=(rows, n, size), dtype=np.uint8)
    scale = lambda lo, hi: rng.uniform(lo, hi, size=(rows, n)).astype(np.float16).view(np.uint8).reshape(rows, n, 2)  # noqa: E731
    if kind == "Q6_K":
        b[..., 208:210] = scale(0.0005, 0.002)
    else:
        b[..., 0:2] = scale(0.0005, 0.002)
        b[..., 2:4] = scale(0.0005, 0.002)
    return b.reshape(rows, n * size)


def _permute_rows(data: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's Q/K row permutation (inverse of the converter's `unpermute_rows`)."""
    rows = data.shape[0]
    return data.reshape(heads, 2, rows // heads // 2, *data.shape[1:]).swapaxes(1, 2).reshape(data.shape)


def _gguf_names(arch: str) -> dict:
    """mlx-lm name -> GGUF name, the inverse of `gguf_arch.mlx_name`."""
    table = gguf_arch.GEMMA_LAYER_NAMES if arch.startswith("gemma") else gguf_arch.LAYER_NAMES
    inverse = {v: k for k, v in table.items()}
    if arch == "phi3":
        inverse["mlp.gate_up_proj"] = "ffn_up"
    top = {v: k for k, v in gguf_arch.TOP_NAMES.items()}

    class Names(dict):
        def __missing__(self, name):
            base, _, part = name.rpartition(".")
            if base.startswith("model.layers."):
                _, _, layer, rest = base.split(".", 3)
                return f"blk.{layer}.{inverse[rest]}.{part}"
            return f"{top[base]}.{part}"

    return Names()


def _metadata(w, arch: str, config: dict, tokens, types, scores, merges, pre) -> None:
    heads = config["num_attention_heads"]
    head_dim = config.get("head_dim") or config["hidden_size"] // heads
    w.add_uint32(f"{arch}.context_length", config["max_position_embeddings"])
    w.add_uint32(f"{arch}.embedding_length", config["hidden_size"])
    w.add_uint32(f"{arch}.block_count", config["num_hidden_layers"])
    w.add_uint32(f"{arch}.feed_forward_length", config["intermediate_size"])
    w.add_uint32(f"{arch}.attention.head_count", heads)
    w.add_uint32(f"{arch}.attention.head_count_kv", config["num_key_value_heads"])
    w.add_uint32(f"{arch}.attention.key_length", head_dim)
    w.add_uint32(f"{arch}.attention.value_length", head_dim)
    w.add_uint32(f"{arch}.rope.dimension_count", head_dim)
    w.add_float32(f"{arch}.attention.layer_norm_rms_epsilon", config["rms_norm_eps"])
    w.add_float32(f"{arch}.rope.freq_base", config["rope_theta"])
    if arch == "gemma2":
        w.add_float32(f"{arch}.attn_logit_softcapping", config["attn_logit_softcapping"])
        w.add_float32(f"{arch}.final_logit_softcapping", config["final_logit_softcapping"])
    if arch == "gemma3":
        w.add_uint32(f"{arch}.attention.sliding_window", config["sliding_window"])
    w.add_tokenizer_model("llama" if scores is not None else "gpt2")
    w.add_tokenizer_pre(pre or {"qwen2": "qwen2", "qwen3": "qwen2", "phi3": "gpt2"}.get(arch, "llama-bpe"))
    w.add_token_list(tokens)
    w.add_token_types(types)
    if scores is not None:
        w.add_token_scores(scores)
        w.add_bool("tokenizer.ggml.add_space_prefix", False)
        w.add_unk_token_id(tokens.index("<unk>"))
    if merges is not None:
        w.add_token_merges(merges)
    w.add_bos_token_id(tokens.index("<|im_start|>"))
    w.add_eos_token_id(tokens.index("<|im_end|>"))
    w.add_string("tokenizer.chat_template", CHATML)


def _bpe_vocab():
    tok = json.loads(build_tokenizer(384).to_str())
    vocab = tok["model"]["vocab"]
    tokens = [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])]
    merges = [m if isinstance(m, str) else " ".join(m) for m in tok["model"]["merges"]]
    types = [3 if t in SPECIALS else 1 for t in tokens]
    return tokens, types, None, merges


def sentencepiece_words() -> list[str]:
    """Multi-character pieces, each reachable by merging two earlier ones (as in a real SentencePiece BPE)."""
    return ["\u2581t", "he", "\u2581the", "ui", "ck", "uick", "\u2581q", "\u2581quick"]


def _sentencepiece_vocab():
    """A small SentencePiece-BPE vocabulary: specials, the 256 byte tokens, single characters, a few words."""
    tokens = ["<pad>", "<unk>", *SPECIALS]
    types = [3, 2, 3, 3, 3]
    tokens += [f"<0x{b:02X}>" for b in range(256)]
    types += [6] * 256
    chars = sorted(set("\u2581abcdefghijklmnopqrstuvwxyzPT"))
    tokens += chars
    types += [1] * len(chars)
    words = sentencepiece_words()
    tokens += words
    types += [1] * len(words)
    scores = [0.0] * (len(tokens) - len(chars) - len(words)) + [-100.0] * len(chars) + [
        -float(i) for i in range(len(words))]
    return tokens, types, scores, None
