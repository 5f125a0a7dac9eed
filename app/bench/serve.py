"""`parley bench serve`: K simulated front-end clients against a live `parley serve`, fresh and after a restart.

For each K in (1, 4, 8), in a fresh temporary PARLEY_HOME, a `parley serve`
child process (same model and scheme) takes K clients at once. Each client is
its own character (a distinct system prompt plus its own slice of the shipped
text, `START_TOKENS` long) and plays `TURNS` turns: it sends the whole
conversation (OpenAI chat completions, streaming, greedy, `REPLY_TOKENS` tokens),
appends the reply and a new user message of about `TURN_TOKENS` tokens, so the
conversations grow from ~1K to ~4K tokens. Clients take turns on the server
as front-ends do: all at once, each waiting for its own reply. Then the server
is stopped (ctrl+c) and started again on the same home and every client plays
one more turn: that turn's prompt comes back from disk.

Per phase: time to first token (client side: request sent -> first content
chunk), tokens/s per client (its decode, first -> last chunk), aggregate
tokens/s (all reply tokens / wall time of the phase), and cached tokens per turn
(`usage.prompt_tokens_details.cached_tokens`). Medians over turns.
"""

from __future__ import annotations

import http.client
import json
import threading
import time
from pathlib import Path

from app.bench import common

KS = (1, 4, 8)
QUICK_KS = (1, 2)
START_TOKENS, TURN_TOKENS, TURNS, REPLY_TOKENS = 1024, 768, 4, 32
QUICK = (192, 96, 2, 8)


def run(lm, args) -> dict:
    quick = common.quick(args)
    ks = getattr(args, "serve_clients", None) or (QUICK_KS if quick else KS)
    sizes = QUICK if quick else (START_TOKENS, TURN_TOKENS, TURNS, REPLY_TOKENS)
    text = common.text_tokens(lm)
    results: dict = {}
    for k in ks:
        with common.temp_home() as home:
            rows = measure(lm, args, home, k, text, *sizes)
        for phase, row in rows.items():
            for name, value in row.items():
                results[f"k{k}_{phase}_{name}"] = value
        common.log(args, report({key: v for key, v in results.items() if key.startswith(f"k{k}_")}))
    return results


def measure(lm, args, home: Path, k: int, text: list[int], start: int, turn: int, turns: int, reply: int) -> dict:
    from app.serve.child import LiveServer

    model = None if getattr(args, "model", None) is None else str(lm.folder)
    extra = ["--kv-scheme", getattr(args, "kv_scheme", "q4"), "--budget-mb", str(getattr(args, "budget_mb", 512.0))]
    tok = lm.tokenizer
    clients = [Conversation(i, tok.decode(text[(i * start) % max(1, len(text) - start):][:start])) for i in range(k)]
    pieces = [tok.decode(text[j * turn:(j + 1) * turn]) for j in range(turns + 1)]
    with LiveServer(model, home, global_args=extra) as live:
        common.log(args, f"serve: K={k}, fresh server, {turns} turns each")
        fresh = play(live.url, clients, pieces[:turns], reply)
    with LiveServer(model, home, global_args=extra) as live:
        common.log(args, f"serve: K={k}, after a restart, 1 turn each")
        restarted = play(live.url, clients, pieces[turns:turns + 1], reply)
    return {"fresh": fresh, "restart": restarted}


class Conversation:
    """One simulated front-end chat: a character and the messages so far."""

    def __init__(self, i: int, context: str):
        self.messages = [{"role": "system", "content": f"You are Character {i}, a storyteller. Stay in character. "
                                                       f"What you know:\n{context}"}]
        self.turns: list[dict] = []


def play(url: str, clients: list[Conversation], user_texts: list[str], reply: int) -> dict:
    """Every client plays `len(user_texts)` turns, all clients at once; returns the phase's medians."""
    started = time.perf_counter()
    threads = [threading.Thread(target=_play_one, args=(url, c, user_texts, reply)) for c in clients]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - started
    turns = [t for c in clients for t in c.turns[-len(user_texts):]]
    failed = [t["error"] for t in turns if "error" in t]
    if failed:
        raise RuntimeError(f"parley serve failed a request: {failed[0]}")
    done = sum(t["tokens"] for t in turns)
    return {
        "turns": len(turns),
        "prompt_tokens": int(common.median([t["prompt"] for t in turns])),
        "cached_tokens": int(common.median([t["cached"] for t in turns])),
        "ttft_ms": round(common.median([t["ttft"] for t in turns]) * 1000, 1),
        "client_tps": round(common.median([t["tps"] for t in turns]), 1),
        "aggregate_tps": round(done / wall, 1),
    }


def _play_one(url: str, convo: Conversation, user_texts: list[str], reply: int) -> None:
    for text in user_texts:
        convo.messages.append({"role": "user", "content": text})
        try:
            result = stream_chat(url, convo.messages, reply)
        except Exception as exc:  # reported by `play`, not lost in a thread
            convo.turns.append({"error": repr(exc)})
            return
        convo.messages.append({"role": "assistant", "content": result.pop("text")})
        convo.turns.append(result)


def stream_chat(url: str, messages: list[dict], max_tokens: int) -> dict:
    """One streamed chat completion over plain HTTP; client-side timings and the server's usage."""
    host, port = url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=600)
    body = json.dumps({"messages": messages, "max_tokens": max_tokens, "temperature": 0, "stream": True,
                       "stream_options": {"include_usage": True}})
    sent = time.perf_counter()
    conn.request("POST", "/v1/chat/completions", body, {"Content-Type": "application/json"})
    response = conn.getresponse()
    if response.status != 200:
        raise RuntimeError(f"HTTP {response.status}: {response.read()[:300]!r}")
    first = last = None
    text, usage = "", None
    for raw in response:
        line = raw.decode().strip()
        if not line.startswith("data: ") or line == "data: [DONE]":
            continue
        chunk = json.loads(line[6:])
        if chunk.get("usage") and not chunk.get("choices"):
            usage = chunk["usage"]
        for choice in chunk.get("choices", []):
            if choice["delta"].get("content"):
                first = first or time.perf_counter()
                last = time.perf_counter()
                text += choice["delta"]["content"]
    conn.close()
    first, last = first or time.perf_counter(), last or time.perf_counter()
    n = usage["completion_tokens"]
    return {"text": text, "ttft": first - sent, "tokens": n, "tps": (n - 1) / (last - first) if n > 1 and last > first else 0.0,
            "prompt": usage["prompt_tokens"], "cached": usage["prompt_tokens_details"]["cached_tokens"]}


def report(result: dict) -> str:
    ks = sorted({int(k.split("_")[0][1:]) for k in result})
    rows = []
    for k in ks:
        for phase in ("fresh", "restart"):
            get = lambda name: result.get(f"k{k}_{phase}_{name}")  # noqa: E731
            rows.append([k, phase, get("turns"), get("prompt_tokens"), get("cached_tokens"), get("ttft_ms"),
                         get("client_tps"), get("aggregate_tps")])
    return common.table(["K", "phase", "turns", "prompt tok", "cached tok", "TTFT ms", "tok/s client",
                         "tok/s all"], rows, "medians over turns; machine shared and noisy")
