"""From llama.cpp's GGUF conventions back to an mlx-lm folder: config, tensor names, weight fix-ups.

What llama.cpp's converter changed and this undoes:
- llama: the rows of Q and K are permuted so rotary pairs interleave (mlx-lm uses the half-split layout);
  Llama 3.1+ rope scaling is stored as a `rope_freqs` tensor of per-frequency factors, turned back
  into mlx-lm's `llama3` rope_scaling (checked to give the same factors).
- gemma2/gemma3: every RMSNorm weight is stored as 1 + w (mlx-lm adds the 1 itself).
- gemma2/gemma3's attention scale is not in the file: llama.cpp derives it (1/sqrt(head_dim), or
  1/sqrt(hidden/heads) for the 27B models), and so does this.
"""

from __future__ import annotations

import math

from app.errors import ParleyError

GGUF_ARCHITECTURES = ("llama", "qwen2", "qwen3", "gemma2", "gemma3", "phi3")
_MODEL_TYPE = {"gemma3": "gemma3_text"}

LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_qkv": "self_attn.qkv_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
GEMMA_LAYER_NAMES = {
    **LAYER_NAMES,
    "post_attention_norm": "post_attention_layernorm",
    "ffn_norm": "pre_feedforward_layernorm",
    "post_ffw_norm": "post_feedforward_layernorm",
}
TOP_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}


def check_gguf_architecture(arch: str | None, source: str) -> str:
    if arch not in GGUF_ARCHITECTURES:
        raise ParleyError(f"{source}: GGUF architecture {arch!r} is not supported. "
                          f"Parley converts GGUF files of: {', '.join(GGUF_ARCHITECTURES)}.")
    return arch


def mlx_name(arch: str, name: str) -> str | None:
    """The mlx-lm parameter name for a GGUF tensor name (None: not a model parameter, e.g. rope_freqs)."""
    base, _, part = name.rpartition(".")
    if base == "rope_freqs":
        return None
    if base.startswith("blk."):
        _, layer, key = base.split(".", 2)
        table = GEMMA_LAYER_NAMES if arch.startswith("gemma") else LAYER_NAMES
        target = table.get(key)
        if arch == "phi3" and key == "ffn_up":
            target = "mlp.gate_up_proj"
        if target is None:
            raise ParleyError(f"GGUF tensor {name} is not one Parley knows for architecture {arch!r}.")
        return f"model.layers.{layer}.{target}.{part}"
    if base not in TOP_NAMES:
        raise ParleyError(f"GGUF tensor {name} is not one Parley knows for architecture {arch!r}.")
    return f"{TOP_NAMES[base]}.{part}"


def needs_unpermute(arch: str, name: str) -> str | None:
    """'q' or 'k' for the llama Q/K tensors llama.cpp permuted, else None."""
    if arch != "llama":
        return None
    if ".attn_q." in name:
        return "q"
    if ".attn_k." in name:
        return "k"
    return None


def norm_offset(arch: str, name: str) -> float:
    """What to add to a stored norm weight (gemma stores 1 + w)."""
    return -1.0 if arch.startswith("gemma") and name.endswith("norm.weight") else 0.0


def config_from_meta(arch: str, meta: dict, tensor_names: set[str], vocab_size: int) -> dict:
    def get(key, default=None):
        return meta.get(f"{arch}.{key}", default)

    heads = int(get("attention.head_count"))
    hidden = int(get("embedding_length"))
    layers = int(get("block_count"))
    head_dim = int(get("attention.key_length", hidden // heads))
    config = {
        "model_type": _MODEL_TYPE.get(arch, arch),
        "hidden_size": hidden,
        "num_hidden_layers": layers,
        "intermediate_size": int(get("feed_forward_length")),
        "num_attention_heads": heads,
        "num_key_value_heads": int(get("attention.head_count_kv", heads)),
        "head_dim": head_dim,
        "rms_norm_eps": float(get("attention.layer_norm_rms_epsilon", 1e-6)),
        "rope_theta": float(get("rope.freq_base", 10000.0)),
        "max_position_embeddings": int(get("context_length", 4096)),
        "vocab_size": vocab_size,
        "tie_word_embeddings": "output.weight" not in tensor_names,
    }
    if "blk.0.attn_q.bias" in tensor_names and arch == "llama":
        config["attention_bias"] = True
    scaling = _rope_scaling(arch, meta)
    if scaling:
        config["rope_scaling"] = scaling
    if arch.startswith("gemma"):
        big = layers in (46, 62)  # gemma2 / gemma3 27B: llama.cpp scales by hidden / heads there
        config["query_pre_attn_scalar"] = hidden // heads if big else head_dim
    if arch == "gemma2":
        config["attn_logit_softcapping"] = float(get("attn_logit_softcapping", 50.0))
        config["final_logit_softcapping"] = float(get("final_logit_softcapping", 30.0))
    if arch == "gemma3":
        config["sliding_window"] = int(get("attention.sliding_window", 512))
        config["sliding_window_pattern"] = 6
        config["rope_local_base_freq"] = 10000.0
    if arch == "phi3":
        config["partial_rotary_factor"] = int(get("rope.dimension_count", head_dim)) / head_dim
        if any(n.startswith("rope_factors") for n in tensor_names):
            raise ParleyError("phi3 GGUF files with long-rope factors (128k variants) are not supported; "
                              "use a 4k-context phi3 or an mlx-lm folder.")
    return config


def _rope_scaling(arch: str, meta: dict) -> dict | None:
    kind = meta.get(f"{arch}.rope.scaling.type")
    factor = meta.get(f"{arch}.rope.scaling.factor")
    if kind in (None, "none") or not factor:
        return None
    if kind == "linear":
        return {"type": "linear", "factor": float(factor)}
    if kind == "yarn":
        orig = meta.get(f"{arch}.rope.scaling.original_context_length")
        out = {"type": "yarn", "factor": float(factor)}
        if orig:
            out["original_max_position_embeddings"] = int(orig)
        return out
    raise ParleyError(f"rope scaling type {kind!r} is not supported (linear, yarn and llama3 rope_freqs are).")


def llama3_scaling_from_freqs(factors, head_dim: int, theta: float) -> dict:
    """mlx-lm's `llama3` rope_scaling that reproduces llama.cpp's `rope_freqs` factors, or a clear error.

    Llama 3.1/3.2/3.3 all use low/high frequency factors 1 and 4 over an 8192-token original context;
    the scaling factor is the largest per-frequency factor."""
    import numpy as np

    factors = np.asarray(factors, dtype=np.float64).reshape(-1)
    guess = {"rope_type": "llama3", "factor": float(factors.max()), "low_freq_factor": 1.0,
             "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    if not np.allclose(llama3_factors(guess, head_dim, theta), factors, rtol=1e-4):
        raise ParleyError("the GGUF's rope_freqs are not of Llama 3's form; Parley cannot reproduce them.")
    return guess


def llama3_factors(s: dict, head_dim: int, theta: float):
    """llama.cpp's rope_freqs for a llama3 rope_scaling (its converter's formula)."""
    import numpy as np

    freqs = 1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    low_wavelen = s["original_max_position_embeddings"] / s["low_freq_factor"]
    high_wavelen = s["original_max_position_embeddings"] / s["high_freq_factor"]
    out = []
    for f in freqs:
        wavelen = 2 * math.pi / f
        if wavelen < high_wavelen:
            out.append(1.0)
        elif wavelen > low_wavelen:
            out.append(s["factor"])
        else:
            smooth = (s["original_max_position_embeddings"] / wavelen - s["low_freq_factor"]) / (
                s["high_freq_factor"] - s["low_freq_factor"])
            out.append(1 / ((1 - smooth) / s["factor"] + smooth))
    return np.array(out)
