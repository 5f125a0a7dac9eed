"""Build a Hugging Face fast tokenizer from GGUF metadata.

GGUF files made by llama.cpp carry the whole BPE vocabulary, merges, token
types and special token ids. For `tokenizer.ggml.model == "gpt2"` (byte-level
BPE) this rebuilds the same `tokenizer.json` the original model shipped, so
that mlx-lm and the `tokenizers` library load it without any download.
"""

from __future__ import annotations

import json

from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

from app.errors import ParleyError

# Pre-tokenizers of the byte-level BPE families we know, by `tokenizer.ggml.pre`.
# SmolLM2 splits digits one by one before the usual GPT-2 byte-level split.
_DIGIT_SPLITTING = {"smollm", "starcoder", "refact"}
_CONTROL = 3  # llama.cpp token type for control (special) tokens
_USER_DEFINED = 4


def build_tokenizer(meta: dict, source: str) -> Tokenizer:
    """Return a `tokenizers.Tokenizer` equivalent to the GGUF's tokenizer."""
    kind = meta.get("tokenizer.ggml.model")
    if kind != "gpt2":
        raise ParleyError(
            f"{source}: tokenizer type {kind!r} is not supported (only byte-level BPE, 'gpt2'). "
            "Convert the model with mlx_lm.convert and pass its folder with --model."
        )
    tokens = list(meta["tokenizer.ggml.tokens"])
    merges = [tuple(m.split(" ", 1)) for m in meta["tokenizer.ggml.merges"]]
    vocab = {tok: i for i, tok in enumerate(tokens)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False))
    splitters = []
    if meta.get("tokenizer.ggml.pre", "") in _DIGIT_SPLITTING:
        splitters.append(pre_tokenizers.Digits(individual_digits=True))
    splitters.append(pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True))
    tok.pre_tokenizer = pre_tokenizers.Sequence(splitters)
    tok.decoder = decoders.ByteLevel()
    types = _token_types(meta, len(tokens))
    specials = [
        AddedToken(t, special=True, normalized=False)
        for t, kind in zip(tokens, types)
        if kind in (_CONTROL, _USER_DEFINED)
    ]
    tok.add_special_tokens(specials)
    return tok


def _token_types(meta: dict, n: int) -> list[int]:
    types = meta.get("tokenizer.ggml.token_type")
    if types is None:
        return [1] * n
    return [int(t) for t in (types.tolist() if hasattr(types, "tolist") else types)]


def tokenizer_config(meta: dict) -> dict:
    """The `tokenizer_config.json` mlx-lm/transformers expect beside tokenizer.json."""
    tokens = meta["tokenizer.ggml.tokens"]

    def token(key: str) -> str | None:
        idx = meta.get(f"tokenizer.ggml.{key}_token_id")
        return None if idx is None else tokens[int(idx.item() if hasattr(idx, "item") else idx)]

    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": token("bos"),
        "eos_token": token("eos"),
        "unk_token": token("unknown"),
        "pad_token": token("padding"),
        "add_bos_token": bool(_scalar(meta.get("tokenizer.ggml.add_bos_token", False))),
        "clean_up_tokenization_spaces": False,
        "model_max_length": int(_scalar(meta.get("llama.context_length", 8192))),
    }
    if "tokenizer.chat_template" in meta:
        config["chat_template"] = meta["tokenizer.chat_template"]
    return {k: v for k, v in config.items() if v is not None}


def _scalar(value):
    return value.item() if hasattr(value, "item") else value


def dump_json(obj: dict) -> str:
    return json.dumps(obj, indent=2, ensure_ascii=False)
