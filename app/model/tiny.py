"""A tiny random-weight llama with a real byte-level BPE tokenizer.

Tests (and `parley bench` smoke runs) build it into a temporary folder in
well under a second and load it through the same `load_model` path as the
embedded model, so most tests exercise real MLX without the 135M weights.
Same architecture as SmolLM2 (llama, GQA, tied embeddings, ChatML template),
4-bit quantized like the converted GGUF.
"""

from __future__ import annotations

import json
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers


CHATML = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
_CORPUS = """
Parley keeps the attention state of every persona on disk. The captain spoke of storms and
the detective of clues. A tutor asks questions: what is two plus two? Les élèves répondent.
def add(a, b):\n    return a + b\nThe quick brown fox jumps over the lazy dog 0123456789.
"""


def tiny_config(layers: int = 2, hidden: int = 64, heads: int = 4, kv_heads: int = 2, vocab: int = 384,
                context: int = 2048) -> dict:
    return {
        "model_type": "llama",
        "hidden_size": hidden,
        "num_hidden_layers": layers,
        "intermediate_size": hidden * 2,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "head_dim": hidden // heads,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "max_position_embeddings": context,
        "vocab_size": vocab,
        "tie_word_embeddings": True,
        "bos_token_id": 1,
        "eos_token_id": 2,
    }


def build_tokenizer(vocab_size: int) -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, show_progress=False, special_tokens=SPECIALS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator([_CORPUS] * 4, trainer=trainer)
    return tok


def build_tiny_model(dest: Path, seed: int = 0, **shape) -> Path:
    """Write a random-weight mlx-lm model folder to `dest` and return it."""
    from mlx_lm.models import llama

    config = tiny_config(**shape)
    tok = build_tokenizer(config["vocab_size"])
    config["vocab_size"] = tok.get_vocab_size()
    mx.random.seed(seed)
    model = llama.Model(llama.ModelArgs.from_dict(config))
    nn.quantize(model, group_size=32, bits=4)
    config["quantization"] = {"group_size": 32, "bits": 4}
    dest.mkdir(parents=True, exist_ok=True)
    mx.save_safetensors(str(dest / "model.safetensors"), dict(tree_flatten(model.parameters())))
    (dest / "config.json").write_text(json.dumps(config, indent=2))
    tok.save(str(dest / "tokenizer.json"))
    (dest / "tokenizer_config.json").write_text(
        json.dumps({"eos_token": "<|im_end|>", "bos_token": "<|im_start|>", "chat_template": CHATML})
    )
    return dest
