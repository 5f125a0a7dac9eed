"""Request bodies in, validated `Parsed` requests out; anything wrong is a `BadRequest` (a 4xx).

Front-ends send many fields Parley does not use (repeat_penalty, mirostat,
grammar, ...): unknown fields are ignored. A known field of the wrong type or
out of range is refused with a message naming it. No MLX here: prompts are
tokenized with the model's own tokenizer (the `tokenizers` library).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from app.engine.commands import CompletionOptions

DEFAULT_MAX_TOKENS = 512
MAX_ALTERNATIVES = 8
MAX_STOP_STRINGS = 16


class BadRequest(Exception):
    def __init__(self, message: str, param: str | None = None, status: int = 400, code: str = "invalid_request"):
        super().__init__(message)
        self.message, self.param, self.status, self.code = message, param, status, code


@dataclass(frozen=True)
class Parsed:
    prompt_ids: tuple[int, ...]
    options: CompletionOptions
    stream: bool
    session: str | None
    include_usage: bool
    model: str


def parse_request(body, kind: str, tokenizer, window: int, session_header: str | None) -> Parsed:
    """`kind`: "chat" (/v1/chat/completions), "text" (/v1/completions) or "llama" (/completion)."""
    if not isinstance(body, dict):
        raise BadRequest("The request body must be a JSON object.")
    if kind == "chat":
        ids = chat_prompt_ids(body, tokenizer)
    else:
        ids = text_prompt_ids(body, tokenizer)
    if not ids:
        raise BadRequest("The prompt is empty: send some text.", "messages" if kind == "chat" else "prompt")
    if len(ids) + 1 > window:
        raise BadRequest(f"The prompt is {len(ids)} tokens; the model's context window holds {window} "
                         "(including at least one token of reply). Send a shorter prompt.",
                         "messages" if kind == "chat" else "prompt", code="context_length_exceeded")
    max_tokens = _max_tokens(body, window - len(ids))
    options = CompletionOptions(
        max_tokens=max_tokens,
        temperature=_number(body, "temperature", 0.0, 100.0, 0.8),
        top_p=_number(body, "top_p", 0.0, 1.0, 1.0),
        top_k=max(0, _integer(body, "top_k", -1, 1_000_000, 0)),
        min_p=_number(body, "min_p", 0.0, 1.0, 0.0),
        seed=_seed(body),
        stop=_stop(body),
        logit_bias=_logit_bias(body.get("logit_bias"), tokenizer),
        n=_integer(body, "n", 1, MAX_ALTERNATIVES, 1),
    )
    _boolean(body, "cache_prompt", True)  # accepted; caching is always on
    stream = _boolean(body, "stream", False)
    stream_options = body.get("stream_options")
    if stream_options is not None and not isinstance(stream_options, dict):
        raise BadRequest("`stream_options` must be an object such as {\"include_usage\": true}.", "stream_options")
    include_usage = _boolean(stream_options or {}, "include_usage", False)
    user = body.get("user")
    if user is not None and not isinstance(user, str):
        raise BadRequest("`user` must be a string (it names the cache to keep this conversation in).", "user")
    model = body.get("model", "")
    if not isinstance(model, str):
        raise BadRequest("`model` must be a string.", "model")
    return Parsed(tuple(ids), options, stream, session_header or user or None, include_usage, model)


# -- prompts -------------------------------------------------------------------


def chat_prompt_ids(body: dict, tokenizer) -> list[int]:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise BadRequest("`messages` must be a non-empty list of {\"role\", \"content\"} objects.", "messages")
    rendered = [_message(m, i) for i, m in enumerate(messages)]
    try:
        return tokenizer.encode_chat(rendered, add_generation_prompt=True)
    except Exception as exc:  # the model's own chat template refused them (e.g. roles must alternate)
        raise BadRequest(f"The model's chat template could not render these messages: {exc}", "messages") from None


def _message(m, i: int) -> dict:
    where = f"messages[{i}]"
    if not isinstance(m, dict):
        raise BadRequest(f"`{where}` must be an object with `role` and `content`.", where)
    role, content = m.get("role"), m.get("content")
    if role not in ("system", "developer", "user", "assistant", "tool"):
        raise BadRequest(f"`{where}.role` must be one of system, user, assistant (got {role!r}).", f"{where}.role")
    if content is None:
        content = ""
    if isinstance(content, list):  # OpenAI content parts: only text parts are understood
        texts = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise BadRequest(f"`{where}.content` parts must be {{\"type\": \"text\", \"text\": ...}}; "
                                 "this model reads text only.", f"{where}.content")
            texts.append(part["text"])
        content = "".join(texts)
    if not isinstance(content, str):
        raise BadRequest(f"`{where}.content` must be a string.", f"{where}.content")
    return {"role": "system" if role == "developer" else role, "content": content}


def text_prompt_ids(body: dict, tokenizer) -> list[int]:
    prompt = body.get("prompt", body.get("content"))
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]  # one prompt in a list (OpenAI allows a batch; Parley takes one)
    if isinstance(prompt, str):
        return tokenizer.encode(prompt)
    if isinstance(prompt, list) and all(isinstance(p, (int, str)) and not isinstance(p, bool) for p in prompt):
        ids: list[int] = []
        for piece in prompt:  # llama.cpp allows token ids mixed with text
            ids.extend(tokenizer.encode(piece) if isinstance(piece, str) else [_token_id(piece, tokenizer, "prompt")])
        return ids
    raise BadRequest("`prompt` must be a string or a list of token ids.", "prompt")


def _token_id(value, tokenizer, param: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < tokenizer.vocab_size:
        raise BadRequest(f"`{param}` holds {value!r}, which is not a token id of this model (0..{tokenizer.vocab_size - 1}).",
                         param)
    return value


# -- fields ----------------------------------------------------------------------


def _max_tokens(body: dict, room: int) -> int:
    for name in ("max_tokens", "max_completion_tokens", "n_predict"):
        value = body.get(name)
        if value is None:
            continue
        if not isinstance(value, int) or isinstance(value, bool) or value < -1:
            raise BadRequest(f"`{name}` must be a whole number of tokens (-1: until the context window is full).", name)
        if value == -1:
            return room
        if value == 0 and name != "n_predict":
            raise BadRequest(f"`{name}` must be at least 1.", name)
        return min(value, room)
    return min(DEFAULT_MAX_TOKENS, room)


def _number(body: dict, name: str, lo: float, hi: float, default: float) -> float:
    value = body.get(name)
    if value is None:
        return default
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value) or not lo <= value <= hi:
        raise BadRequest(f"`{name}` must be a number from {lo:g} to {hi:g} (got {value!r}).", name)
    return float(value)


def _integer(body: dict, name: str, lo: int, hi: int, default: int) -> int:
    value = body.get(name)
    if value is None:
        return default
    if not isinstance(value, int) or isinstance(value, bool) or not lo <= value <= hi:
        raise BadRequest(f"`{name}` must be a whole number from {lo} to {hi} (got {value!r}).", name)
    return value


def _boolean(body: dict, name: str, default: bool) -> bool:
    value = body.get(name)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise BadRequest(f"`{name}` must be true or false (got {value!r}).", name)
    return value


def _seed(body: dict) -> int | None:
    value = body.get("seed")
    if value is None or value == -1:
        return None  # llama.cpp's -1: random
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < 2**63:
        raise BadRequest(f"`seed` must be a non-negative whole number (got {value!r}).", "seed")
    return value


def _stop(body: dict) -> tuple[str, ...]:
    value = body.get("stop")
    if value is None:
        return ()
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(s, str) for s in value) or len(value) > MAX_STOP_STRINGS:
        raise BadRequest(f"`stop` must be a string or a list of at most {MAX_STOP_STRINGS} strings.", "stop")
    return tuple(s for s in value if s)


def _logit_bias(value, tokenizer) -> tuple[tuple[int, float], ...]:
    """OpenAI's {"token id": bias} map, or llama.cpp's [[token id or text, bias or false], ...] array."""
    if value is None:
        return ()
    pairs = []
    if isinstance(value, dict):
        for key, bias in value.items():
            try:
                token = int(key)
            except ValueError:
                raise BadRequest(f"`logit_bias` keys must be token ids (got {key!r}).", "logit_bias") from None
            pairs.append((_token_id(token, tokenizer, "logit_bias"), _bias_value(bias)))
    elif isinstance(value, list):
        for item in value:
            if not isinstance(item, list) or len(item) != 2:
                raise BadRequest("`logit_bias` entries must be [token id or text, bias] pairs.", "logit_bias")
            target, bias = item
            tokens = tokenizer.encode(target) if isinstance(target, str) else [_token_id(target, tokenizer, "logit_bias")]
            pairs.extend((t, _bias_value(bias)) for t in tokens)
    else:
        raise BadRequest("`logit_bias` must be an object {\"token id\": bias} or a list of [token, bias] pairs.",
                         "logit_bias")
    return tuple(pairs)


def _bias_value(bias) -> float:
    if bias is False:
        return -math.inf  # llama.cpp: never this token
    if not isinstance(bias, (int, float)) or isinstance(bias, bool) or not math.isfinite(bias):
        raise BadRequest(f"`logit_bias` values must be numbers, or false to ban a token (got {bias!r}).", "logit_bias")
    return float(bias)
