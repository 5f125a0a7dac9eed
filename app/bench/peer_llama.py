"""The llama.cpp half of `parley bench peer`: one measurement per process, printed as one JSON line.

Run by `app.bench.peer` as `PEER_PYTHON peer_llama.py MODE ...` in a fresh
process for every measurement, usually from a separate virtual environment
that holds llama-cpp-python (which Parley never depends on). So this file
imports nothing of Parley's and only the standard library besides `llama_cpp`.

Modes (all greedy, the same GGUF, `--n-ctx` 8192 like Parley's window):
- `probe`: load the model and evaluate a few tokens (does this build run on this CPU?).
- `prefill`: evaluate the first `--n` tokens of `--text` (512-token batches, as Parley
  prefills), sample the first token (its ttft, excluding the model load), then
  `--decode` tokens in all one at a time (decode tok/s = (decode - 1) / time after
  the first token, Parley's `decode_tps`). `--save PATH` then writes the context's
  state (KV cache of every evaluated token, the last token's logits only: the
  "logits trimmed" state) with `llama_state_save_file`.
- `resume`: load the model, then time `llama_state_load_file` + evaluating the
  question + sampling the first token: resuming a saved conversation in a new process.
- `chat`: what `parley chat PERSONA "hi"` does, with llama-cpp-python's chat
  completion (one token); the parent subtracts the printed ttft from the
  process's wall time.
`--kv q4_0` stores K and V as q4_0 (which needs flash attention in llama.cpp); `f16` is its default.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import sys
import time

QUESTION = "\nIn one sentence, what is this text about?"


def main(argv=None) -> int:
    args = parse(argv)
    started = time.perf_counter()
    llm = load(args)
    loaded = time.perf_counter() - started
    result = MODES[args.mode](llm, args)
    print(json.dumps({"mode": args.mode, "kv": args.kv, "load_s": round(loaded, 4), **result}), flush=True)
    return 0


def parse(argv):
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("mode", choices=sorted(MODES))
    p.add_argument("--gguf", required=True)
    p.add_argument("--text", help="the text whose first --n tokens are the context")
    p.add_argument("--n", type=int, default=0, help="context tokens")
    p.add_argument("--decode", type=int, default=1, help="tokens to generate (the first included)")
    p.add_argument("--kv", choices=["f16", "q4_0"], default="f16")
    p.add_argument("--save", help="prefill: write the state here afterwards")
    p.add_argument("--state", help="resume: the state file to load")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--n-ctx", type=int, default=8192)
    return p.parse_args(argv)


def load(args):
    import llama_cpp
    from llama_cpp import Llama

    extra = {}
    if args.kv == "q4_0":
        extra = dict(type_k=llama_cpp.GGML_TYPE_Q4_0, type_v=llama_cpp.GGML_TYPE_Q4_0, flash_attn=True)
    return Llama(model_path=args.gguf, n_ctx=args.n_ctx, n_batch=512, n_threads=args.threads,
                 n_threads_batch=args.threads, logits_all=False, verbose=False, **extra)


def probe(llm, args) -> dict:
    import llama_cpp

    llm.eval(llm.tokenize(b"Hello there", add_bos=True))
    info = llama_cpp.llama_print_system_info()
    return {"ok": True, "llama_cpp": llama_cpp.__version__,
            "system_info": info.decode(errors="replace") if isinstance(info, bytes) else str(info)}


def context_tokens(llm, args) -> list[int]:
    with open(args.text, encoding="utf-8") as fh:
        ids = llm.tokenize(fh.read().encode("utf-8"), add_bos=False)
    while len(ids) < args.n:
        ids = ids + ids
    return ids[: args.n]


def prefill(llm, args) -> dict:
    ids = context_tokens(llm, args)
    t0 = time.perf_counter()
    llm.eval(ids)
    token = llm.sample(temp=0.0)
    ttft = time.perf_counter() - t0
    t1 = time.perf_counter()
    for _ in range(max(0, args.decode - 1)):
        llm.eval([token])
        token = llm.sample(temp=0.0)
    decode_s = time.perf_counter() - t1
    out = {"context_tokens": len(ids), "ttft_s": round(ttft, 4), "prefill_tps": round(len(ids) / ttft, 2),
           "generated_tokens": args.decode,
           "decode_tps": round((args.decode - 1) / decode_s, 2) if args.decode > 1 and decode_s > 0 else 0.0}
    if args.save:
        out.update(save(llm, args.save))
    return out


def save(llm, path: str) -> dict:
    import llama_cpp

    n = llm.n_tokens
    tokens = (llama_cpp.llama_token * n)(*llm.input_ids[:n].tolist())
    if not llama_cpp.llama_state_save_file(llm.ctx, path.encode(), tokens, n):
        raise SystemExit(f"llama_state_save_file failed for {path}")
    return {"state_tokens": n, "state_bytes": os.path.getsize(path)}


def resume(llm, args) -> dict:
    import llama_cpp

    question = llm.tokenize(QUESTION.encode("utf-8"), add_bos=False)
    capacity = llm.n_ctx()
    tokens = (llama_cpp.llama_token * capacity)()
    count = ctypes.c_size_t(0)
    t0 = time.perf_counter()
    if not llama_cpp.llama_state_load_file(llm.ctx, args.state.encode(), tokens, capacity, ctypes.byref(count)):
        raise SystemExit(f"llama_state_load_file failed for {args.state}")
    n = count.value
    llm.input_ids[:n] = tokens[:n]
    llm.n_tokens = n
    llm.eval(question)
    llm.sample(temp=0.0)
    ttft = time.perf_counter() - t0
    return {"state_tokens": n, "question_tokens": len(question), "ttft_s": round(ttft, 4),
            "state_bytes": os.path.getsize(args.state)}


def chat(llm, args) -> dict:
    t0 = time.perf_counter()
    llm.create_chat_completion(messages=[{"role": "system", "content": "You are a helpful assistant."},
                                         {"role": "user", "content": "hi"}], max_tokens=1, temperature=0.0)
    return {"ttft_s": round(time.perf_counter() - t0, 4)}


MODES = {"probe": probe, "prefill": prefill, "resume": resume, "chat": chat}

if __name__ == "__main__":
    sys.exit(main())
