"""The engine thread on the tiny model: token-exact reuse, streaming, cancel, branches, resume."""

from __future__ import annotations

import threading

import pytest

from app.catalog import Catalog
from app.engine import commands as cmd
from app.engine import events as ev
from tests.engine_helpers import EngineRunner, write_persona


@pytest.fixture
def personas_dir(tmp_path):
    folder = tmp_path / "personas"
    write_persona(folder, "tester")
    write_persona(folder, "talker", max_tokens=40)
    return folder


def new_conversation(persona_id="tester") -> int:
    with Catalog() as catalog:
        return catalog.create_conversation(persona_id)


def test_reply_streams_and_is_saved(runner):
    cid = new_conversation()
    final, events = runner.run(cmd.Generate(cid, "Hello there"))
    assert isinstance(final, ev.ReplyFinished) and not final.cancelled
    streamed = "".join(e.text for e in events if isinstance(e, ev.TokensGenerated))
    assert streamed == final.text
    assert final.stats.generated_tokens == 6 and final.stats.cache == "none"
    with Catalog() as catalog:
        path = catalog.current_path(cid)
    assert [m.role for m in path] == ["user", "assistant"] and path[1].content == final.text


def test_second_turn_reuses_everything_before_it(runner, tiny_model_dir):
    from app.model.chat_tokenizer import ChatTokenizer

    new_turn = ChatTokenizer(tiny_model_dir).encode("<|im_end|>\n<|im_start|>user\nAnd again<|im_end|>\n<|im_start|>assistant\n")
    cid = new_conversation()
    first, _ = runner.run(cmd.Generate(cid, "Hello there"))
    second, _ = runner.run(cmd.Generate(cid, "And again"))
    assert second.stats.cache == "ram"
    whole_first = first.stats.reused_tokens + first.stats.prefilled_tokens + first.stats.generated_tokens
    # everything up to the end of the first reply is reused; only the new turn's tokens are prefilled
    assert second.stats.reused_tokens >= whole_first - 1
    assert second.stats.prefilled_tokens <= len(new_turn) + 1


def test_new_conversation_starts_from_the_persona_preamble(runner):
    runner.run(cmd.Generate(new_conversation(), "First conversation"))
    final, _ = runner.run(cmd.Generate(new_conversation(), "Second conversation"))
    assert final.stats.cache in ("ram", "disk")
    assert final.stats.reused_tokens > 10  # the preamble, computed once per persona


def test_regenerate_keeps_the_alternative(runner):
    cid = new_conversation("talker")
    first, _ = runner.run(cmd.Generate(cid, "Tell me something", cmd.Sampling(temperature=1.0, max_tokens=8, seed=1)))
    again, _ = runner.run(cmd.Regenerate(cid, cmd.Sampling(temperature=1.0, max_tokens=8, seed=2)))
    assert again.stats.reused_tokens > 0 and again.stats.prefilled_tokens <= 1
    with Catalog() as catalog:
        alternatives = catalog.alternatives(again.message_id)
        path = catalog.current_path(cid)
    assert {m.id for m in alternatives} == {first.message_id, again.message_id}
    assert path[-1].id == again.message_id


def test_edit_and_resend_branches(runner):
    cid = new_conversation()
    runner.run(cmd.Generate(cid, "Original question"))
    runner.run(cmd.Generate(cid, "Follow-up"))
    with Catalog() as catalog:
        first_user = catalog.current_path(cid)[0]
    final, _ = runner.run(cmd.EditAndResend(cid, first_user.id, "Edited question"))
    assert isinstance(final, ev.ReplyFinished)
    with Catalog() as catalog:
        path = catalog.current_path(cid)
        assert [m.content for m in path if m.role == "user"] == ["Edited question"]
        assert len(catalog.alternatives(path[0].id)) == 2  # the original survives as a branch


def test_cancel_stops_within_a_token_and_stays_consistent(runner):
    cid = new_conversation("talker")
    stop_after_first = threading.Event()

    def cancel_on_first_token():
        runner.until(ev.TokensGenerated)
        runner.engine.cancel()
        stop_after_first.set()

    runner.engine.submit(cmd.Generate(cid, "Talk for a long while", cmd.Sampling(temperature=0.0, max_tokens=400)))
    cancel_on_first_token()
    final = runner.until((ev.ReplyFinished, ev.EngineFailed))
    assert isinstance(final, ev.ReplyFinished) and final.cancelled
    assert final.stats.generated_tokens <= 3
    with Catalog() as catalog:
        last = catalog.current_path(cid)[-1]
    assert last.role == "assistant" and last.meta.get("cancelled") is True
    follow, _ = runner.run(cmd.Generate(cid, "Next"))
    assert isinstance(follow, ev.ReplyFinished) and follow.stats.reused_tokens > 0


def test_resume_in_a_new_engine_comes_from_disk(tiny_model_dir, personas_dir):
    cid = new_conversation()
    first = EngineRunner(tiny_model_dir, personas_dir)
    one, _ = first.run(cmd.Generate(cid, "Remember this"))
    first.close()
    second = EngineRunner(tiny_model_dir, personas_dir)
    try:
        two, _ = second.run(cmd.Generate(cid, "Do you remember?"))
    finally:
        second.close()
    assert two.stats.cache == "disk"
    assert two.stats.reused_tokens >= one.stats.reused_tokens + one.stats.prefilled_tokens


def test_open_reports_where_the_cache_is(runner):
    cid = new_conversation()
    runner.engine.submit(cmd.Open(cid))
    opened = runner.until(ev.ConversationOpened)
    assert opened.cache == "none"
    runner.run(cmd.Generate(cid, "hi"))
    runner.engine.submit(cmd.Evict(cid))
    runner.engine.submit(cmd.Open(cid))
    opened = runner.until(ev.ConversationOpened)
    assert opened.cache == "disk" and opened.tokens > 0


def test_bad_commands_fail_clearly_and_write_nothing(runner):
    cid = new_conversation()
    final, _ = runner.run(cmd.Generate(cid, "   "))
    assert isinstance(final, ev.EngineFailed) and "empty" in final.message
    final, _ = runner.run(cmd.Generate(cid, "word " * 5000))
    assert isinstance(final, ev.EngineFailed) and "context window" in final.message
    final, _ = runner.run(cmd.Generate(9999, "hi"))
    assert isinstance(final, ev.EngineFailed) and "9999" in final.message
    with Catalog() as catalog:
        assert catalog.current_path(cid) == []


def test_unknown_persona_fails_clearly(runner):
    cid = new_conversation("nobody-here")
    final, _ = runner.run(cmd.Generate(cid, "hi"))
    assert isinstance(final, ev.EngineFailed) and "nobody-here" in final.message


def test_prefill_reports_progress_for_long_prompts(runner):
    cid = new_conversation()
    final, events = runner.run(cmd.Generate(cid, "word " * 200))
    progress = [e for e in events if isinstance(e, ev.PrefillProgressed)]
    assert isinstance(final, ev.ReplyFinished)
    assert progress and progress[-1].done == progress[-1].total and len(progress) >= 2


def test_corrupted_cache_is_rebuilt_and_the_chat_goes_on(tiny_model_dir, personas_dir, parley_home):
    cid = new_conversation()
    first = EngineRunner(tiny_model_dir, personas_dir)
    first.run(cmd.Generate(cid, "word " * 300))
    first.close()
    for f in (parley_home / "caches").rglob("*.safetensors"):
        data = bytearray(f.read_bytes())
        data[-10] ^= 0xFF
        f.write_bytes(bytes(data))
    second = EngineRunner(tiny_model_dir, personas_dir)
    try:
        final, events = second.run(cmd.Generate(cid, "still there?"))
    finally:
        second.close()
    assert any(isinstance(e, ev.CacheDiscarded) for e in events)
    assert isinstance(final, ev.ReplyFinished) and final.stats.cache in ("none", "disk", "ram")
    with Catalog() as catalog:
        assert [m.role for m in catalog.current_path(cid)] == ["user", "assistant", "user", "assistant"]


def test_editing_a_persona_preamble_drops_only_its_caches(runner, personas_dir):
    a, b = new_conversation("tester"), new_conversation("talker")
    runner.run(cmd.Generate(a, "hi"))
    runner.run(cmd.Generate(b, "hi", cmd.Sampling(temperature=0, max_tokens=4)))
    toml = personas_dir / "tester.toml"
    toml.write_text(toml.read_text().replace("a terse test persona", "a chatty test persona"))
    final, _ = runner.run(cmd.Generate(a, "again"))
    assert final.stats.cache == "none" and final.stats.reused_tokens == 0
    other, _ = runner.run(cmd.Generate(b, "again", cmd.Sampling(temperature=0, max_tokens=4)))
    assert other.stats.cache == "ram" and other.stats.reused_tokens > 0


def test_sampling_only_edits_keep_the_cache(runner, personas_dir):
    a = new_conversation("tester")
    runner.run(cmd.Generate(a, "hi"))
    toml = personas_dir / "tester.toml"
    toml.write_text(toml.read_text().replace("max_tokens = 6", "max_tokens = 5"))
    final, _ = runner.run(cmd.Generate(a, "again"))
    assert final.stats.cache == "ram" and final.stats.generated_tokens == 5


def test_context_window_overflow_keeps_chatting_without_re_prefilling_every_turn(tmp_path, personas_dir):
    from app.model.tiny import build_tiny_model

    small = build_tiny_model(tmp_path / "small-context", context=400)
    runner = EngineRunner(small, personas_dir)
    cid = new_conversation()
    try:
        trimmed_at = None
        for turn in range(12):
            final, events = runner.run(cmd.Generate(cid, f"turn {turn} " + "word " * 12))
            assert isinstance(final, ev.ReplyFinished), final
            if any(isinstance(e, ev.ContextTrimmed) for e in events):
                trimmed_at = turn
                break
        assert trimmed_at is not None, "the conversation never outgrew the window"
        after, events = runner.run(cmd.Generate(cid, "and one more"))
        assert not any(isinstance(e, ev.ContextTrimmed) for e in events)
        assert after.stats.reused_tokens > after.stats.prefilled_tokens  # back to appending, not re-reading
    finally:
        runner.close()
    with Catalog() as catalog:
        assert len(catalog.current_path(cid)) == 2 * (trimmed_at + 2)  # the transcript keeps everything


def test_deleting_a_conversation_frees_its_blocks_but_not_shared_ones(runner, parley_home):
    keep, gone = new_conversation(), new_conversation()
    runner.run(cmd.Generate(keep, "word " * 120))
    runner.run(cmd.Generate(gone, "other " * 150))
    runner.until(ev.CacheStatesChanged)  # sent once the cache is saved
    blocks = lambda: sorted((parley_home / "caches" / "blocks").rglob("*.safetensors"))  # noqa: E731
    before = blocks()
    with Catalog() as catalog:
        catalog.delete_conversation(gone)
    runner.engine.submit(cmd.Forget(gone))
    runner.engine.submit(cmd.RefreshCacheStates())
    runner.until(ev.CacheStatesChanged)
    after = blocks()
    assert len(after) < len(before) and after
    assert not list((parley_home / "caches" / "tails").glob(f"conv_{gone}-*"))
    final, _ = runner.run(cmd.Generate(keep, "still cached?"))
    assert final.stats.cache == "ram" and final.stats.reused_tokens > 400


def test_a_conversation_deleted_while_its_cache_is_saved_is_not_an_error(runner):
    cid = new_conversation()
    runner.engine.submit(cmd.Generate(cid, "word " * 150))
    runner.until(ev.ReplyFinished)  # the save follows this event
    with Catalog() as catalog:
        catalog.delete_conversation(cid)
    runner.engine.submit(cmd.Forget(cid))
    runner.engine.submit(cmd.RefreshCacheStates())
    final = runner.until((ev.CacheStatesChanged, ev.EngineFailed))
    while isinstance(final, ev.CacheStatesChanged) and any(s.conversation_id == cid for s in final.states):
        final = runner.until((ev.CacheStatesChanged, ev.EngineFailed))
    assert not any(isinstance(e, ev.EngineFailed) for e in runner.seen)


@pytest.mark.parametrize("release", [True, False])
def test_shutdown_saves_and_releases_the_model_unless_the_process_exits_next(tiny_model_dir, personas_dir, release):
    import gc
    import weakref

    cid = new_conversation()
    first = EngineRunner(tiny_model_dir, personas_dir)
    first.run(cmd.Generate(cid, "Remember this"))
    model = weakref.ref(first.engine._session.lm.model)
    first.engine.shutdown(release=release)
    assert first.engine.stopped.is_set() and first.engine._session is None
    gc.collect()
    assert (model() is None) == release  # kept only for a process that exits next (`parley chat`)
    second = EngineRunner(tiny_model_dir, personas_dir)  # everything was saved either way
    try:
        two, _ = second.run(cmd.Generate(cid, "Do you remember?"))
    finally:
        second.close()
    assert two.stats.cache == "disk"
