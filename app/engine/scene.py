"""Scenes: several personas in one room, replying together in one batch.

A scene is a conversation of kind "scene" with members (catalog). Its
transcript is one linear path: the user's messages (role "user", no
persona) and each persona's replies (role "assistant", persona_id = the
speaker), in the order they were said.

Each member sees the room from its own seat (`scene_view`): its own
preamble, then the transcript where its own past lines are "assistant"
messages and everyone else's are "user" messages prefixed with the speaker's
name ("Theo: ...", "User: ..."). The replies of one round were said at
the same time, so in each member's view its own reply of a round comes
first, then the others' replies of that round (replies carry their round in
`meta["round"]`). That rendering depends only on the messages and always
grows at its end, so it is the same turn after turn and each member's cache
(`conv:<scene>:<persona>`, its own context start) keeps its exact token
prefix: a later round feeds only the messages said since the member last
spoke. A renamed persona changes the rendering from its first line on, and
the members re-read from there once.

A round (`SceneRunner.run`, through the session's public API):

1. the user's message, if any, is written to the catalog first;
2. each speaker, in order, gets its view prefilled into its own cache
   (only the tokens after the common prefix with what the cache holds);
3. the speakers decode *together*, one batch step per token
   (`app.engine.batch.RaggedDecoder`: the weights are read once per step for
   all speakers; each speaker attends over its own cache at its own offset),
   each streaming `SceneTokensGenerated`; cancel is honoured between steps;
4. the replies are saved in speaking order (each under the previous one),
   then every speaker's cache is persisted, as for a chat.

Speakers of one round do not see each other's replies of that same round:
they speak at the same time (one batch). The next round everyone sees
everything that was said. To have B answer A within a round, run two rounds
with one speaker each (`speakers=("a",)` then `speakers=("b",)`).

Sampling comes from each persona unless the command overrides it. With a
seed, each speaker samples from its own random stream (seed + its position
among the members), so a run repeats exactly, and a speaker's reply does
not depend on who else speaks in the round.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from app.catalog.caches import context_start, conversation_key, preamble_key, set_context_start
from app.engine import commands as cmd
from app.engine import events as ev
from app.engine.faults import save_cache
from app.engine.lore import add_scene_lore
from app.engine.notes import prompt_with_notes
from app.engine.prompt import common_prefix
from app.personas.user import effective_user
from app.errors import ParleyError

MIN_MEMBERS, MAX_MEMBERS = 2, 6
USER_NAME = "User"


def check_members(members, known) -> list[str]:
    """A scene's members, validated: 2 to 6 distinct persona ids, each one of `known`. No MLX needed."""
    ids = list(members)
    if len(set(ids)) != len(ids):
        raise ParleyError(f"A persona can sit in a scene only once: {', '.join(ids)}.")
    if not MIN_MEMBERS <= len(ids) <= MAX_MEMBERS:
        raise ParleyError(f"A scene has {MIN_MEMBERS} to {MAX_MEMBERS} personas, not {len(ids)}.")
    unknown = [pid for pid in ids if pid not in set(known)]
    if unknown:
        raise ParleyError(f"Unknown persona {unknown[0]!r}. Known personas: {', '.join(sorted(known)) or 'none'}.")
    return ids


def create_scene(catalog, title: str, members, known) -> int:
    """A new scene conversation (kind "scene") with these members in speaking order; returns its id."""
    title = title.strip()
    if not title:
        raise ParleyError("A scene needs a name.")
    taken = next((c for c in catalog.list_conversations(kind="scene") if (c.title or "").casefold() == title.casefold()), None)
    if taken is not None:
        raise ParleyError(f"There is already a scene named {taken.title!r} (id {taken.id}): pick another name, "
                          "or talk in that one with `parley scene NAME MESSAGE`.")
    return catalog.create_conversation(None, kind="scene", title=title, members=check_members(members, known))


def scene_view(path, speaker: str, names: dict[str, str]) -> list[dict]:
    """The transcript as `speaker` sees it: its own lines as assistant turns, everyone else's as named user turns.

    The replies of one round were said at the same time: in each speaker's view its own reply of a round
    comes first (right after what it had heard when it spoke), then the others' replies of that round.
    So a speaker's view only ever grows at its end, and its cache prefix stays valid round after round.
    """
    view = []
    i = 0
    while i < len(path):
        m = path[i]
        if m.role == "assistant" and m.meta.get("round") is not None:
            j = i
            while j < len(path) and path[j].role == "assistant" and path[j].meta.get("round") == m.meta["round"]:
                j += 1
            group = path[i:j]
            ordered = [g for g in group if g.persona_id == speaker] + [g for g in group if g.persona_id != speaker]
            view.extend(_with_lore(_line(g, speaker, names), g, speaker) for g in ordered)
            i = j
            continue
        if m.role in ("user", "assistant", "system"):
            view.append(_with_lore(_line(m, speaker, names), m, speaker))
        i += 1
    return view


def _line(m, speaker: str, names: dict[str, str]) -> dict:
    if m.role == "assistant" and m.persona_id == speaker:
        return {"role": "assistant", "content": m.content}
    if m.role == "system":
        return {"role": "system", "content": m.content}
    who = names.get(None, USER_NAME) if m.persona_id is None else names.get(m.persona_id, m.persona_id)
    return {"role": "user", "content": f"{who}: {m.content}"}


def _with_lore(line: dict, m, speaker: str) -> dict:
    """The speaker's own lorebook entries stored with this message (app.engine.lore), shown right after it."""
    from app.engine.lore import scene_lore_note

    note = scene_lore_note(m.meta, speaker)
    return {**line, "lore": note} if note else line


@dataclass
class _Speaker:
    persona: object
    turn: object  # app.engine.session.Turn
    sampler: object = None
    cache: object = None
    source: str = "none"
    reused: int = 0
    prefilled: int = 0
    logits: object = None  # next-token logits (mx.array)
    generated: list[int] = field(default_factory=list)
    stream: object = None
    first_at: float | None = None
    ended: float | None = None
    done: bool = False

    @property
    def pid(self) -> str:
        return self.persona.id


class _Sampler:
    """Greedy, or temperature + top-p from the speaker's own random stream."""

    def __init__(self, sampling: cmd.Sampling, seed: int | None):
        import mlx.core as mx

        self.temperature = sampling.temperature
        self.top_p = sampling.top_p
        self.key = mx.random.key(seed) if seed is not None else mx.random.key(int(time.time_ns() % (1 << 62)))

    def __call__(self, logits) -> int:
        import mlx.core as mx

        logits = logits.reshape(1, -1)
        if self.temperature <= 0:
            return int(mx.argmax(logits, axis=-1).item())
        from mlx_lm.sample_utils import apply_top_p

        logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
        if 0 < self.top_p < 1:
            logprobs = apply_top_p(logprobs, self.top_p)
        self.key, sub = mx.random.split(self.key)
        return int(mx.random.categorical(logprobs * (1.0 / self.temperature), key=sub).item())


def member_names(session, members) -> dict[str, str]:
    from app.personas import load_personas

    found = load_personas(session.personas_dirs).personas
    return {pid: (found[pid].name if pid in found else pid) for pid in members}


class SceneRunner:
    """One scene round on the engine thread. It talks to the session only through the session's public API
    (conversation, persona, make_turn, check_fits, cache_for, snapshot_preamble, batch_decoder, emit,
    cancelled, emit_states) and the cache manager's (pin, put, discard, enforce_budget)."""

    def __init__(self, session):
        self.session = session

    def run(self, c: cmd.SceneRound) -> None:
        session = self.session
        conv = session.conversation(c.conversation_id)
        if conv.kind != "scene":
            raise ParleyError(f"Conversation {conv.id} is a chat, not a scene: use `parley chat` for it.")
        members = list(conv.members)
        if not members:
            raise ParleyError(f"Scene {conv.id} has no members.")
        speakers = list(dict.fromkeys(c.speakers)) or members
        strangers = [s for s in speakers if s not in members]
        if strangers:
            raise ParleyError(f"{', '.join(strangers)} not in this scene (members: {', '.join(members)}).")
        cid = conv.id
        text = c.text if c.text.strip() else ""

        # everything that can fail on bad input fails before anything is written
        seats = []
        for pid in speakers:
            persona = session.persona(pid)
            turn = session.make_turn(conv, persona, c.sampling, None, speaker=pid, key=conversation_key(cid, pid))
            seed = turn.sampling.seed
            seats.append(_Speaker(persona, turn, _Sampler(turn.sampling, None if seed is None else seed + members.index(pid))))
        if text:
            session.check_fits(text, max((s.turn.sampling for s in seats), key=lambda s: s.max_tokens))
            user_id = session.catalog.add_message(cid, "user", text)
            session.emit(ev.MessageSaved(cid, user_id, "user"))
        else:
            user_id = None
        session.emit(ev.SceneRoundStarted(cid, tuple(speakers), user_id))

        started = time.perf_counter()
        names = member_names(session, members)
        add_scene_lore(session, cid, [(s.persona, s.turn.speaker) for s in seats], names)
        path = session.catalog.current_path(cid)
        round_id = path[-1].id if path else 0  # marks this round's replies (said at the same time)
        session.manager.pin(seats[0].turn.key)
        prepared: list[_Speaker] = []
        try:
            for seat in seats:
                prepared.append(seat)
                if not self._prefill_seat(seat, path, names):
                    self._finish(cid, seats, prepared, started, round_id, cancelled=True, decode_span=None)
                    return
            span = self._decode_together(cid, prepared)
        except BaseException:
            for seat in prepared:  # a step that failed half-way may have left a cache out of step with its tokens
                if seat.cache is not None and not all(l.offset == seat.cache.n_tokens for l in seat.cache.layers):
                    session.manager.discard(seat.turn.key)  # the copy on disk is the last good one
                    seat.cache = None
            self._persist(cid, prepared)
            raise
        self._finish(cid, seats, prepared, started, round_id, cancelled=session.cancelled(), decode_span=span)

    def _prefill_seat(self, seat: _Speaker, path, names) -> bool:
        """Build the speaker's prompt and feed its cache what it lacks; False if cancelled on the way."""
        from app.engine.generation import prefill
        from app.engine.session import PROGRESS_MIN_TOKENS
        from app.personas import post_history, preamble_hash, preamble_messages

        session = self.session
        turn, persona, catalog = seat.turn, seat.persona, session.catalog
        cid = turn.conversation_id
        transcript = scene_view(path, seat.pid, {**names, None: effective_user(persona).name})
        start = context_start(catalog, cid, seat.pid)
        prompt = prompt_with_notes(session, turn, preamble_messages(persona), transcript, start, post_history(persona))
        if prompt is None:  # cancelled while writing this seat's notes on the turns leaving its view
            return False
        if prompt.start != start:
            set_context_start(catalog, cid, prompt.start, seat.pid)
            session.emit(ev.ContextTrimmed(cid, prompt.start))
        seat.cache, seat.source = session.cache_for(turn, preamble_key(persona.id, preamble_hash(persona)))
        reused = min(common_prefix(seat.cache.tokens, prompt.ids), len(prompt.ids) - 1)
        reused = seat.cache.trim_to(reused)
        seat.reused = reused
        todo = prompt.ids[reused:]
        seat.prefilled = len(todo)
        for step in prefill(session.lm.model, seat.cache, todo):
            if len(todo) >= PROGRESS_MIN_TOKENS:
                session.emit(ev.PrefillProgressed(cid, step.done, step.total))
            if step.logits is not None:
                seat.logits = step.logits
            elif session.cancelled():
                seat.prefilled = step.done
                return False
        session.snapshot_preamble(turn, seat.cache, prompt.preamble_ids)
        seat.stream = session.lm.tokenizer.stream()
        return True

    def _decode_together(self, cid: int, seats: list[_Speaker]) -> tuple[float, float] | None:
        """Sample every speaker's next token, then feed all of them in one batch step, until all are done."""
        session = self.session
        decoder = session.batch_decoder("scene")
        eos = session.lm.tokenizer.eos_ids
        active = list(seats)
        first_at = None
        while active:
            fed: list[_Speaker] = []
            for seat in active:
                token = seat.sampler(seat.logits)
                now = time.perf_counter()
                first_at = first_at or now
                seat.first_at = seat.first_at or now
                seat.generated.append(token)
                delta = seat.stream.push(token)
                if delta:
                    session.emit(ev.SceneTokensGenerated(cid, seat.pid, delta))
                if token in eos or len(seat.generated) >= seat.turn.sampling.max_tokens:
                    seat.done, seat.ended = True, now
                else:
                    fed.append(seat)
            if session.cancelled() or not fed:
                break
            logits = decoder.step([s.cache for s in fed], [s.generated[-1] for s in fed])
            for row, seat in enumerate(fed):
                seat.cache.appended([seat.generated[-1]])
                seat.logits = logits[row : row + 1]
            active = fed
        ended = time.perf_counter()
        for seat in seats:
            seat.ended = seat.ended or ended
        return (first_at, ended) if first_at is not None else None

    def _finish(self, cid: int, seats, prepared, started: float, round_id: int, cancelled: bool, decode_span) -> None:
        """Save the replies in speaking order, persist every cache, report."""
        session = self.session
        total, any_stopped = 0, False
        for seat in seats:
            n = len(seat.generated)
            if seat.stream is None:  # cancelled before this speaker's prefill finished: nothing to say
                any_stopped = True
                stats = ev.ReplyStats(0.0, seat.reused, seat.prefilled, 0, 0.0, seat.source)
                session.emit(ev.SceneReplyFinished(cid, seat.pid, 0, "", stats, True))
                continue
            first = seat.first_at or seat.ended or time.perf_counter()
            stats = ev.ReplyStats(
                ttft_ms=(first - started) * 1000, reused_tokens=seat.reused, prefilled_tokens=seat.prefilled,
                generated_tokens=n,
                decode_tps=(n - 1) / (seat.ended - first) if n > 1 and seat.ended > first else 0.0,
                cache=seat.source,
            )
            total += max(n - 1, 0)
            rest = seat.stream.rest()  # held back as a possibly cut character, and the reply ended there
            if rest:
                session.emit(ev.SceneTokensGenerated(cid, seat.pid, rest))
            text = seat.stream.text
            stopped = cancelled and not seat.done
            any_stopped = any_stopped or stopped
            message_id = 0
            if n or not stopped:  # a stopped reply keeps what it said, whitespace too
                meta = {"stats": stats.__dict__, "round": round_id, **({"cancelled": True} if stopped else {})}
                message_id = session.catalog.add_message(cid, "assistant", text, persona_id=seat.pid, meta=meta)
                session.emit(ev.MessageSaved(cid, message_id, "assistant"))
            session.emit(ev.SceneReplyFinished(cid, seat.pid, message_id, text, stats, stopped))
        self._persist(cid, prepared)
        batch_tps = 0.0
        if decode_span is not None and decode_span[1] > decode_span[0]:
            batch_tps = total / (decode_span[1] - decode_span[0])
        session.manager.enforce_budget()
        session.emit_states()
        session.emit(ev.SceneRoundFinished(cid, tuple(s.pid for s in seats), batch_tps, any_stopped))

    def _persist(self, cid: int, seats) -> None:
        session = self.session
        for seat in seats:
            if seat.cache is None:
                continue
            key = seat.turn.key
            session.manager.put(key, seat.cache, cid, seat.pid)  # again: pinning may have compacted the entry
            save_cache(session, key, cid)  # a cache that cannot be written is a warning, not a failed round
