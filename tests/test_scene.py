"""Scenes on the tiny model: batched rounds over per-persona caches, reuse, cancel, resume, CLI."""

from __future__ import annotations

import json

import pytest

from app.catalog import Catalog
from app.engine import commands as cmd
from app.engine import events as ev
from tests.engine_helpers import EngineRunner, write_persona

MEMBERS = ("ann", "bob", "cat")


@pytest.fixture
def personas_dir(tmp_path):
    folder = tmp_path / "personas"
    for pid in MEMBERS:
        write_persona(folder, pid, max_tokens=12)
    write_persona(folder, "long", max_tokens=400)
    return folder


def new_scene(members=MEMBERS, title="Room") -> int:
    with Catalog() as catalog:
        return catalog.create_conversation(None, kind="scene", title=title, members=list(members))


def play(runner, command, timeout=120.0):
    """Submit a round; return (SceneRoundFinished | EngineFailed, {persona: SceneReplyFinished}, events)."""
    start = len(runner.seen)
    runner.engine.submit(command)
    final = runner.until((ev.SceneRoundFinished, ev.EngineFailed), timeout)
    events = runner.seen[start:]
    return final, {e.persona_id: e for e in events if isinstance(e, ev.SceneReplyFinished)}, events


def test_round_saves_one_reply_per_persona_in_order(runner):
    sid = new_scene()
    final, replies, events = play(runner, cmd.SceneRound(sid, "Hello everyone"))
    assert isinstance(final, ev.SceneRoundFinished) and not final.cancelled
    assert final.speakers == MEMBERS and final.batch_tps > 0
    started = next(e for e in events if isinstance(e, ev.SceneRoundStarted))
    assert started.speakers == MEMBERS and started.user_message_id
    for pid in MEMBERS:
        streamed = "".join(e.text for e in events if isinstance(e, ev.SceneTokensGenerated) and e.persona_id == pid)
        assert streamed == replies[pid].text
        assert replies[pid].stats.generated_tokens > 0 and not replies[pid].cancelled
    with Catalog() as catalog:
        path = catalog.current_path(sid)
    assert [(m.role, m.persona_id) for m in path] == [("user", None)] + [("assistant", p) for p in MEMBERS]
    assert [m.id for m in path[1:]] == [replies[p].message_id for p in MEMBERS]
    assert [m.content for m in path[1:]] == [replies[p].text for p in MEMBERS]


def test_scene_view_renders_each_seat():
    from app.catalog.records import Message
    from app.engine.scene import scene_view

    def msg(i, role, text, pid=None, round_id=None):
        return Message(i, 1, i - 1 or None, role, text, pid, "t", {} if round_id is None else {"round": round_id})

    path = [msg(1, "user", "Hi all"), msg(2, "assistant", "Hello", "ann", 1), msg(3, "assistant", "Yo", "bob", 1),
            msg(4, "assistant", "Me too", "bob", 3)]
    names = {"ann": "Ann", "bob": "Bob"}
    assert scene_view(path, "ann", names) == [
        {"role": "user", "content": "User: Hi all"},
        {"role": "assistant", "content": "Hello"},
        {"role": "user", "content": "Bob: Yo"},
        {"role": "user", "content": "Bob: Me too"},
    ]
    # bob spoke at the same time as ann in round 1: his own line first, then what ann said meanwhile
    assert scene_view(path, "bob", names) == [
        {"role": "user", "content": "User: Hi all"},
        {"role": "assistant", "content": "Yo"},
        {"role": "user", "content": "Ann: Hello"},
        {"role": "assistant", "content": "Me too"},
    ]


def test_second_round_reuses_each_personas_cache(runner, tiny_model_dir):
    from app.model.chat_tokenizer import ChatTokenizer

    sid = new_scene()
    _, first, _ = play(runner, cmd.SceneRound(sid, "Hello everyone"))
    final, second, _ = play(runner, cmd.SceneRound(sid, "And again"))
    assert isinstance(final, ev.SceneRoundFinished)
    tok = ChatTokenizer(tiny_model_dir)
    with Catalog() as catalog:
        path = catalog.current_path(sid)
    for pid in MEMBERS:
        one, two = first[pid].stats, second[pid].stats
        assert two.cache == "ram"
        # the cache held the first prompt plus the reply tokens it was fed (the last one is not fed)
        held = one.reused_tokens + one.prefilled_tokens + one.generated_tokens - 1
        assert two.reused_tokens >= held - 1  # a re-tokenized reply may differ in its last token
        # only what was said since this persona spoke is new: the others' replies of round 1 and the user's line
        others = [{"role": "user", "content": f"{m.persona_id.title()}: {m.content}"} for m in path[1:4] if m.persona_id != pid]
        new_part = tok.encode_chat(others + [{"role": "user", "content": "User: And again"}])
        assert two.prefilled_tokens <= len(new_part) + 4
        assert two.reused_tokens + two.prefilled_tokens > held


def test_batched_decode_gives_the_same_tokens_as_decoding_alone(tiny_model_dir):
    """Speakers at different offsets, one crossing a 256-token block boundary mid-reply, some stopping early."""
    import mlx.core as mx

    from app.engine.batch import RaggedDecoder
    from app.engine.commands import Sampling
    from app.engine.generation import decode, prefill
    from app.kvstore.conversation_cache import ConversationCache
    from app.kvstore.live_cache import compact_applies
    from app.kvstore.schemes import get_scheme
    from app.model.loader import load_model

    lm = load_model(str(tiny_model_dir))
    scheme = get_scheme("q4")
    compact = compact_applies(scheme)
    lengths, counts = (250, 37, 120, 300), (20, 9, 20, 14)
    prompts = [[(7 * i + 13 * b) % 300 + 5 for i in range(n)] for b, n in enumerate(lengths)]

    def filled(ids):
        cache = ConversationCache.empty(lm.n_layers, scheme, lm.fingerprint)
        logits = None
        for step in prefill(lm.model, cache, ids):
            logits = step.logits
        return cache, logits

    alone = []
    for ids, n in zip(prompts, counts):
        cache, logits = filled(ids)
        gen = decode(lm.model, cache, logits, Sampling(temperature=0.0, max_tokens=n), set())
        alone.append(([next(gen) for _ in range(n)], cache))

    from app.engine.batch import row_kernels
    from app.model import cpu_fast

    has_kernels = cpu_fast.kernels() is not None and row_kernels() is not None and row_kernels().q4_rows_fast() == 1
    assert RaggedDecoder(lm.model).mode == ("cpu" if has_kernels else "llama")
    for mode in ("cpu", "llama", "loop"):
        decoder = RaggedDecoder(lm.model)
        if mode == "cpu" and not has_kernels:
            continue  # no C compiler / AVX-512 here: the llama path is the batched one
        decoder.mode = mode
        seats = [filled(ids) for ids in prompts]
        caches = [c for c, _ in seats]
        out = [[int(mx.argmax(lg, axis=-1).item())] for _, lg in seats]
        active = [b for b in range(len(prompts)) if counts[b] > 1]
        while active:
            logits = decoder.step([caches[b] for b in active], [out[b][-1] for b in active])
            for row, b in enumerate(active):
                caches[b].appended([out[b][-1]])
                out[b].append(int(mx.argmax(logits[row], axis=-1).item()))
            active = [b for b in active if len(out[b]) < counts[b]]
        for b, (tokens, solo_cache) in enumerate(alone):
            if mode == "llama":  # the model's own fp32 modules, not the 4-bit kernels: close, not bitwise
                assert sum(x == y for x, y in zip(out[b], tokens)) >= len(tokens) - 2
                continue
            assert out[b] == tokens, f"{mode}: speaker {b} diverged"
            # every token the speaker said but the last went into its own cache, sealed as alone
            assert caches[b].tokens == prompts[b] + tokens[:-1]
            assert caches[b].layers[0].offset == len(caches[b].tokens)
            assert caches[b].n_sealed == len(caches[b].tokens) // 256
            k, v = caches[b].layers[-1].tail()
            sk, sv = solo_cache.layers[-1].tail()
            n = k.shape[1]
            if compact:  # alone: attention over the encoded blocks (C); batched: over a decoded copy (BLAS)
                assert mx.allclose(k, sk[:, :n], rtol=1e-5, atol=1e-6) and mx.allclose(v, sv[:, :n], rtol=1e-5, atol=1e-6)
            else:
                assert mx.array_equal(k, sk[:, :n]) and mx.array_equal(v, sv[:, :n])


def test_row_kernel_is_bitwise_the_single_row_gemv(tiny_model_dir):
    import numpy as np

    from app.engine.batch import q4_rows, row_kernels
    from app.model.loader import load_model

    lm = load_model(str(tiny_model_dir))
    q4 = lm.model.model.layers[0].mlp.__dict__.get("_gate_up")
    if q4 is None or row_kernels() is None:
        pytest.skip("no 4-bit CPU kernels on this machine")
    x = np.random.default_rng(0).standard_normal((11, q4.K)).astype(np.float32)
    rows = q4_rows(q4, x)
    single = np.stack([q4.numpy(np.ascontiguousarray(r)) for r in x])
    assert np.array_equal(rows, single)


def test_same_reply_batched_or_alone_through_the_engine(runner):
    together = new_scene()
    _, replies, _ = play(runner, cmd.SceneRound(together, "Tell me a story"))
    for pid in MEMBERS:
        alone = new_scene(title=f"alone {pid}")
        _, solo, _ = play(runner, cmd.SceneRound(alone, "Tell me a story", speakers=(pid,)))
        assert list(solo) == [pid]
        assert solo[pid].text == replies[pid].text


def test_speakers_pick_who_replies_and_bad_ones_fail_clearly(runner):
    sid = new_scene()
    final, replies, _ = play(runner, cmd.SceneRound(sid, "Only you two", speakers=("cat", "ann")))
    assert final.speakers == ("cat", "ann") and set(replies) == {"cat", "ann"}
    with Catalog() as catalog:
        before = catalog.current_path(sid)
    assert [m.persona_id for m in before] == [None, "cat", "ann"]
    final, _, _ = play(runner, cmd.SceneRound(sid, "You?", speakers=("zed",)))
    assert isinstance(final, ev.EngineFailed) and "zed" in final.message
    with Catalog() as catalog:
        assert catalog.current_path(sid) == before  # nothing written
        chat = catalog.create_conversation("ann")
    final, _, _ = play(runner, cmd.SceneRound(chat, "hi"))
    assert isinstance(final, ev.EngineFailed) and "not a scene" in final.message


def test_seeded_sampling_repeats(runner):
    hot = cmd.Sampling(temperature=1.0, top_p=0.9, max_tokens=10, seed=7)
    texts = []
    for _ in range(2):
        _, replies, _ = play(runner, cmd.SceneRound(new_scene(), "Surprise me", sampling=hot))
        texts.append({p: r.text for p, r in replies.items()})
    assert texts[0] == texts[1]


def test_cancel_mid_round_leaves_caches_and_transcript_consistent(runner):
    sid = new_scene(members=("long", "ann"))
    runner.cancel_at = ev.SceneTokensGenerated  # cancelled on the engine thread at the first token, not later
    runner.engine.submit(cmd.SceneRound(sid, "Talk for a long while", sampling=cmd.Sampling(temperature=0.0, max_tokens=400)))
    final = runner.until((ev.SceneRoundFinished, ev.EngineFailed))
    assert isinstance(final, ev.SceneRoundFinished) and final.cancelled
    finished = [e for e in runner.seen if isinstance(e, ev.SceneReplyFinished)]
    assert {e.persona_id for e in finished} == {"long", "ann"}
    assert all(e.stats.generated_tokens <= 3 for e in finished)
    with Catalog() as catalog:
        path = catalog.current_path(sid)
    assert path[0].role == "user"
    saved = {m.persona_id: m for m in path[1:]}
    for e in finished:
        if e.message_id:
            assert saved[e.persona_id].content == e.text and saved[e.persona_id].meta.get("cancelled") is True
    manager = runner.engine._session.manager  # the engine is idle between commands
    for pid in ("long", "ann"):
        cache = manager.entries[f"conv:{sid}:{pid}"].cache
        assert len(cache.tokens) == cache.layers[0].offset if hasattr(cache, "layers") else True
    follow, replies, _ = play(runner, cmd.SceneRound(sid, "Next", sampling=cmd.Sampling(temperature=0.0, max_tokens=5)))
    assert isinstance(follow, ev.SceneRoundFinished) and not follow.cancelled
    assert all(r.stats.reused_tokens > 0 and r.stats.cache == "ram" for r in replies.values())


def test_resume_after_restart_comes_from_disk(tiny_model_dir, personas_dir):
    sid = new_scene()
    first = EngineRunner(tiny_model_dir, personas_dir)
    try:
        _, one, _ = play(first, cmd.SceneRound(sid, "Remember this"))
    finally:
        first.close()
    second = EngineRunner(tiny_model_dir, personas_dir)
    try:
        final, two, _ = play(second, cmd.SceneRound(sid, "Do you remember?"))
    finally:
        second.close()
    assert isinstance(final, ev.SceneRoundFinished)
    for pid in MEMBERS:
        assert two[pid].stats.cache == "disk"
        held = one[pid].stats.reused_tokens + one[pid].stats.prefilled_tokens + one[pid].stats.generated_tokens - 1
        assert two[pid].stats.reused_tokens >= held - 1


# -- the command line ------------------------------------------------------------------
@pytest.fixture
def cli(tiny_model_dir, parley_home):
    from app.cli import main

    for pid in MEMBERS:
        write_persona(parley_home / "personas", pid, max_tokens=8)

    def run(*argv):
        return main(["--model", str(tiny_model_dir), "scene", *argv])

    return run


def test_cli_new_round_and_json(cli, capsys):
    assert cli("new", "Tea party", *MEMBERS) == 0
    scene_id = int(capsys.readouterr().out.strip())
    assert cli("Tea party", "Hello, all") == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert [line.split(":")[0] for line in lines] == ["Ann", "Bob", "Cat"]
    assert cli(str(scene_id), "Once more", "--json", "--speakers", "bob,ann", "--seed", "3") == 0
    out = json.loads(capsys.readouterr().out)
    assert out["scene"] == scene_id and out["batch_tps"] > 0
    assert [r["persona"] for r in out["replies"]] == ["bob", "ann"]
    for r in out["replies"]:
        assert set(r) == {"persona", "reply", "ttft_ms", "reused_tokens", "prefilled_tokens", "generated_tokens",
                          "decode_tps", "cache"}
        assert r["cache"] == "disk" and r["reused_tokens"] > r["prefilled_tokens"]
    with Catalog() as catalog:
        roles = [(m.role, m.persona_id) for m in catalog.current_path(scene_id)]
    assert roles == [("user", None), ("assistant", "ann"), ("assistant", "bob"), ("assistant", "cat"),
                     ("user", None), ("assistant", "bob"), ("assistant", "ann")]


def test_cli_bad_input_fails_clearly(cli, capsys):
    assert cli("new", "Solo", "ann") == 1
    assert "2 to 6" in capsys.readouterr().err
    assert cli("new", "Crowd", "ann", "bob", "cat", "ann") == 1
    assert "only once" in capsys.readouterr().err
    assert cli("new", "Ghosts", "ann", "nobody") == 1
    assert "nobody" in capsys.readouterr().err
    assert cli("No such scene", "hi") == 1
    assert "No scene" in capsys.readouterr().err
    assert cli("new", "Pair", "ann", "bob") == 0
    capsys.readouterr()
    assert cli("Pair", "   ") == 1
    assert "empty" in capsys.readouterr().err
    assert cli("Pair", "hi", "--speakers", "cat") == 1
    assert "cat" in capsys.readouterr().err
    with Catalog() as catalog:
        assert all(not catalog.current_path(c.id) for c in catalog.list_conversations(kind="scene"))


def test_bench_part_runs_on_the_tiny_model(tiny_model_dir):
    from app.bench import PARTS, get_table
    from app.bench.scene import measure, report
    from app.model.loader import load_model

    assert PARTS["scene"] == "app.bench.scene:run" and get_table("scene") is report
    result = measure(load_model(str(tiny_model_dir)), n_tokens=5, repeats=1, say=lambda m: None)
    assert result["same_tokens"] is True
    for b in (2, 4, 6):
        assert result[f"batch{b}_tps"] > 0 and result[f"batch{b}_solo_tps"] > 0
    json.dumps(result)
    assert "batch" in report(result)


@pytest.mark.slow  # a subprocess
def test_row_kernels_leave_the_process_fp_state_alone():
    """Linking with -ffast-math would turn on flush-to-zero for the whole process when the library loads."""
    import subprocess
    import sys

    code = ("from app import fastblas; fastblas.preload()\n"
            "from app.engine.batch import row_kernels\n"
            "row_kernels()\n"
            "print(5e-324 * 1.0 > 0)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.stdout.strip() == "True", out.stderr
