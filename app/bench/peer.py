"""`parley bench peer` (optional): the same GGUF in llama.cpp, its state saved and restored, same contexts.

Runs only when `llama_cpp` (llama-cpp-python) happens to be importable; it is
never a dependency of Parley. Otherwise the part prints a note and returns
`{"skipped": reason}`.

For each context: cold = `reset()`, `eval()` of the whole prompt (the shipped
text), first token sampled; the state is then taken with `save_state()`;
warm = `load_state()` of that state, `eval()` of the same short question,
first token - the same shape of measurement as `parley bench ttft`. The state
object is kept in RAM (llama-cpp-python has no stable on-disk state format
short of pickling it, which Parley never does), so this compares with Parley's
hot numbers; its size is reported as `state_bytes`.
"""

from __future__ import annotations

import time

from app.bench import common

CONTEXTS = (1024, 2048, 4096, 8192)
QUICK_CONTEXTS = (1024, 2048)


def available() -> str | None:
    """None when llama_cpp can be used, else why not."""
    import importlib.util

    if importlib.util.find_spec("llama_cpp") is None:
        return "llama-cpp-python is not installed (optional; `pip install llama-cpp-python` to compare)"
    return None


def run(lm, args) -> dict:
    why = available()
    if why:
        common.log(args, f"peer: skipped: {why}")
        return {"skipped": why}
    contexts = getattr(args, "peer_contexts", None) or (QUICK_CONTEXTS if common.quick(args) else CONTEXTS)
    return measure(lm, contexts, common.repeats(args), say=lambda m: common.log(args, m))


def measure(lm, contexts, repeats: int = 3, say=print) -> dict:
    import os

    from llama_cpp import Llama

    from app.model.loader import embedded_gguf

    llm = Llama(model_path=str(embedded_gguf()), n_ctx=max(contexts) + 64, n_threads=os.cpu_count() or 1,
                logits_all=False, verbose=False)
    tokens = llm.tokenize(common.TEXT.read_text(encoding="utf-8").encode("utf-8"), add_bos=False)
    question = llm.tokenize(b"\nIn one sentence, what is this text about?", add_bos=False)
    rows = []
    for n in contexts:
        ids = tokens[: min(n, llm.n_ctx() - len(question) - 2) - len(question)]
        cold, warm, size = [], [], 0
        for _ in range(repeats):
            llm.reset()
            t0 = time.perf_counter()
            llm.eval(ids + question)
            llm.sample(temp=0.0)
            cold.append(time.perf_counter() - t0)
            llm.reset()
            llm.eval(ids)
            state = llm.save_state()
            size = int(getattr(state, "llama_state_size", 0) or 0)
            llm.reset()
            t0 = time.perf_counter()
            llm.load_state(state)
            llm.eval(question)
            llm.sample(temp=0.0)
            warm.append(time.perf_counter() - t0)
        rows.append({"context_tokens": len(ids) + len(question), "cold_ms": common.ms(common.median(cold)),
                     "restore_ms": common.ms(common.median(warm)), "state_bytes": size,
                     "speedup": round(common.median(cold) / common.median(warm), 1)})
        say(f"  peer {rows[-1]['context_tokens']} tokens: cold {rows[-1]['cold_ms']} ms, restore {rows[-1]['restore_ms']} ms")
    return {"engine": "llama.cpp (llama-cpp-python)", "rows": rows}


def report(result: dict) -> str:
    if "skipped" in result:
        return f"peer: skipped: {result['skipped']}"
    head = ["context", "cold ms", "state restore + question ms", "speed-up", "state MB"]
    rows = [[r["context_tokens"], r["cold_ms"], r["restore_ms"], f"{r['speedup']}x", r["state_bytes"] / 1e6]
            for r in result["rows"]]
    return common.table(head, rows, "peer: llama.cpp, same GGUF")
