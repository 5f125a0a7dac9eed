"""Response bodies in the two dialects front-ends speak: OpenAI's and the llama.cpp server's.

Every response says how much of the prompt came from a stored cache: OpenAI's
`usage.prompt_tokens_details.cached_tokens`, llama.cpp's `tokens_cached` and
`timings.cache_n`, plus Parley's own `parley` object (where the cache came from).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field

from app.engine import events as ev


@dataclass
class Outcome:
    """What the engine reported for one request, gathered event by event."""

    started: ev.CompletionStarted | None = None
    finished: dict[int, ev.CompletionFinished] = field(default_factory=dict)


def sse(payload) -> str:
    return f"data: {json.dumps(payload) if not isinstance(payload, str) else payload}\n\n"


def usage(outcome: Outcome) -> dict:
    s = outcome.started
    prompt = s.prompt_tokens if s else 0
    cached = s.cached_tokens if s else 0
    completion = sum(f.generated_tokens for f in outcome.finished.values())
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": cached}}


def parley_extra(outcome: Outcome) -> dict:
    s = outcome.started
    first = outcome.finished.get(0)
    return {"cache": s.source if s else "none", "cached_tokens": s.cached_tokens if s else 0,
            "prefilled_tokens": (s.prompt_tokens - s.cached_tokens) if s else 0,
            "prompt_ms": round(s.prompt_ms, 2) if s else 0.0, "ttft_ms": round(first.ttft_ms, 2) if first else 0.0,
            "batch_requests": first.batch_rows if first else 1}


def _reason(f: ev.CompletionFinished) -> str:
    return "length" if f.finish_reason == "length" else "stop"


# -- OpenAI ---------------------------------------------------------------------------


def openai_body(kind: str, request_id: str, model: str, outcome: Outcome) -> dict:
    choices = []
    for index in sorted(outcome.finished):
        f = outcome.finished[index]
        if kind == "chat":
            choices.append({"index": index, "message": {"role": "assistant", "content": f.text},
                            "finish_reason": _reason(f), "logprobs": None})
        else:
            choices.append({"index": index, "text": f.text, "finish_reason": _reason(f), "logprobs": None})
    return {"id": request_id, "object": "chat.completion" if kind == "chat" else "text_completion",
            "created": int(time.time()), "model": model, "choices": choices, "usage": usage(outcome),
            "system_fingerprint": "parley", "parley": parley_extra(outcome)}


def openai_chunk(kind: str, request_id: str, model: str, index: int, text: str | None = None,
                 finish: str | None = None, first: bool = False) -> dict:
    if kind == "chat":
        delta: dict = {"role": "assistant", "content": ""} if first else ({"content": text} if text is not None else {})
        choice = {"index": index, "delta": delta, "finish_reason": finish, "logprobs": None}
    else:
        choice = {"index": index, "text": text or "", "finish_reason": finish, "logprobs": None}
    return {"id": request_id, "object": "chat.completion.chunk" if kind == "chat" else "text_completion",
            "created": int(time.time()), "model": model, "system_fingerprint": "parley", "choices": [choice]}


def openai_usage_chunk(kind: str, request_id: str, model: str, outcome: Outcome) -> dict:
    return {"id": request_id, "object": "chat.completion.chunk" if kind == "chat" else "text_completion",
            "created": int(time.time()), "model": model, "choices": [], "usage": usage(outcome),
            "parley": parley_extra(outcome)}


# -- llama.cpp --------------------------------------------------------------------------


def timings(outcome: Outcome, index: int = 0) -> dict:
    s = outcome.started
    f = outcome.finished.get(index)
    prompt_n = (s.prompt_tokens - s.cached_tokens) if s else 0
    prompt_ms = s.prompt_ms if s else 0.0
    predicted_n = f.generated_tokens if f else 0
    predicted_ms = f.decode_ms if f else 0.0
    return {"cache_n": s.cached_tokens if s else 0, "prompt_n": prompt_n, "prompt_ms": round(prompt_ms, 3),
            "prompt_per_second": round(prompt_n / prompt_ms * 1000, 2) if prompt_ms > 0 else 0.0,
            "predicted_n": predicted_n, "predicted_ms": round(predicted_ms, 3),
            "predicted_per_second": round((predicted_n - 1) / predicted_ms * 1000, 2)
            if predicted_ms > 0 and predicted_n > 1 else 0.0}


def llama_final(model: str, outcome: Outcome, index: int = 0, with_content: bool = True) -> dict:
    s = outcome.started
    f = outcome.finished.get(index)
    stop_type = "none"
    if f is not None:
        stop_type = "limit" if f.finish_reason == "length" else ("word" if f.stopping_word else "eos")
    body = {"index": index, "stop": True, "model": model, "id_slot": 0,
            "tokens_predicted": f.generated_tokens if f else 0,
            "tokens_evaluated": s.prompt_tokens if s else 0, "tokens_cached": s.cached_tokens if s else 0,
            "stop_type": stop_type, "stopping_word": f.stopping_word if f else "",
            "truncated": False, "timings": timings(outcome, index), "parley": parley_extra(outcome)}
    body["content"] = (f.text if f else "") if with_content else ""
    return body
