"""`parley bench peer`: Parley and llama.cpp side by side on the same GGUF, every measurement in a fresh process.

Parley's half runs the app's own command, `parley chat ... --json`, in a new
process per measurement (temporary PARLEY_HOME, temperature 0, the bundled
`assistant` persona); llama.cpp's half runs `peer_llama.py` under the Python
that has llama-cpp-python (`--peer-python PATH`, else this interpreter when
`llama_cpp` is importable here; never a dependency of Parley, see the README).
The two are interleaved measurement by measurement, for `--rounds` rounds
(default 5); the table shows medians and the ratio Parley / llama.cpp.

Figures (ttft: Parley's `ttft_ms - queued_ms`, i.e. from the moment the turn
starts, the model load excluded; llama.cpp's likewise after `Llama(...)`):
- prefill tok/s at 1K and 4K: Parley `prefilled_tokens / ttft` of a new
  conversation whose prompt has that many tokens; llama.cpp evaluates the same
  number of tokens of the same text (`context tokens / ttft`);
- decode tok/s at 1K and 4K: `decode_tps` of the same runs (up to 64 tokens);
  llama.cpp generates as many tokens as Parley did;
- resume at 4K: a new process continues the 4K conversation with a short
  question: Parley reads its 4-bit cache from disk (ttft); llama.cpp loads the
  state saved by an earlier process (`llama_state_save_file`: KV cache plus the
  last token's logits only) with q4_0 K/V and with f16 K/V, evaluates the
  question, samples (ttft);
- state on disk: Parley's block and tail files of that conversation; llama.cpp's state files;
- start-up: `parley chat assistant hi` wall time minus its ttft; llama.cpp: the
  same for a process that loads the model and answers "hi" with one token.

`--only GROUP` (repeatable: `startup`, `prefill` (prefill and decode), `resume`)
measures only those rows. `--only resume` alone prefills the largest context
once on each side, untimed, keeps a copy of Parley's home, and puts that copy
back before every round's resume: each round resumes the same 4K conversation
in a new process, as a full round does, in seconds instead of a minute.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from app.bench import common

CONTEXTS = (1024, 4096)
DECODE_TOKENS = 64
ROUNDS = 5
PERSONA = "assistant"
QUESTION = "In one sentence, what is this text about?"
STEP_TIMEOUT_S = 600
PEER_SCRIPT = Path(__file__).with_name("peer_llama.py")


GROUPS = ("startup", "prefill", "resume")  # what `--only` chooses from


@dataclasses.dataclass(frozen=True)
class Figure:
    """One row of the table: a key into the per-round samples of each side."""

    key: str
    label: str
    parley: str
    peer: str | None  # None: no llama.cpp counterpart

    @property
    def group(self) -> str:
        """The `--only` group whose measurement gives this row."""
        if self.key.startswith(("prefill", "decode")):
            return "prefill"
        return "startup" if self.key.startswith("startup") else "resume"


def figures(contexts=CONTEXTS) -> list[Figure]:
    small, big = _k(contexts[0]), _k(contexts[-1])
    return [
        Figure("prefill_small", f"prefill tok/s at {small} (app path: prefilled_tokens / ttft)",
               f"prefill_tps_{contexts[0]}", f"prefill_tps_{contexts[0]}"),
        Figure("prefill_big", f"prefill tok/s at {big}", f"prefill_tps_{contexts[-1]}", f"prefill_tps_{contexts[-1]}"),
        Figure("decode_small", f"decode tok/s at {small} (decode_tps)", f"decode_tps_{contexts[0]}", f"decode_tps_{contexts[0]}"),
        Figure("decode_big", f"decode tok/s at {big}", f"decode_tps_{contexts[-1]}", f"decode_tps_{contexts[-1]}"),
        Figure("resume_q4_0", f"resume a {big} conversation in a new process, ttft ms (llama.cpp: q4_0 KV state)",
               "resume_ms", "resume_ms_q4_0"),
        Figure("resume_f16", "  same, llama.cpp f16 KV state", "resume_ms", "resume_ms_f16"),
        Figure("resume_floor", "  floor: reading Parley's files as its restore does (page cache), ms",
               "resume_floor_ms", None),
        Figure("state_q4_0", "state on disk for that conversation, MB (llama.cpp: q4_0)", "state_mb", "state_mb_q4_0"),
        Figure("state_f16", "  same, llama.cpp f16", "state_mb", "state_mb_f16"),
        Figure("startup", "`chat` wall time minus its ttft, s (start-up and exit)", "startup_s", "startup_s"),
        Figure("startup_printed", "  same, minus the ttft `parley chat` prints (from the send: model load inside)",
               "wall_minus_printed_ttft_s", None),
    ]


def _k(n: int) -> str:
    return f"{n // 1024}K" if n % 1024 == 0 else str(n)


# -- the part --------------------------------------------------------------------------------------------------

def run(lm, args) -> dict:
    """The part's entry point (`lm` is not used: every measurement loads the model in its own process)."""
    rounds = max(1, int(getattr(args, "rounds", None) or (1 if common.quick(args) else ROUNDS)))
    contexts = tuple(getattr(args, "peer_contexts", None) or CONTEXTS)
    groups = chosen_groups(getattr(args, "only", None))
    decode = int(getattr(args, "peer_decode_tokens", None) or DECODE_TOKENS)
    say = lambda m: common.log(args, m)  # noqa: E731
    started = time.perf_counter()
    with common.temp_home(prefix="parley-peer-") as home, tempfile.TemporaryDirectory(prefix="parley-peer-states-") as tmp:
        parley = ParleyHalf(home, getattr(args, "model", None), decode)
        parley.warm_up()
        peer_python, why = peer_interpreter(getattr(args, "peer_python", None))
        peer = LlamaHalf(peer_python, parley.gguf(), Path(tmp), decode) if peer_python else None
        if peer is not None:
            why = peer.probe()
            if why:
                peer = None
        if why:
            say(f"peer: llama.cpp half skipped: {why}")
        if os.environ.get("PYTHONDONTWRITEBYTECODE"):
            say("peer: note: PYTHONDONTWRITEBYTECODE is set, so Parley's modules are compiled again at every start "
                "(a user's install keeps .pyc files): unset it for the start-up a user sees")
        if "resume" in groups and "prefill" not in groups:
            prepare_resume(parley, peer, contexts[-1])
            say(f"peer: the {contexts[-1]}-token conversation to resume is stored ({time.perf_counter() - started:.0f} s)")
        samples = {"parley": {}, "peer": {}}
        for r in range(rounds):
            one_round(parley, peer, contexts, samples, groups)
            say(f"  peer round {r + 1}/{rounds} done ({time.perf_counter() - started:.0f} s)")
    return summarise(samples, contexts, rounds, why, peer_setup=peer.setup if peer else None,
                     seconds=time.perf_counter() - started, groups=groups)


def chosen_groups(only) -> tuple[str, ...]:
    """The groups `--only` names (every group without it), in the table's order."""
    if not only:
        return GROUPS
    unknown = sorted(set(only) - set(GROUPS))
    if unknown:
        raise ValueError(f"--only {unknown[0]!r}: choose from {', '.join(GROUPS)}")
    return tuple(g for g in GROUPS if g in only)


def prepare_resume(parley: "ParleyHalf", peer: "LlamaHalf | None", n: int) -> None:
    """Without the prefill rounds: store the conversation (and llama.cpp's states) to resume once, untimed."""
    got = parley.prefill(n)
    parley.keep_home()
    if peer:
        peer.prefill(n, got["prompt_tokens"], got["generated_tokens"], save=True)


def one_round(parley: "ParleyHalf", peer: "LlamaHalf | None", contexts, samples: dict, groups=GROUPS) -> None:
    """One of each measurement, Parley's then llama.cpp's, interleaved; samples appended per key."""
    def add(side: str, values: dict) -> None:
        for key, value in values.items():
            samples[side].setdefault(key, []).append(value)

    if "startup" in groups:
        add("parley", parley.startup())
        if peer:
            add("peer", peer.startup())
    if "prefill" in groups:
        for n in contexts:
            got = parley.prefill(n)
            add("parley", got["figures"])
            if peer:
                add("peer", peer.prefill(n, got["prompt_tokens"], got["generated_tokens"],
                                         save="resume" in groups and n == contexts[-1]))
    if "resume" in groups:
        add("parley", parley.resume())
        if peer:
            add("peer", peer.resume())


def summarise(samples: dict, contexts, rounds: int, skipped: str | None, peer_setup=None, seconds=0.0,
              groups=GROUPS) -> dict:
    """Medians per figure and the ratio Parley / llama.cpp (None where a side has no value)."""
    rows = []
    for f in (f for f in figures(contexts) if f.group in groups):
        p = _median(samples["parley"].get(f.parley))
        q = _median(samples["peer"].get(f.peer)) if f.peer else None
        rows.append({"figure": f.key, "label": f.label, "parley": p, "llama_cpp": q,
                     "ratio": round(p / q, 2) if p is not None and q else None})
    return {"rounds": rounds, "contexts": list(contexts), "groups": list(groups), "rows": rows, "samples": samples,
            "peer_skipped": skipped, "peer_setup": peer_setup, "setup": active_setup(), "seconds": round(seconds, 1),
            "bytecode_cache": not os.environ.get("PYTHONDONTWRITEBYTECODE")}


def active_setup() -> dict:
    """What was active in this process (BLAS, device, CPU...): the one place that asks."""
    return common.machine()


def _median(values):
    return round(common.median(values), 3) if values else None


def report(result: dict) -> str:
    head = ["figure", "Parley", "llama.cpp", "Parley / llama.cpp"]
    rows = [[r["label"], _cell(r["parley"]), _cell(r["llama_cpp"]), "" if r["ratio"] is None else f"{r['ratio']}x"]
            for r in result["rows"]]
    title = (f"Parley vs llama.cpp, same GGUF, fresh process per measurement: medians of {result['rounds']} "
             f"interleaved rounds ({result['seconds']} s)")
    text = common.table(head, rows, title)
    if result.get("peer_skipped"):
        text += f"\nllama.cpp half skipped: {result['peer_skipped']}"
    return text


def _cell(value) -> str:
    return "-" if value is None else common.fmt(float(value))


# -- Parley's half ----------------------------------------------------------------------------------------------

class ParleyHalf:
    """`parley chat` in fresh processes under one temporary PARLEY_HOME."""

    def __init__(self, home: Path, model: str | None, decode: int):
        self.home, self.model, self.decode = home, model, decode
        self.overhead = 0  # prompt tokens around the user's message (system prompt, template)
        self.tokenizer = None
        self.kept: Path | None = None  # a copy of the home to resume from (`keep_home`)

    def chat(self, message: str, *options: str) -> tuple[dict, float]:
        """One `parley chat --json` process: (its JSON, its wall time in seconds)."""
        cmd = [sys.executable, "-m", "app", *(["--model", self.model] if self.model else []), "chat", PERSONA,
               message, "--json", "--temperature", "0", "--seed", "0", *options]
        env = {**os.environ, "PARLEY_HOME": str(self.home)}
        t0 = time.perf_counter()
        done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=STEP_TIMEOUT_S)
        wall = time.perf_counter() - t0
        if done.returncode != 0:
            raise RuntimeError(f"parley chat failed ({done.returncode}): {done.stderr.strip()[-600:]}")
        return json.loads(done.stdout.strip().splitlines()[-1]), wall

    def warm_up(self) -> None:
        """First start in this home (converts the embedded model once); learns the prompt's overhead."""
        from app.model.chat_tokenizer import ChatTokenizer
        from app.model.loader import resolve_model_folder

        reply, _ = self.chat("hi", "--new", "--max-tokens", "1")
        self.overhead = reply["reused_tokens"] + reply["prefilled_tokens"] - 1
        self.tokenizer = ChatTokenizer(resolve_model_folder(self.model))

    def gguf(self) -> Path:
        from app.model.loader import embedded_gguf

        if self.model and self.model.endswith(".gguf"):
            return Path(self.model)
        return embedded_gguf()

    def startup(self) -> dict:
        reply, wall = self.chat("hi", "--new", "--max-tokens", "1")
        return {"startup_s": round(wall - turn_ttft_s(reply), 4), "wall_minus_printed_ttft_s":
                round(wall - reply["ttft_ms"] / 1000, 4)}

    def prefill(self, n: int) -> dict:
        message = self.tokenizer.decode(common.text_tokens(self, max(1, n - self.overhead)))
        reply, _ = self.chat(message, "--new", "--max-tokens", str(self.decode))
        self.conversation = reply["conversation"]
        prompt = reply["reused_tokens"] + reply["prefilled_tokens"]
        figures = {f"prefill_tps_{n}": round(reply["prefilled_tokens"] / turn_ttft_s(reply), 2),
                   f"decode_tps_{n}": reply["decode_tps"], f"prompt_tokens_{n}": prompt}
        return {"figures": figures, "prompt_tokens": prompt, "generated_tokens": reply["generated_tokens"]}

    def keep_home(self) -> None:
        """Copy the home as the last prefill left it: every `resume` then continues that same conversation."""
        self.kept = self.home.with_name(self.home.name + "-kept")
        shutil.rmtree(self.kept, ignore_errors=True)
        shutil.copytree(self.home, self.kept)

    def put_back_home(self) -> None:
        """The kept home back in place (files rewritten, so in the page cache, as a prefill leaves them)."""
        shutil.rmtree(self.home)
        shutil.copytree(self.kept, self.home)

    def resume(self) -> dict:
        """Continue the last (largest) conversation in a new process; its state bytes measured first."""
        if self.kept is not None:
            self.put_back_home()
        files = conversation_files(self.home, self.conversation)
        state, floor_s = common.raw_read(files)  # the restore's own prefetching read: the floor of a resume
        reply, _ = self.chat(QUESTION, "--max-tokens", "1")
        if reply["cache"] != "disk" or reply["conversation"] != self.conversation:
            raise RuntimeError(f"the resume did not read the conversation's cache from disk: {reply}")
        return {"resume_ms": round(turn_ttft_s(reply) * 1000, 2), "state_mb": round(state / 1e6, 3),
                "resume_floor_ms": round(floor_s * 1000, 2), "resume_reused_tokens": reply["reused_tokens"]}


def turn_ttft_s(reply: dict) -> float:
    """The turn's own ttft: `parley chat` counts from the message's send, which waits for the model to load."""
    return (reply["ttft_ms"] - reply.get("queued_ms", 0.0)) / 1000


def conversation_files(home: Path, conversation_id: int) -> list[Path]:
    """The block and tail files of one conversation's stored cache (from its catalog row)."""
    from app.catalog import Catalog
    from app.catalog.caches import CacheStore, conversation_key

    catalog = Catalog(home / "catalog.db")
    try:
        row = CacheStore(catalog).record(conversation_key(conversation_id))
    finally:
        catalog.close()
    if row is None:
        raise RuntimeError(f"conversation {conversation_id} has no stored cache in {home}")
    root = home / "caches"
    return [root / "blocks" / h[:2] / f"{h}.safetensors" for h in row.chain] + [root / "tails" / row.tail_file]


# -- llama.cpp's half ---------------------------------------------------------------------------------------

def peer_interpreter(given: str | None) -> tuple[str | None, str | None]:
    """(the Python to run llama.cpp's half with, None) or (None, why there is none)."""
    if given:
        if not shutil.which(given) and not Path(given).is_file():
            return None, f"--peer-python {given} does not exist"
        return given, None
    if importlib.util.find_spec("llama_cpp") is not None:
        return sys.executable, None
    return None, ("llama-cpp-python is not importable here; install it in its own venv (README, "
                  "'Comparing with llama.cpp') and pass --peer-python PATH")


class LlamaHalf:
    """`peer_llama.py` under `python`, one process per measurement; state files in `folder`."""

    def __init__(self, python: str, gguf: Path, folder: Path, decode: int):
        self.python, self.gguf, self.folder, self.decode = python, gguf, folder, decode
        self.setup: dict | None = None
        self.states: dict[str, Path] = {}

    def call(self, mode: str, *options: str) -> tuple[dict, float]:
        cmd = [self.python, str(PEER_SCRIPT), mode, "--gguf", str(self.gguf), "--text", str(common.TEXT), *options]
        t0 = time.perf_counter()
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=STEP_TIMEOUT_S)
        wall = time.perf_counter() - t0
        if done.returncode != 0:
            detail = done.stderr.strip()[-600:]
            raise RuntimeError(f"llama.cpp {mode} failed: {describe_exit(done.returncode)}" + (f": {detail}" if detail else ""))
        return json.loads(done.stdout.strip().splitlines()[-1]), wall

    def probe(self) -> str | None:
        """None when this llama.cpp build runs here, else why not (e.g. a build for a newer CPU)."""
        try:
            self.setup, _ = self.call("probe")
        except (RuntimeError, OSError, ValueError, subprocess.TimeoutExpired) as exc:
            return str(exc)
        return None

    def startup(self) -> dict:
        got, wall = self.call("chat")
        return {"startup_s": round(wall - got["ttft_s"], 4)}

    def prefill(self, n: int, tokens: int, generated: int, save: bool) -> dict:
        """The same token counts as Parley's run; at the largest context, also the f16 state (and once the q4_0 one)."""
        decode = generated if generated >= 8 else self.decode
        opts = ["--n", str(tokens), "--decode", str(decode)]
        if save:
            self.states["f16"] = self.folder / "state-f16.bin"
            opts += ["--save", str(self.states["f16"])]
        got, _ = self.call("prefill", *opts)
        out = {f"prefill_tps_{n}": got["prefill_tps"], f"decode_tps_{n}": got["decode_tps"]}
        if save:
            out["state_mb_f16"] = round(got["state_bytes"] / 1e6, 3)
            if "q4_0" not in self.states:  # its own context type: made once, by an untimed process
                self.states["q4_0"] = self.folder / "state-q4_0.bin"
                self.call("prefill", "--kv", "q4_0", *opts[:4], "--save", str(self.states["q4_0"]))
        return out

    def resume(self) -> dict:
        out = {}
        for kv, path in self.states.items():
            got, _ = self.call("resume", "--kv", kv, "--state", str(path))
            out[f"resume_ms_{kv}"] = round(got["ttft_s"] * 1000, 2)
            out[f"state_mb_{kv}"] = round(got["state_bytes"] / 1e6, 3)
        return out


def describe_exit(code: int) -> str:
    """A process's exit status in words (a negative one is the signal that killed it)."""
    if code < 0:
        import signal

        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = str(-code)
        hint = " (this llama.cpp build uses instructions this CPU lacks, e.g. AVX-512)" if name == "SIGILL" else ""
        return f"killed by {name}{hint}"
    return f"exit status {code}"
