"""Completions for `parley serve`: exact token ids in, streamed text out, caches reused by content.

A front-end sends its whole prompt every turn and knows nothing of Parley's
caches. So each `Complete` asks the `PrefixLookup` which stored cache (any
chat, persona preamble or earlier request; in RAM or on disk) holds the most
leading tokens of the prompt, restores it, prefills only the rest, and saves
the result like a chat's cache. Server caches live under keys "srv:...":

- a request that continues a server cache (it reuses all of it, up to a few
  re-rendered tokens at the end) extends that cache in place: one front-end
  conversation keeps one cache;
- a request that shares only part of a cache (another character with the same
  system prompt, a regenerate, a branch) gets a new cache starting as a copy of
  that prefix, so the first one stays whole;
- a session hint (X-Session-ID / `user`) names the cache the result goes to.

Requests that arrive while others decode join them between two decode steps
(after their own prefill) and decode together in one ragged batch
(`app.engine.batch.RaggedDecoder`, the scenes' decoder: weights read once per
step for every row, each row attending over its own cache; greedy replies are
the same as alone). Alternatives (`n`) are rows of the same batch sharing one
prefill. A request's `seed` seeds MLX's generator when it starts, so replies
sampled while other requests decode are not repeatable.

Caches of the app's chats and persona preambles are only ever read here, never
changed. The number of server caches is bounded; the least recently saved go.
Only the engine thread runs this module.
"""

from __future__ import annotations

import hashlib
import logging
import time
import traceback
import uuid
from dataclasses import dataclass

import mlx.core as mx
from mlx_lm.sample_utils import make_sampler

from app.catalog import caches
from app.engine import commands as cmd
from app.engine import events as ev
from app.engine.faults import save_cache
from app.engine.generation import prefill
from app.errors import ParleyError

log = logging.getLogger(__name__)

SERVER_PERSONA = "serve"  # persona_id recorded on server caches (they belong to no persona)
SERVER_PREFIX = caches.SERVER_PREFIX
MAX_SERVER_CACHES = 64
MAX_ROWS = 8  # rows decoded together (app.engine.batch's kernels take up to 8 at once)
IN_PLACE_SLACK = 64  # a continuation may re-render this many trailing tokens differently and still extend in place


def session_key(hint: str) -> str:
    """The cache a session hint names (hashed: hints are client text)."""
    return f"{SERVER_PREFIX}s:{hashlib.sha256(hint.encode()).hexdigest()[:24]}"


def _new_key() -> str:
    return f"{SERVER_PREFIX}{uuid.uuid4().hex[:16]}"


def describe_model(session, c: cmd.DescribeModel) -> None:
    lm = session.lm
    session.emit(ev.ModelDescribed(c.request_id, lm.name, str(lm.folder), lm.fingerprint, lm.context_window,
                                   session.manager.pool.scheme_id))


def run_completion(session, c: cmd.Complete) -> None:
    """Serve `c`, and every `Complete` that queues up meanwhile, decoding them together in one ragged batch."""
    batch = _Batch(session)
    batch.admit(c)
    batch.run()


@dataclass
class _Prepared:
    key: str
    cache: object
    reused: int
    source: str


@dataclass
class _Job:
    """One request: its cache key, what was reused, and how many alternatives are still decoding."""

    command: cmd.Complete
    key: str
    prompt_tokens: int
    reused: int
    source: str
    started: float
    prompt_ms: float
    rows_left: int
    most_rows: int = 1  # the most requests' rows decoded in one batch step while this one was decoding


@dataclass
class _Row:
    """One alternative of one request being decoded: its own cache, logits, sampler and text."""

    job: _Job
    index: int
    cache: object
    logits: mx.array
    sample: object
    bias: mx.array | None
    stream: object
    limit: int
    holdback: int
    text: str = ""
    emitted: int = 0
    generated: int = 0
    last: int = -1
    first_at: float | None = None
    reason: str = ""
    word: str = ""

    def next_token(self) -> int:
        logits = self.logits + self.bias if self.bias is not None else self.logits
        self.last = int(self.sample(logits).item())
        self.generated += 1
        self.first_at = self.first_at or time.perf_counter()
        return self.last

    def take(self, token: int, eos_ids: set[int]) -> list[str]:
        """Record `token`; returns the text pieces to stream. Sets `reason` when this row is done."""
        if token in eos_ids:
            self.reason = "stop"
            return []
        self.text += self.stream.push(token)
        cut, word = _find_stop(self.text, self.job.command.options.stop)
        if cut is not None:
            self.text, self.reason, self.word = self.text[:cut], "stop", word
            return []
        if self.generated >= self.limit:
            self.reason = "length"
            return []
        if len(self.text) - self.holdback > self.emitted:
            piece = self.text[self.emitted : len(self.text) - self.holdback]
            self.emitted = len(self.text) - self.holdback
            return [piece]
        return []


class _Batch:
    """The requests decoding now. New requests join between two decode steps (after their own prefill)."""

    def __init__(self, session):
        self.session = session
        self.rows: list[_Row] = []
        self.cancels = getattr(session, "cancelled_requests", set())

    def cancelled(self, request_id: str) -> bool:
        return request_id in self.cancels or self.session.cancelled()

    def active_keys(self) -> set[str]:
        return {row.job.key for row in self.rows}

    # -- joining ----------------------------------------------------------------------------------
    def admit(self, c: cmd.Complete) -> None:
        try:
            if self.cancelled(c.request_id):
                self.session.emit(ev.CompletionFailed(c.request_id, "The request was cancelled before it started."))
                self.cancels.discard(c.request_id)
                return
            self.rows += self._start(c)
        except ParleyError as exc:
            self._failed(c, str(exc))
        except Exception as exc:  # the client gets a message, the log gets the traceback
            log.error("completion %s failed:\n%s", c.request_id, traceback.format_exc())
            self._failed(c, f"Internal error while generating: {exc}")

    def _failed(self, c: cmd.Complete, message: str) -> None:
        self.session.emit(ev.CompletionFailed(c.request_id, message))
        self.cancels.discard(c.request_id)

    def _start(self, c: cmd.Complete) -> list[_Row]:
        """Restore the longest stored prefix, prefill the rest, and make one row per alternative."""
        session = self.session
        ids = list(c.prompt_ids)
        window = session.lm.context_window
        if not ids:
            raise ParleyError("The prompt is empty: send some text.")
        if len(ids) + 1 > window:
            raise ParleyError(f"The prompt is {len(ids)} tokens; the model's context window holds {window}. "
                              "Send a shorter prompt.")
        started = time.perf_counter()
        prep = _prepare_cache(session, ids, c.session, busy=self.active_keys())
        logits = None
        for step in prefill(session.lm.model, prep.cache, ids[prep.reused:]):
            logits = step.logits
            if self.cancelled(c.request_id) and step.logits is None:
                _persist(session, prep.key, prep.cache)
                self._failed(c, "The request was cancelled.")
                return []
        prompt_ms = (time.perf_counter() - started) * 1000
        session.emit(ev.CompletionStarted(c.request_id, len(ids), prep.reused, prep.source, prompt_ms))
        opts = c.options
        if opts.seed is not None:
            mx.random.seed(opts.seed)
        job = _Job(c, prep.key, len(ids), prep.reused, prep.source, started, prompt_ms, opts.n)
        caches = [prep.cache, *(prep.cache.copy_prefix(prep.cache.n_tokens) for _ in range(opts.n - 1))]
        limit = max(1, min(opts.max_tokens, window - len(ids)))
        holdback = max((len(s) for s in opts.stop), default=1) - 1
        bias = _bias_vector(opts.logit_bias, logits.shape[-1])
        return [_Row(job, i, cache, logits.reshape(1, -1), _sampler(opts), bias, session.lm.tokenizer.stream(), limit,
                     holdback) for i, cache in enumerate(caches)]

    # -- decoding ---------------------------------------------------------------------------------
    def run(self) -> None:
        """Decode step by step until every row is done; requests queued meanwhile join the batch."""
        while self.rows:
            self._admit_queued()
            self._step()

    def _admit_queued(self) -> None:
        take = getattr(self.session, "take_queued", None)
        while take is not None and len(self.rows) < MAX_ROWS:
            queued = take(cmd.Complete)
            if queued is None:
                return
            self.admit(queued)

    def _step(self) -> None:
        eos = self.session.lm.tokenizer.eos_ids
        going: list[_Row] = []
        for row in self.rows:
            if self.cancelled(row.job.command.request_id):
                row.reason = "cancelled"
                self._finish(row)
                continue
            token = row.next_token()
            for piece in row.take(token, eos):
                self.session.emit(ev.CompletionTokens(row.job.command.request_id, row.index, piece))
            if row.reason:
                self._finish(row)
            else:
                going.append(row)
        self.rows = going
        if not going:
            return
        jobs = {id(row.job) for row in going}
        for row in going:
            row.job.most_rows = max(row.job.most_rows, len(jobs))
        if len(going) == 1:
            row = going[0]
            logits = self.session.lm.model(mx.array([[row.last]]), cache=row.cache.layers)[:, -1, :]
        else:
            logits = self.session.batch_decoder("completion").step([row.cache for row in going], [row.last for row in going])
        for i, row in enumerate(going):
            row.cache.appended([row.last])
            row.logits = logits[i : i + 1]

    def _finish(self, row: _Row) -> None:
        job, session = row.job, self.session
        ended = time.perf_counter()
        first_at = row.first_at or ended
        if len(row.text) > row.emitted and row.reason != "cancelled":
            session.emit(ev.CompletionTokens(job.command.request_id, row.index, row.text[row.emitted:]))
        if row.index == 0:
            _persist(session, job.key, row.cache)  # only the first alternative's cache is kept; saved before the reply ends
        job.rows_left -= 1
        session.emit(ev.CompletionFinished(
            job.command.request_id, row.index, row.text, row.reason, row.word, job.prompt_tokens, job.reused,
            row.generated, job.prompt_ms, (ended - first_at) * 1000, (first_at - job.started) * 1000, job.source,
            job.most_rows))
        if job.rows_left == 0:
            self.cancels.discard(job.command.request_id)


def _prepare_cache(session, ids: list[int], hint: str | None, busy: set[str]) -> _Prepared:
    """Restore the longest stored prefix into the cache this request will extend (see module doc).

    `busy`: keys of requests decoding right now; they are only ever copied from, never trimmed or reused.
    """
    from app.kvstore.conversation_cache import ConversationCache

    manager = session.manager
    target = session_key(hint) if hint else None
    if target in busy:
        target = None  # the same session twice at once: the second gets its own cache
    match = session.prefix_lookup().best(ids, prefer=target)
    if match is not None:
        source, where = _source(manager, match.key)
        if source is not None:
            reused = min(match.tokens, len(ids) - 1, source.n_tokens)  # the last prompt token is fed for logits
            in_place = match.key.startswith(SERVER_PREFIX) and match.key not in busy and (
                match.key == target or (target is None and source.n_tokens - reused <= IN_PLACE_SLACK))
            if in_place:
                reused = source.trim_to(reused)
                manager.pin(match.key)
                return _Prepared(match.key, source, reused, where)
            key = target or _new_key()
            cache = source.copy_prefix(reused)
            reused = cache.n_tokens  # 0 when the sliding-window layers no longer hold that prefix
            manager.put(key, cache, None, SERVER_PERSONA)
            manager.pin(key)
            manager.compact(match.key)
            return _Prepared(key, cache, reused, where)
        session.prefix_lookup().unusable(match.key)
    key = target or _new_key()
    pool = manager.pool
    cache = ConversationCache.empty(session.lm.n_layers, pool.scheme, pool.fingerprint)
    manager.put(key, cache, None, SERVER_PERSONA)
    manager.pin(key)
    return _Prepared(key, cache, 0, "none")


def _source(manager, key: str):
    """(cache, "ram" | "disk") to copy or extend; (None, "none") if it cannot be read.

    Server caches go through the manager (they are the server's own). A chat's or a persona
    preamble's cache is only read from disk, never registered here, so this process never
    saves, evicts or drops it: the app may be writing it at this moment.
    """
    from app.kvstore.conversation_cache import ConversationCache

    if key.startswith(SERVER_PREFIX) or key in manager.entries:
        cache, where, _ = manager.get(key)
        return cache, where
    loaded = manager.pool.load(key, shared=manager.shared_blocks(), drop_bad=False)
    return (loaded, "disk") if isinstance(loaded, ConversationCache) else (None, "none")


def _persist(session, key: str, cache) -> None:
    """Save like a chat's cache, keep RAM within budget, bound the number of server caches.

    The cache is put back first: while other requests joined the batch, pinning them may have
    compacted (or the budget evicted) this key's entry, which then holds an older snapshot.
    """
    manager = session.manager
    manager.put(key, cache, None, SERVER_PERSONA)
    save_cache(session, key, None)  # a full disk is a warning: the reply was already sent
    manager.enforce_budget()
    old = manager.pool.store.keys_beyond_newest(SERVER_PREFIX, MAX_SERVER_CACHES)
    for stale in old:
        if stale != manager.pinned:
            manager.forget(stale)
    if old:
        manager.pool.gc()


def _find_stop(text: str, stops: tuple[str, ...]) -> tuple[int | None, str]:
    hits = [(text.find(s), s) for s in stops if s and s in text]
    return min(hits) if hits else (None, "")


def _sampler(opts: cmd.CompletionOptions):
    if opts.temperature <= 0:
        return lambda logits: mx.argmax(logits, axis=-1)
    inner = make_sampler(temp=opts.temperature, top_p=opts.top_p if 0 < opts.top_p < 1 else 0.0,
                         min_p=max(0.0, opts.min_p), top_k=max(0, opts.top_k))
    return lambda logits: inner(logits - mx.logsumexp(logits, axis=-1, keepdims=True))


def _bias_vector(pairs, vocab: int):
    if not pairs:
        return None
    import numpy as np

    bias = np.zeros((vocab,), dtype=np.float32)
    for token, value in pairs:
        if 0 <= token < vocab:
            bias[token] += value
    return mx.array(bias)
