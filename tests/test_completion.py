"""The engine's `Complete` command (app.engine.completion): reuse by content across every cache, RAM and disk."""

from __future__ import annotations

import pytest

from app.engine import commands as cmd
from app.engine import events as ev
from app.kvstore.prefix_lookup import tail_tokens_of
from app.model.chat_tokenizer import ChatTokenizer
from app.personas import load_personas
from app.personas.preamble import preamble_messages
from tests.engine_helpers import EngineRunner, write_persona


@pytest.fixture
def personas_dir(tmp_path):
    folder = tmp_path / "personas"
    write_persona(folder, "ada", max_tokens=4)
    return folder


def complete(runner: EngineRunner, request_id: str, ids: list[int], session=None, max_tokens: int = 4, n: int = 1):
    runner.engine.submit(cmd.Complete(request_id, tuple(ids), cmd.CompletionOptions(max_tokens=max_tokens,
                                                                                     temperature=0.0, n=n), session))
    started = runner.until((ev.CompletionStarted, ev.CompletionFailed), 120)
    assert isinstance(started, ev.CompletionStarted), getattr(started, "message", started)
    finished = [runner.until((ev.CompletionFinished,), 120) for _ in range(n)]
    return started, finished


def long_ids(tok: ChatTokenizer, n: int, seed: str = "") -> list[int]:
    ids: list[int] = []
    i = 0
    while len(ids) < n:
        ids += tok.encode(f"{seed} line {i}: the quick brown fox jumps over the lazy dog. ")
        i += 1
    return ids[:n]


def test_a_prompt_sharing_a_persona_preamble_reuses_the_preamble_cache(tiny_model_dir, personas_dir):
    """The app's chat made the persona's preamble cache; a server request that starts the same way reuses it."""
    from app.catalog import Catalog

    tok = ChatTokenizer(tiny_model_dir)
    persona = load_personas([personas_dir]).personas["ada"]
    preamble = preamble_messages(persona)
    preamble_ids = tok.encode_chat(preamble, add_generation_prompt=False)
    runner = EngineRunner(tiny_model_dir, personas_dir)
    try:
        with Catalog() as catalog:
            conv = catalog.create_conversation("ada")
        final, _ = runner.run(cmd.Generate(conv, "Hello Ada"))
        assert isinstance(final, ev.ReplyFinished)
        ids = tok.encode_chat(preamble + [{"role": "user", "content": "A different question entirely?"}])
        started, _ = complete(runner, "r1", ids)
        assert started.cached_tokens >= len(preamble_ids)
    finally:
        runner.close()
    runner = EngineRunner(tiny_model_dir, personas_dir)  # a restart: now from disk
    try:
        ids = tok.encode_chat(preamble + [{"role": "user", "content": "Yet another opening line."}])
        started, _ = complete(runner, "r2", ids)
        assert started.cached_tokens >= len(preamble_ids)
        assert started.source == "disk"
    finally:
        runner.close()


def test_long_prompt_restored_from_disk_by_block_chain_and_tail(tiny_model_dir, personas_dir, parley_home):
    tok = ChatTokenizer(tiny_model_dir)
    ids = long_ids(tok, 700)  # two sealed blocks and a tail
    runner = EngineRunner(tiny_model_dir, personas_dir)
    try:
        started, finished = complete(runner, "a", ids)
        assert started.cached_tokens == 0
    finally:
        runner.close()
    tails = list((parley_home / "caches" / "tails").glob("srv*"))
    assert tails and any(len(tail_tokens_of(t) or []) > 0 for t in tails)
    runner = EngineRunner(tiny_model_dir, personas_dir)
    try:
        more = ids + tok.encode(" and then the fox slept.")
        started, _ = complete(runner, "b", more)
        assert started.source == "disk"
        assert started.cached_tokens >= 700  # the prompt and what was generated after it, as far as they agree
        changed = [ids[0] + 1 if ids[0] + 1 < tok.vocab_size else ids[0] - 1] + ids[1:]
        started, _ = complete(runner, "c", changed)
        assert started.cached_tokens == 0  # one different first token: nothing of the other prompt is used
    finally:
        runner.close()


def test_branching_requests_keep_the_first_cache_whole(tiny_model_dir, personas_dir):
    """A request sharing only part of a server cache gets a copy; the original still serves its own continuation."""
    tok = ChatTokenizer(tiny_model_dir)
    base = long_ids(tok, 300, "base")
    a = base + long_ids(tok, 120, "branch a")
    b = base + long_ids(tok, 120, "branch b")
    runner = EngineRunner(tiny_model_dir, personas_dir)
    try:
        complete(runner, "a1", a)
        started_b, _ = complete(runner, "b1", b)
        assert started_b.cached_tokens >= 300
        started_a, _ = complete(runner, "a2", a + tok.encode(" more"))
        assert started_a.cached_tokens >= len(a)
    finally:
        runner.close()


def test_session_hint_names_the_cache(tiny_model_dir, personas_dir, parley_home):
    from app.catalog import Catalog
    from app.engine.completion import session_key

    tok = ChatTokenizer(tiny_model_dir)
    runner = EngineRunner(tiny_model_dir, personas_dir)
    try:
        complete(runner, "h1", long_ids(tok, 50, "hinted"), session="client-7")
    finally:
        runner.close()
    with Catalog() as catalog:
        keys = [r["key"] for r in catalog.query("select key from caches")]
    assert session_key("client-7") in keys


def test_alternatives_and_cancel(tiny_model_dir, personas_dir):
    tok = ChatTokenizer(tiny_model_dir)
    runner = EngineRunner(tiny_model_dir, personas_dir)
    try:
        started, finished = complete(runner, "n3", long_ids(tok, 40, "alts"), n=3)
        assert sorted(f.index for f in finished) == [0, 1, 2]
        runner.engine.submit(cmd.CancelCompletion("gone"))
        runner.engine.submit(cmd.Complete("gone", tuple(long_ids(tok, 40, "x")), cmd.CompletionOptions(max_tokens=5)))
        failed = runner.until((ev.CompletionFailed, ev.CompletionFinished), 60)
        assert isinstance(failed, ev.CompletionFailed) and "cancelled" in failed.message
    finally:
        runner.close()


def test_concurrent_requests_decode_together_and_match_solo_replies(tiny_model_dir, personas_dir, tmp_path, monkeypatch):
    """Requests queued while one decodes join its batch (RaggedDecoder); greedy replies equal the solo ones."""
    tok = ChatTokenizer(tiny_model_dir)
    prompts = [long_ids(tok, 60 + 20 * i, f"client {i}") for i in range(3)]
    bias = ((0, -1e9), (1, -1e9), (2, -1e9))  # no end of turn: every reply runs its full length
    options = cmd.CompletionOptions(max_tokens=24, temperature=0.0, logit_bias=bias)

    def replies(together: bool) -> tuple[dict, dict]:
        runner = EngineRunner(tiny_model_dir, personas_dir)
        texts, rows = {}, {}
        try:
            for i, ids in enumerate(prompts):
                runner.engine.submit(cmd.Complete(f"r{i}", tuple(ids), options))
                if not together:
                    done = runner.until((ev.CompletionFinished, ev.CompletionFailed), 120)
                    texts[done.request_id], rows[done.request_id] = done.text, done.batch_rows
            while len(texts) < len(prompts):
                done = runner.until((ev.CompletionFinished, ev.CompletionFailed), 120)
                texts[done.request_id], rows[done.request_id] = done.text, done.batch_rows
        finally:
            runner.close()
        return texts, rows

    monkeypatch.setenv("PARLEY_HOME", str(tmp_path / "solo"))
    solo, solo_rows = replies(together=False)
    monkeypatch.setenv("PARLEY_HOME", str(tmp_path / "together"))
    together, together_rows = replies(together=True)
    assert set(solo_rows.values()) == {1}
    assert max(together_rows.values()) >= 2
    assert together == solo


def test_a_damaged_chat_cache_is_borrowed_never_dropped(tiny_model_dir, personas_dir, parley_home):
    """The server only reads a chat's cache: if it cannot be restored, the chat's row stays (its owner decides)."""
    from app.catalog import Catalog

    tok = ChatTokenizer(tiny_model_dir)
    persona = load_personas([personas_dir]).personas["ada"]
    text = " ".join(f"word{i}" for i in range(200))
    runner = EngineRunner(tiny_model_dir, personas_dir)
    try:
        with Catalog() as catalog:
            conv = catalog.create_conversation("ada")
        final, _ = runner.run(cmd.Generate(conv, text))
        assert isinstance(final, ev.ReplyFinished)
    finally:
        runner.close()
    with Catalog() as catalog:
        row = next(iter(catalog.query("select chain from caches where key = ?", [f"conv:{conv}"])))
    blocks = __import__("json").loads(row["chain"])
    assert blocks, "the chat must have a sealed block for this test"
    first = blocks[0]
    (parley_home / "caches" / "blocks" / first[:2] / f"{first}.safetensors").unlink()
    runner = EngineRunner(tiny_model_dir, personas_dir)
    try:
        ids = tok.encode_chat(preamble_messages(persona) + [{"role": "user", "content": text}])
        started, _ = complete(runner, "borrow", ids)
        assert started.cached_tokens < 256  # the damaged chain was not used
        started, _ = complete(runner, "again", ids + tok.encode(" more"))
        assert started.cached_tokens >= len(ids) - 1  # its own cache now; the broken one is skipped
    finally:
        runner.close()
    with Catalog() as catalog:
        assert list(catalog.query("select key from caches where key = ?", [f"conv:{conv}"]))
