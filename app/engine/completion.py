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

from app.engine import commands as cmd
from app.engine import events as ev
from app.engine.generation import prefill
from app.errors import ParleyError
from app.kvstore.prefix_lookup import PrefixLookup

log = logging.getLogger(__name__)

SERVER_PERSONA = "serve"  # persona_id recorded on server caches (they belong to no persona)
SERVER_PREFIX = "srv:"
MAX_SERVER_CACHES = 64
IN_PLACE_SLACK = 64  # a continuation may re-render this many trailing tokens differently and still extend in place


def session_key(hint: str) -> str:
    """The cache a session hint names (hashed: hints are client text)."""
    return f"{SERVER_PREFIX}s:{hashlib.sha256(hint.encode()).hexdigest()[:24]}"


def _new_key() -> str:
    return f"{SERVER_PREFIX}{uuid.uuid4().hex[:16]}"


def _lookup(session) -> PrefixLookup:
    lookup = getattr(session, "_prefix_lookup", None)
    if lookup is None:
        lookup = session._prefix_lookup = PrefixLookup(session.manager)
    return lookup


def describe_model(session, c: cmd.DescribeModel) -> None:
    lm = session.lm
    session.emit(ev.ModelDescribed(c.request_id, lm.name, str(lm.folder), lm.fingerprint, lm.context_window,
                                   session.manager.pool.scheme_id))


def run_completion(session, c: cmd.Complete) -> None:
    """One request; every outcome ends in `CompletionFinished` (per alternative) or `CompletionFailed`."""
    cancels = getattr(session, "cancelled_requests", set())

    def cancelled() -> bool:
        return c.request_id in cancels or session.cancelled()

    try:
        if cancelled():
            session.emit(ev.CompletionFailed(c.request_id, "The request was cancelled before it started."))
            return
        _complete(session, c, cancelled)
    except ParleyError as exc:
        session.emit(ev.CompletionFailed(c.request_id, str(exc)))
    except Exception as exc:  # the client gets a message, the log gets the traceback
        log.error("completion %s failed:\n%s", c.request_id, traceback.format_exc())
        session.emit(ev.CompletionFailed(c.request_id, f"Internal error while generating: {exc}"))
    finally:
        cancels.discard(c.request_id)


@dataclass
class _Prepared:
    key: str
    cache: object
    reused: int
    source: str


def _complete(session, c: cmd.Complete, cancelled) -> None:
    ids = list(c.prompt_ids)
    window = session.lm.context_window
    if not ids:
        raise ParleyError("The prompt is empty: send some text.")
    if len(ids) + 1 > window:
        raise ParleyError(f"The prompt is {len(ids)} tokens; the model's context window holds {window}. Send a shorter prompt.")
    started = time.perf_counter()
    prep = _prepare_cache(session, ids, c.session)
    logits = None
    for step in prefill(session.lm.model, prep.cache, ids[prep.reused:]):
        logits = step.logits
        if cancelled() and step.logits is None:
            _persist(session, prep.key)
            session.emit(ev.CompletionFailed(c.request_id, "The request was cancelled."))
            return
    prompt_ms = (time.perf_counter() - started) * 1000
    session.emit(ev.CompletionStarted(c.request_id, len(ids), prep.reused, prep.source, prompt_ms))
    opts = c.options
    if opts.seed is not None:
        mx.random.seed(opts.seed)
    copies = [prep.cache.copy_prefix(prep.cache.n_tokens) for _ in range(max(0, opts.n - 1))]
    for index, cache in enumerate([prep.cache, *copies]):
        finished = _generate(session, c, index, cache, logits, cancelled)
        if index == 0:
            _persist(session, prep.key)  # only the first alternative's cache is kept; saved before the reply ends
        session.emit(ev.CompletionFinished(
            c.request_id, index, finished.text, finished.reason, finished.stopping_word, len(ids), prep.reused,
            finished.generated, prompt_ms, finished.decode_ms, (finished.first_at - started) * 1000, prep.source))
        if finished.reason == "cancelled":
            break


def _prepare_cache(session, ids: list[int], hint: str | None) -> _Prepared:
    """Restore the longest stored prefix into the cache this request will extend (see module doc)."""
    from app.kvstore.conversation_cache import ConversationCache

    manager = session.manager
    target = session_key(hint) if hint else None
    match = _lookup(session).best(ids, prefer=target)
    if match is not None:
        source, where, miss = manager.get(match.key)
        if source is not None:
            reused = min(match.tokens, len(ids) - 1, source.n_tokens)  # the last prompt token is fed for logits
            in_place = match.key.startswith(SERVER_PREFIX) and (
                match.key == target or (target is None and source.n_tokens - reused <= IN_PLACE_SLACK))
            if in_place:
                source.trim_to(reused)
                manager.pin(match.key)
                return _Prepared(match.key, source, reused, where)
            key = target or _new_key()
            cache = source.copy_prefix(reused)
            manager.put(key, cache, None, SERVER_PERSONA)
            manager.pin(key)
            manager.compact(match.key)
            return _Prepared(key, cache, reused, where)
    key = target or _new_key()
    pool = manager.pool
    cache = ConversationCache.empty(session.lm.n_layers, pool.scheme, pool.fingerprint)
    manager.put(key, cache, None, SERVER_PERSONA)
    manager.pin(key)
    return _Prepared(key, cache, 0, "none")


def _persist(session, key: str) -> None:
    """Save like a chat's cache, keep RAM within budget, bound the number of server caches."""
    manager = session.manager
    manager.mark_dirty(key)
    manager.save(key)
    manager.enforce_budget()
    old = [r["key"] for r in manager.pool.db.query(
        "select key from caches where key like 'srv:%' order by updated_at desc limit -1 offset ?", [MAX_SERVER_CACHES])]
    for stale in old:
        if stale != manager.pinned:
            manager.forget(stale)
    if old:
        manager.pool.gc()


@dataclass
class _Finished:
    text: str
    reason: str
    stopping_word: str
    generated: int
    first_at: float
    decode_ms: float


def _generate(session, c: cmd.Complete, index: int, cache, logits, cancelled) -> _Finished:
    """Decode one alternative, streaming text that cannot be the start of a stop string."""
    lm = session.lm
    opts = c.options
    tok = lm.tokenizer
    stream = tok.stream()
    limit = max(0, min(opts.max_tokens, lm.context_window - cache.n_tokens))
    holdback = max((len(s) for s in opts.stop), default=1) - 1
    text, emitted, generated = "", 0, 0
    reason, word = "length", ""
    first_at = None
    for token in _decode(lm.model, cache, logits, opts, tok.eos_ids, limit):
        first_at = first_at or time.perf_counter()
        generated += 1
        if token in tok.eos_ids:
            reason = "stop"
            break
        text += stream.push(token)
        cut, word = _find_stop(text, opts.stop)
        if cut is not None:
            text, reason = text[:cut], "stop"
            break
        if len(text) - holdback > emitted:
            session.emit(ev.CompletionTokens(c.request_id, index, text[emitted : len(text) - holdback]))
            emitted = len(text) - holdback
        if cancelled():
            reason = "cancelled"
            break
    ended = time.perf_counter()
    first_at = first_at or ended
    if len(text) > emitted and reason != "cancelled":
        session.emit(ev.CompletionTokens(c.request_id, index, text[emitted:]))
    return _Finished(text, reason, word, generated, first_at, (ended - first_at) * 1000)


def _find_stop(text: str, stops: tuple[str, ...]) -> tuple[int | None, str]:
    hits = [(text.find(s), s) for s in stops if s and s in text]
    return min(hits) if hits else (None, "")


def _decode(model, cache, logits, opts: cmd.CompletionOptions, eos_ids: set[int], limit: int):
    """Yield sampled token ids (at most `limit`); each yielded token is fed back before the next."""
    sample = _sampler(opts)
    bias = _bias_vector(opts.logit_bias, logits.shape[-1])
    logits = logits.reshape(1, -1)
    for _ in range(limit):
        if bias is not None:
            logits = logits + bias
        token_id = int(sample(logits).item())
        yield token_id
        if token_id in eos_ids:
            return
        logits = model(mx.array([[token_id]]), cache=cache.layers)[:, -1, :]
        cache.appended([token_id])


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
