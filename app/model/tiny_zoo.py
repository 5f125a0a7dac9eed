"""Tiny random-weight models of every architecture Parley supports, built on the fly.

The test matrix (tests/test_architectures.py) builds each of these in a
temporary folder, loads it through `load_model` and compares its logits with
mlx-lm's own model. Shapes are the smallest that still exercise what makes each
family different: GQA and llama3 rope (llama), q/k/v biases (qwen2), q/k norms
(qwen3, gemma3), fused projections and partial rope (phi3), softcaps (gemma2),
sliding-window layers with a short window (gemma3), MLA attention with unequal
key/value head sizes and MoE (deepseek_v2). Every quantized input dimension
is a multiple of 64, so group sizes 32 and 64 both apply.
"""

from __future__ import annotations

import copy
import importlib
import json
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from app.model.tiny import CHATML, build_tokenizer

_BASE = {
    "hidden_size": 64,
    "num_hidden_layers": 2,
    "intermediate_size": 128,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "rms_norm_eps": 1e-5,
    "max_position_embeddings": 2048,
    "tie_word_embeddings": True,
    "bos_token_id": 1,
    "eos_token_id": 2,
}

SLIDING_WINDOW = 8  # gemma3's local layers see only this many tokens in the tiny models

CONFIGS: dict[str, dict] = {
    "llama": {**_BASE, "model_type": "llama", "head_dim": 16, "rope_theta": 500000.0,
              "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                               "high_freq_factor": 4.0, "original_max_position_embeddings": 1024}},
    "mistral": {**_BASE, "model_type": "mistral", "head_dim": 16, "rope_theta": 1000000.0,
                "tie_word_embeddings": False},
    "qwen2": {**_BASE, "model_type": "qwen2", "rope_theta": 1000000.0},
    "qwen3": {**_BASE, "model_type": "qwen3", "head_dim": 32, "rope_theta": 1000000.0},
    "phi3": {**_BASE, "model_type": "phi3", "num_key_value_heads": 4, "rope_theta": 10000.0,
             "tie_word_embeddings": False},
    "gemma2": {**_BASE, "model_type": "gemma2", "head_dim": 32, "rope_theta": 10000.0,
               "attn_logit_softcapping": 5.0, "final_logit_softcapping": 3.0, "query_pre_attn_scalar": 32},
    "gemma3_text": {**_BASE, "model_type": "gemma3_text", "head_dim": 32, "num_hidden_layers": 3,
                    "rope_theta": 1000000.0, "rope_local_base_freq": 10000.0, "query_pre_attn_scalar": 32,
                    "sliding_window": SLIDING_WINDOW, "sliding_window_pattern": 3},
    "deepseek_v2": {**_BASE, "model_type": "deepseek_v2", "num_key_value_heads": 4, "kv_lora_rank": 64,
                    "q_lora_rank": None, "qk_rope_head_dim": 16, "qk_nope_head_dim": 48, "v_head_dim": 64,
                    "n_routed_experts": 4, "n_shared_experts": 1, "num_experts_per_tok": 2,
                    "moe_intermediate_size": 64, "moe_layer_freq": 1, "first_k_dense_replace": 1,
                    "topk_method": "greedy", "routed_scaling_factor": 1.0, "rope_theta": 10000.0,
                    "rope_scaling": {"type": "yarn", "factor": 40, "beta_fast": 32, "beta_slow": 1, "mscale": 0.707,
                                     "mscale_all_dim": 0.707, "original_max_position_embeddings": 64}},
}
# gemma3 as mlx-community ships it: the text model's settings nested under text_config.
CONFIGS["gemma3"] = {"model_type": "gemma3", "vocab_size": 0, "eos_token_id": 2, "bos_token_id": 1,
                     "text_config": {k: v for k, v in CONFIGS["gemma3_text"].items()
                                     if k not in ("bos_token_id", "eos_token_id", "tie_word_embeddings")}}

ARCHITECTURES = tuple(CONFIGS)
QUANTIZATIONS = ("q4g64", "q4g32", "fp16")


def tiny_arch_config(arch: str) -> dict:
    return copy.deepcopy(CONFIGS[arch])


def build_tiny_arch(dest: Path, arch: str, quant: str = "q4g64", seed: int = 0, vocab: int = 384) -> Path:
    """Write a random-weight mlx-lm folder of architecture `arch` to `dest`, quantized per `quant`.

    `quant`: "q4g64" / "q4g32" (4-bit, group 64 / 32) or "fp16" (no quantization, fp16 weights).
    """
    from mlx_lm.utils import _get_classes

    config = tiny_arch_config(arch)
    tok = build_tokenizer(vocab)
    config["vocab_size"] = tok.get_vocab_size()
    model_class, args_class = _get_classes(config)
    mx.random.seed(seed)
    model = model_class(args_class.from_dict(config))
    _scale_weights(model)
    if quant == "fp16":
        model.set_dtype(mx.float16)
    else:
        group = {"q4g64": 64, "q4g32": 32}[quant]
        nn.quantize(model, group_size=group, bits=4)
        config["quantization"] = {"group_size": group, "bits": 4}
    weights = dict(tree_flatten(model.parameters()))
    if config.get("tie_word_embeddings", True) and arch in ("gemma3", "gemma3_text"):
        weights = {k: v for k, v in weights.items() if "lm_head" not in k}
    dest.mkdir(parents=True, exist_ok=True)
    mx.save_safetensors(str(dest / "model.safetensors"), weights, metadata={"format": "mlx"})
    (dest / "config.json").write_text(json.dumps(config, indent=2))
    tok.save(str(dest / "tokenizer.json"))
    (dest / "tokenizer_config.json").write_text(
        json.dumps({"eos_token": "<|im_end|>", "bos_token": "<|im_start|>", "chat_template": CHATML})
    )
    return dest


def _scale_weights(model: nn.Module) -> None:
    """Give norms random non-trivial weights, so a skipped norm changes the logits (ones would hide it)."""
    updates = []
    for name, p in tree_flatten(model.parameters()):
        if name.endswith("norm.weight"):
            updates.append((name, mx.random.uniform(0.5, 1.5, p.shape)))
    if updates:
        model.load_weights(updates, strict=False)


def architecture_module(model_type: str):
    from mlx_lm.utils import MODEL_REMAPPING

    return importlib.import_module(f"mlx_lm.models.{MODEL_REMAPPING.get(model_type, model_type)}")
