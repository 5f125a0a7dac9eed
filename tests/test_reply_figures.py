"""Replies keep their exact token ids and honest figures: ttft from the user's send, disk loads on open."""

from __future__ import annotations

import pytest

from app.catalog import Catalog
from app.catalog.message_tokens import token_ids_of
from app.engine import commands as cmd
from app.engine import events as ev
from app.model.chat_tokenizer import ChatTokenizer
from app.model.loader import model_fingerprint
from tests.engine_helpers import EngineRunner, write_persona


@pytest.fixture
def personas_dir(tmp_path):
    folder = tmp_path / "personas"
    write_persona(folder, "tester")
    write_persona(folder, "rambler", max_tokens=160)
    return folder


def new_conversation(persona_id="tester") -> int:
    with Catalog() as catalog:
        return catalog.create_conversation(persona_id)


def test_a_long_reply_that_re_encodes_differently_is_reused_whole(runner, tiny_model_dir):
    tok = ChatTokenizer(tiny_model_dir)
    cid = new_conversation("rambler")
    wild = cmd.Sampling(temperature=1.0, top_p=1.0, max_tokens=160, seed=7)  # random tokens: BPE merges differ
    first, _ = runner.run(cmd.Generate(cid, "Tell me a long story", wild))
    assert isinstance(first, ev.ReplyFinished), first
    with Catalog() as catalog:
        stored = token_ids_of(catalog, [first.message_id], model_fingerprint(tiny_model_dir))
    ids = stored[first.message_id]
    assert len(ids) == first.stats.generated_tokens - (1 if len(ids) < first.stats.generated_tokens else 0)
    assert tok.decode_reply(ids) == first.text
    assert tok.encode(first.text) != ids, "the test needs a reply whose text re-encodes to other tokens"
    second, _ = runner.run(cmd.Generate(cid, "And then?", wild))
    whole_first = first.stats.reused_tokens + first.stats.prefilled_tokens + len(ids)
    assert second.stats.reused_tokens >= whole_first - 1, (second.stats, whole_first)


def test_ttft_counts_the_time_a_message_waited_in_the_queue(runner):
    busy, waiting = new_conversation("rambler"), new_conversation("tester")
    runner.engine.submit(cmd.Generate(busy, "Talk for a while"))
    runner.engine.submit(cmd.Generate(waiting, "hi"))
    finished = {}
    while len(finished) < 2:
        event = runner.until((ev.ReplyFinished, ev.EngineFailed))
        assert isinstance(event, ev.ReplyFinished), event
        finished[event.conversation_id] = event
    first, second = finished[busy], finished[waiting]
    first_ms = first.stats.ttft_ms + first.stats.generated_tokens / max(first.stats.decode_tps, 1e-9) * 1000
    assert second.stats.queued_ms > 0.5 * first_ms, (second.stats, first.stats)
    assert second.stats.ttft_ms > second.stats.queued_ms


def test_a_cache_read_from_disk_on_opening_is_reported_with_its_time(tiny_model_dir, personas_dir):
    cid = new_conversation()
    before = EngineRunner(tiny_model_dir, personas_dir)
    before.run(cmd.Generate(cid, "Remember this"))
    before.close()
    after = EngineRunner(tiny_model_dir, personas_dir)
    try:
        after.engine.submit(cmd.Prefetch(cid))  # the sidebar prefetches before the tab opens
        after.engine.submit(cmd.Open(cid))
        opened = after.until(ev.ConversationOpened)
        reply, _ = after.run(cmd.Generate(cid, "Do you remember?"))
        again, _ = after.run(cmd.Generate(cid, "And now?"))
    finally:
        after.close()
    assert opened.cache == "disk" and opened.load_ms > 0 and opened.tokens > 0
    assert reply.stats.cache == "ram" and reply.stats.opened_from == "disk" and reply.stats.open_ms > 0
    assert again.stats.opened_from == "" and again.stats.cache == "ram"
