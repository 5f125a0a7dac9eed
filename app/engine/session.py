"""Everything the engine thread holds: model, catalog, personas, caches; and the turn logic.

Only the engine thread creates or calls a Session.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

from app import paths
from app.catalog.caches import context_start, conversation_key, is_conversation_key, preamble_key, set_context_start
from app.catalog.message_tokens import save_token_ids, token_ids_of
from app.catalog.store import LEAF
from app.engine import commands as cmd
from app.engine import events as ev
from app.engine import faults
from app.engine.generation import decode, prefill
from app.engine.notes import prompt_with_notes
from app.engine.prompt import common_prefix, transcript_messages
from app.engine.token_render import attach_token_ids
from app.errors import ParleyError

WRITES_A_TURN = (cmd.Generate, cmd.Regenerate, cmd.EditAndResend, cmd.Continue, cmd.SceneRound)
PROGRESS_MIN_TOKENS = 256  # smaller prefills finish before a progress bar would be seen


@dataclass
class Turn:
    """What one reply needs: whose voice, whose cache, which sampling."""

    conversation_id: int
    persona: object
    key: str
    sampling: cmd.Sampling
    parent_id: int | None
    speaker: str | None = None  # set in scenes


class Session:
    def __init__(self, emit, cancelled: Callable[[], bool], lm, catalog, manager, personas_dirs):
        self.emit = emit
        self.cancelled = cancelled
        self.lm = lm
        self.catalog = catalog
        self.manager = manager
        self.personas_dirs = personas_dirs
        self.sent_at: float | None = None  # when the command being handled was made (ttft counts from there)
        self.disk_loads: dict[str, float] = {}  # key -> ms, caches read from disk on open/prefetch, not yet replied in
        self.cancelled_requests: set[str] = set()  # server requests whose clients went away (app.engine.completion)
        self._batch_decoders: dict[str, object] = {}  # app.engine.batch.RaggedDecoder per use (see batch_decoder)
        self._prefix_lookup = None  # app.kvstore.prefix_lookup.PrefixLookup, made at the first server request

    @classmethod
    def open(cls, emit, cancelled, model=None, scheme="q4", budget_mb=512.0, personas_dirs=None, catalog_path=None):
        import mlx.core as mx

        from app.catalog import Catalog
        from app.catalog.caches import CacheStore
        from app.kvstore.manager import CacheManager
        from app.kvstore.memory import reuse_freed_memory
        from app.kvstore.pool import BlockPool
        from app.kvstore.schemes import get_scheme
        from app.model.arch import sliding_windows
        from app.model.loader import load_model

        scheme_obj = get_scheme(scheme)
        lm = load_model(model, progress=lambda d, t, label: emit(ev.ModelLoadProgressed(d, t, label)))
        dtype = activation_dtype(lm.model)
        emit(ev.ModelLoaded(lm.name, lm.fingerprint, lm.context_window, str(mx.default_device())))
        catalog = Catalog(catalog_path)
        pool = BlockPool(CacheStore(catalog), paths.caches_dir(), lm.fingerprint, scheme_obj, lm.n_layers, dtype,
                         kv_shape(lm.model), sliding_windows(lm.model))
        pool.gc()  # leftovers of crashes and deleted conversations, older than a few minutes
        manager = CacheManager(pool, int(budget_mb * 1024 * 1024))
        reuse_freed_memory(manager.budget_bytes)
        session = cls(emit, cancelled, lm, catalog, manager, personas_dirs)
        session.drop_caches_of_edited_personas()
        return session

    def drop_caches_of_edited_personas(self) -> None:
        """A persona whose preamble changed since its caches were made: those caches are useless now."""
        from app.personas import load_personas

        for persona_id in self.catalog.sync_personas(load_personas(self.personas_dirs).personas.values()):
            self._forget_caches_of(persona_id)

    def _forget_caches_of(self, persona_id: str) -> None:
        for key in self.manager.pool.store.keys_of_persona(persona_id):
            self.manager.forget(key)
        for key in [k for k, e in self.manager.entries.items() if e.persona_id == persona_id]:
            self.manager.forget(key)

    def close(self) -> None:
        for key, entry in list(self.manager.entries.items()):
            if entry.dirty:
                faults.save_cache(self, key, entry.conversation_id)
        self.catalog.close()

    # -- dispatch ------------------------------------------------------------
    def handle(self, command: cmd.Command) -> None:
        self.sent_at = getattr(command, "sent_at", None)
        handler = getattr(self, f"_on_{type(command).__name__}")
        if isinstance(command, WRITES_A_TURN):  # one turn at a time per conversation, across processes (a queue)
            with faults.conversation_lock(command.conversation_id):
                handler(command)
        else:
            handler(command)

    def _on_Generate(self, c: cmd.Generate) -> None:
        if not c.text.strip():
            raise ParleyError("The message is empty: type something to send.")
        conv = self.conversation(c.conversation_id)
        persona = self.persona(conv.persona_id)
        self.check_fits(c.text, c.sampling or self.make_turn(conv, persona, None, None).sampling)
        user_id = self._add_user_message(conv, persona, c.text)
        self.reply(self.make_turn(conv, persona, c.sampling, user_id))

    def _add_user_message(self, conv, persona, text: str, parent_id=LEAF) -> int:
        """Save the user's message with the lorebook entries it brings in (app.engine.lore)."""
        from app.engine.lore import lore_for_message

        if parent_id is not LEAF:
            self.catalog.set_leaf(conv.id, parent_id)  # the edited message's siblings are not its context
        lore = lore_for_message(self.catalog, self.lm.tokenizer, persona, conv.id, text)
        user_id = self.catalog.add_message(conv.id, "user", text, parent_id=parent_id, meta={"lore": lore} if lore else None)
        self.emit(ev.MessageSaved(conv.id, user_id, "user"))
        if lore:
            self.emit(ev.LoreAdded(conv.id, user_id, tuple(i["name"] for i in lore)))
        return user_id

    def check_fits(self, text: str, sampling: cmd.Sampling) -> None:
        """Refuse, before anything is written, a message that cannot fit the context window."""
        n = len(self.lm.tokenizer.encode(text))
        if n + sampling.max_tokens + 16 > self.lm.context_window:
            raise ParleyError(
                f"The message is {n} tokens; with room for the reply ({sampling.max_tokens} tokens) it does not fit "
                f"the model's context window of {self.lm.context_window} tokens. Send a shorter message."
            )

    def _on_Regenerate(self, c: cmd.Regenerate) -> None:
        conv = self.conversation(c.conversation_id)
        path = self.catalog.current_path(conv.id)
        last_user = next((m for m in reversed(path) if m.role == "user"), None)
        if last_user is None:
            raise ParleyError("There is no message to reply to yet: send one first.")
        self.catalog.set_leaf(conv.id, last_user.id)
        self.reply(self.make_turn(conv, self.persona(conv.persona_id), c.sampling, last_user.id))

    def _on_EditAndResend(self, c: cmd.EditAndResend) -> None:
        if not c.text.strip():
            raise ParleyError("The edited message is empty.")
        conv = self.conversation(c.conversation_id)
        old = self.catalog.get_message(c.message_id)
        if old is None or old.conversation_id != conv.id or old.role != "user":
            raise ParleyError(f"Message {c.message_id} is not a user message of this conversation.")
        new_id = self._add_user_message(conv, self.persona(conv.persona_id), c.text, parent_id=old.parent_id)
        self.reply(self.make_turn(conv, self.persona(conv.persona_id), c.sampling, new_id))

    def _on_Continue(self, c: cmd.Continue) -> None:
        conv = self.conversation(c.conversation_id)
        self.reply(self.make_turn(conv, self.persona(conv.persona_id), c.sampling, conv.leaf_id))

    def _on_Open(self, c: cmd.Open) -> None:
        key = conversation_key(c.conversation_id)
        self.manager.pin(key)
        began = time.perf_counter()
        cache, source, miss = self.manager.get(key)
        if miss:
            self.emit(ev.CacheDiscarded(c.conversation_id, miss.reason))
        if source == "disk" or key in self.disk_loads:  # read now, or prefetched from disk and not used yet
            self.disk_loads[key] = self.disk_loads.get(key, 0.0) + (time.perf_counter() - began) * 1000
            source = "disk"
        self.emit(ev.ConversationOpened(c.conversation_id, source, cache.n_tokens if cache else 0,
                                        self.disk_loads.get(key, 0.0)))
        self.emit_states()

    def _on_Prefetch(self, c: cmd.Prefetch) -> None:
        key = conversation_key(c.conversation_id)
        began, was_in_ram = time.perf_counter(), key in self.manager.entries
        self.manager.prefetch(key)
        if not was_in_ram and key in self.manager.entries:
            self.disk_loads[key] = (time.perf_counter() - began) * 1000
        self.emit_states()

    def _on_Evict(self, c: cmd.Evict) -> None:
        self.manager.evict(conversation_key(c.conversation_id))
        self.emit_states()

    def _on_SceneRound(self, c: cmd.SceneRound) -> None:
        from app.engine.scene import SceneRunner

        SceneRunner(self).run(c)

    def _on_Forget(self, c: cmd.Forget) -> None:
        for key in [k for k, e in self.manager.entries.items() if e.conversation_id == c.conversation_id]:
            self.manager.discard(key)
        self.manager.pool.forget_conversation(c.conversation_id)
        self.emit_states()

    def _on_Complete(self, c: cmd.Complete) -> None:
        from app.engine.completion import run_completion

        run_completion(self, c)

    def _on_DescribeModel(self, c: cmd.DescribeModel) -> None:
        from app.engine.completion import describe_model

        describe_model(self, c)

    def _on_RefreshCacheStates(self, c: cmd.RefreshCacheStates) -> None:
        self.emit_states()

    # -- what a turn is made of: public, for the scene rounds (app.engine.scene), the notes (app.engine.notes)
    # and the server's completions (app.engine.completion), which run on this same engine thread ---------------
    def conversation(self, conversation_id: int):
        """The catalog's conversation, or a ParleyError saying it is gone."""
        conv = self.catalog.get_conversation(conversation_id)
        if conv is None:
            raise ParleyError(f"Conversation {conversation_id} does not exist (deleted?).")
        return conv

    def persona(self, persona_id: str):
        from app.personas import load_personas

        result = load_personas(self.personas_dirs)
        if persona_id not in result.personas:
            raise ParleyError(f"Persona {persona_id!r} was not found: check its file in personas/ or {paths.user_personas_dir()}.")
        persona = result.personas[persona_id]
        self._invalidate_if_edited(persona)
        return persona

    def _invalidate_if_edited(self, persona) -> None:
        """Files are re-read every turn; an edit to the preamble drops only this persona's caches."""
        from app.personas import preamble_hash

        old = self.catalog.upsert_persona(persona, preamble_hash=preamble_hash(persona))
        if old is not None and old != preamble_hash(persona):
            self._forget_caches_of(persona.id)

    def make_turn(self, conv, persona, override: cmd.Sampling | None, parent_id, speaker=None, key=None) -> Turn:
        sampling = cmd.Sampling(temperature=persona.temperature, top_p=persona.top_p, max_tokens=persona.max_tokens)
        if override is not None:
            sampling = override
        return Turn(conv.id, persona, key or conversation_key(conv.id), sampling, parent_id, speaker)

    def batch_decoder(self, use: str):
        """The decoder that steps several caches at once, one per `use` ("scene", "completion"), made once per
        model and kept (its buffers are reused from step to step)."""
        from app.engine.batch import RaggedDecoder

        decoder = self._batch_decoders.get(use)
        if decoder is None or decoder.model is not self.lm.model:
            decoder = self._batch_decoders[use] = RaggedDecoder(self.lm.model)
        return decoder

    def prefix_lookup(self):
        """Finds the stored or live cache sharing the longest prefix with a prompt (`parley serve` requests)."""
        from app.kvstore.prefix_lookup import PrefixLookup

        if self._prefix_lookup is None:
            self._prefix_lookup = PrefixLookup(self.manager)
        return self._prefix_lookup

    def emit_states(self) -> None:
        states = []
        for key, entry in self.manager.entries.items():
            if is_conversation_key(key):
                cache = entry.cache
                states.append(ev.CacheState(entry.conversation_id, entry.persona_id, "ram", len(cache.tokens),
                                            self.manager.entry_bytes(key), key == self.manager.pinned))
        self.emit(ev.CacheStatesChanged(tuple(states), self.manager.ram_bytes(), self.manager.budget_bytes))

    # -- one reply ---------------------------------------------------------------
    def reply(self, turn: Turn, transcript=None) -> int | None:
        """Prefill what the cache lacks, stream a reply, save it, then persist the cache."""
        from app.personas import post_history, preamble_hash, preamble_messages

        began = time.perf_counter()
        started = min(self.sent_at or began, began)  # ttft counts from the user's send, queue included
        if transcript is None:  # the path ending at the message this reply answers, not whatever is the leaf now
            transcript = transcript_messages(self.catalog.path_to(turn.parent_id) if turn.parent_id is not None else [])
        transcript = attach_token_ids(transcript, token_ids_of(self.catalog, [m.get("id") for m in transcript
                                                                             if m.get("id")], self.lm.fingerprint))
        start = context_start(self.catalog, turn.conversation_id, turn.speaker)
        prompt = prompt_with_notes(self, turn, preamble_messages(turn.persona), transcript, start, post_history(turn.persona))
        if prompt is None:  # cancelled while writing the notes on the turns leaving the view (app.engine.notes)
            self.manager.save(turn.key)
            self.emit(ev.ReplyFinished(turn.conversation_id, 0, "", ev.ReplyStats(0, 0, 0, 0, 0, "ram"), True))
            return None
        if prompt.start != start:
            set_context_start(self.catalog, turn.conversation_id, prompt.start, turn.speaker)
            self.emit(ev.ContextTrimmed(turn.conversation_id, prompt.start))
        self.manager.pin(turn.key)
        cache, source = self.cache_for(turn, preamble_key(turn.persona.id, preamble_hash(turn.persona)))
        reused = common_prefix(cache.tokens, prompt.ids)
        reused = min(reused, len(prompt.ids) - 1)  # the last prompt token must be fed to get logits
        reused = cache.trim_to(reused)  # 0 when a sliding-window layer no longer holds that far back
        logits = None
        todo = prompt.ids[reused:]
        for step in prefill(self.lm.model, cache, todo):
            if len(todo) >= PROGRESS_MIN_TOKENS:
                self.emit(ev.PrefillProgressed(turn.conversation_id, step.done, step.total))
            logits = step.logits
            if self.cancelled() and step.logits is None:
                self.manager.mark_dirty(turn.key)
                faults.save_cache(self, turn.key, turn.conversation_id)
                self.emit(ev.ReplyFinished(turn.conversation_id, 0, "", ev.ReplyStats(0, reused, step.done, 0, 0, source), True))
                return None
        self.snapshot_preamble(turn, cache, prompt.preamble_ids)
        timing = {"queued_ms": (began - started) * 1000}
        if turn.key in self.disk_loads:
            timing.update(opened_from="disk", open_ms=self.disk_loads.pop(turn.key))
        return self._stream_reply(turn, cache, logits, started, reused, len(todo), source, timing)

    def _stream_reply(self, turn: Turn, cache, logits, started: float, reused: int, prefilled: int, source: str,
                      timing: dict | None = None) -> int:
        tok = self.lm.tokenizer
        stream = tok.stream()
        generated: list[int] = []
        first_at = None
        cancelled = False
        for token in decode(self.lm.model, cache, logits, turn.sampling, tok.eos_ids):
            if first_at is None:
                first_at = time.perf_counter()
            generated.append(token)
            delta = stream.push(token)
            if delta:
                self.emit(ev.TokensGenerated(turn.conversation_id, delta))
            if self.cancelled():
                cancelled = True
                break
        rest = stream.rest()  # text held back as a possibly cut character, and the reply ended there
        if rest:
            self.emit(ev.TokensGenerated(turn.conversation_id, rest))
        ended = time.perf_counter()
        first_at = first_at or ended
        stats = ev.ReplyStats(
            ttft_ms=(first_at - started) * 1000, reused_tokens=reused, prefilled_tokens=prefilled,
            generated_tokens=len(generated),
            decode_tps=(len(generated) - 1) / (ended - first_at) if len(generated) > 1 and ended > first_at else 0.0,
            cache=source, **(timing or {}),
        )
        text = stream.text
        meta = {"stats": stats.__dict__, **({"cancelled": True} if cancelled else {})}
        try:
            reply_id = self.catalog.add_message(turn.conversation_id, "assistant", text, parent_id=turn.parent_id,
                                                persona_id=turn.speaker, meta=meta)
        except Exception as exc:
            problem = faults.storage_problem(exc)
            if problem is None:
                raise
            raise faults.ReplyNotSaved(problem, text) from exc
        try:  # the exact ids only spare a re-read later: the reply itself is saved already
            save_token_ids(self.catalog, reply_id, self.lm.fingerprint, [t for t in generated if t not in tok.eos_ids])
        except Exception as exc:
            if faults.storage_problem(exc) is None:
                raise
        self.emit(ev.MessageSaved(turn.conversation_id, reply_id, "assistant"))
        self.emit(ev.ReplyFinished(turn.conversation_id, reply_id, text, stats, cancelled))
        self.manager.mark_dirty(turn.key)
        faults.save_cache(self, turn.key, turn.conversation_id)
        self.manager.enforce_budget()
        self.emit_states()
        return reply_id

    def cache_for(self, turn: Turn, pre_key: str):
        """The conversation's cache (RAM, disk) or a copy of the persona's preamble snapshot, or empty."""
        from app.kvstore.conversation_cache import ConversationCache

        cache, source, miss = self.manager.get(turn.key)
        if miss:
            self.emit(ev.CacheDiscarded(turn.conversation_id, miss.reason))
        if cache is not None:
            return cache, source
        snapshot, snap_source, _ = self.manager.get(pre_key)
        if snapshot is not None:
            cache = snapshot.copy_prefix(snapshot.n_tokens)
            self.manager.compact(pre_key)
        else:
            pool = self.manager.pool
            cache = ConversationCache.empty(self.lm.n_layers, pool.scheme, pool.fingerprint)
            snap_source = "none"
        self.manager.put(turn.key, cache, turn.conversation_id, turn.speaker or turn.persona.id)
        return cache, snap_source

    def snapshot_preamble(self, turn: Turn, cache, preamble_ids: list[int]) -> None:
        """Keep the persona's preamble as its own cache so new conversations start warm."""
        from app.personas import preamble_hash

        key = preamble_key(turn.persona.id, preamble_hash(turn.persona))
        n = len(preamble_ids)
        if n == 0 or key in self.manager.entries or self.manager.pool.has(key) or cache.tokens[:n] != preamble_ids:
            return
        snapshot = cache.copy_prefix(n)
        if snapshot.n_tokens != n:  # the sliding-window layers have let the preamble go
            return
        self.manager.put(key, snapshot, None, turn.persona.id)
        faults.save_cache(self, key, None)
        self.manager.compact(key)


def kv_shape(model) -> tuple[int, int, int] | None:
    """(KV heads, key dim, value dim) of the model's attention layers, or None if it does not say."""
    from app.model.arch import kv_shape as model_kv_shape

    try:
        return model_kv_shape(model)
    except (AttributeError, IndexError, TypeError):
        return None


def activation_dtype(model):
    """The dtype the model computes in (its final norm's), for the working copies of restored caches."""
    import mlx.core as mx

    norm = model.model.norm.weight if hasattr(model, "model") and hasattr(model.model, "norm") else None
    if norm is not None and norm.dtype in (mx.float32, mx.float16, mx.bfloat16):
        return norm.dtype
    return mx.float32
