"""Build a Hugging Face fast tokenizer from GGUF metadata.

GGUF files made by llama.cpp carry the whole BPE vocabulary, merges, token
types and special token ids. For `tokenizer.ggml.model == "gpt2"` (byte-level
BPE) this rebuilds the same `tokenizer.json` the original model shipped, so
that mlx-lm and the `tokenizers` library load it without any download.
"""

from __future__ import annotations

import json

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers

from app.errors import ParleyError

# Pre-tokenizers of the byte-level BPE families we know, by `tokenizer.ggml.pre`.
# SmolLM2 splits digits one by one before the usual GPT-2 byte-level split.
_DIGIT_SPLITTING = {"smollm", "starcoder", "refact"}
_CONTROL = 3  # llama.cpp token type for control (special) tokens
_USER_DEFINED = 4


# Pre-tokenizer split patterns of llama.cpp's `tokenizer.ggml.pre` names (as in the models' own tokenizer.json).
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                 r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_SPLITS = {"llama-bpe": _LLAMA3_SPLIT, "llama3": _LLAMA3_SPLIT, "smaug-bpe": _LLAMA3_SPLIT,
           "qwen2": _QWEN2_SPLIT, "deepseek-r1-qwen": _QWEN2_SPLIT}
_GPT2 = {"gpt2", "gpt-2", "default", ""}
BPE_PRE_TOKENIZERS = tuple(sorted(_SPLITS)) + tuple(sorted(_DIGIT_SPLITTING)) + ("gpt2", "default")


def build_tokenizer(meta: dict, source: str) -> Tokenizer:
    """Return a `tokenizers.Tokenizer` equivalent to the GGUF's tokenizer (byte-level BPE or SentencePiece)."""
    kind = meta.get("tokenizer.ggml.model")
    if kind == "llama":
        tok = _sentencepiece(meta)
    elif kind == "gpt2":
        tok = _byte_level_bpe(meta, source)
    else:
        raise ParleyError(
            f"{source}: tokenizer type {kind!r} is not supported (byte-level BPE 'gpt2' and SentencePiece 'llama' are). "
            "Convert the model with mlx_lm.convert and pass its folder with --model."
        )
    tokens = list(meta["tokenizer.ggml.tokens"])
    types = _token_types(meta, len(tokens))
    specials = [
        AddedToken(t, special=True, normalized=False)
        for t, kind in zip(tokens, types)
        if kind in (_CONTROL, _USER_DEFINED)
    ]
    tok.add_special_tokens(specials)
    return tok


def _byte_level_bpe(meta: dict, source: str) -> Tokenizer:
    tokens = list(meta["tokenizer.ggml.tokens"])
    merges = [tuple(m.split(" ", 1)) for m in meta["tokenizer.ggml.merges"]]
    vocab = {tok: i for i, tok in enumerate(tokens)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False))
    pre = str(meta.get("tokenizer.ggml.pre", "") or "")
    if pre in _SPLITS:
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(_SPLITS[pre]), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
        ])
    elif pre in _DIGIT_SPLITTING or pre in _GPT2:
        splitters = [pre_tokenizers.Digits(individual_digits=True)] if pre in _DIGIT_SPLITTING else []
        splitters.append(pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True))
        tok.pre_tokenizer = pre_tokenizers.Sequence(splitters)
    else:
        raise ParleyError(f"{source}: pre-tokenizer {pre!r} is not supported. "
                          f"Supported: {', '.join(BPE_PRE_TOKENIZERS)} and SentencePiece.")
    tok.decoder = decoders.ByteLevel()
    return tok


def _sentencepiece(meta: dict) -> Tokenizer:
    """SentencePiece BPE (gemma, llama 2): merges rebuilt from the vocabulary's scores, byte fallback."""
    tokens = list(meta["tokenizer.ggml.tokens"])
    scores = list(meta.get("tokenizer.ggml.scores") or [0.0] * len(tokens))
    vocab = {t: i for i, t in enumerate(tokens)}
    merges = []
    for piece, i in vocab.items():
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in vocab and right in vocab:
                merges.append((-float(scores[i]), i, vocab[left], vocab[right], left, right))
    merges.sort()
    unk = meta.get("tokenizer.ggml.unknown_token_id")
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[(m[4], m[5]) for m in merges], fuse_unk=True, byte_fallback=True,
                               unk_token=tokens[int(_scalar(unk))] if unk is not None else None))
    steps = [normalizers.Replace(" ", "\u2581")]
    if bool(_scalar(meta.get("tokenizer.ggml.add_space_prefix", True))):
        steps.insert(0, normalizers.Prepend("\u2581"))
    tok.normalizer = normalizers.Sequence(steps)
    dec = [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()]
    if bool(_scalar(meta.get("tokenizer.ggml.add_space_prefix", True))):
        dec.append(decoders.Strip(" ", 1, 0))
    tok.decoder = decoders.Sequence(dec)
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
        "model_max_length": int(_scalar(meta.get(f"{meta.get('general.architecture', 'llama')}.context_length", 8192))),
    }
    if "tokenizer.chat_template" in meta:
        config["chat_template"] = meta["tokenizer.chat_template"]
    return {k: v for k, v in config.items() if v is not None}


def _scalar(value):
    return value.item() if hasattr(value, "item") else value


def dump_json(obj: dict) -> str:
    return json.dumps(obj, indent=2, ensure_ascii=False)
