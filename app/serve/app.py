"""The HTTP front door (Starlette): OpenAI and llama.cpp endpoints over one engine thread.

Errors are JSON in OpenAI's shape, {"error": {"message", "type", "param", "code"}},
with a 4xx for anything the client can fix (bad JSON, wrong field types, a
body over the limit, a prompt over the context window, a wrong API key); an
unexpected failure is a 500 with a message and no traceback (that goes to the log).
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import time
import uuid

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, StreamingResponse
from starlette.routing import Route

from app.engine import commands as cmd
from app.engine import events as ev
from app.serve.bridge import EngineBridge
from app.serve.formats import (Outcome, llama_final, openai_body, openai_chunk, openai_usage_chunk, parley_extra, sse,
                               timings)
from app.serve.parse import BadRequest, Parsed, parse_request

log = logging.getLogger(__name__)
MAX_BODY_BYTES = 8 * 1024 * 1024
OPEN_PATHS = {"/health", "/v1/health"}  # answer without the API key (load balancers, front-end probes)


def error(status: int, message: str, param: str | None = None, code: str | None = None) -> JSONResponse:
    kind = "invalid_request_error" if status < 500 else "server_error"
    if status == 401:
        kind = "authentication_error"
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": code or str(status)}},
                        status_code=status)


class ClientGone(Exception):
    """The client closed the connection before its reply was done."""


def create_app(bridge: EngineBridge, api_key: str | None = None, max_body: int = MAX_BODY_BYTES) -> Starlette:
    """The ASGI app; the engine starts with the app's lifespan and stops (saving every cache) with it."""

    @contextlib.asynccontextmanager
    async def lifespan(app):
        await bridge.start()
        if bridge.failure:
            log.error("the model could not be started: %s", bridge.failure)
        yield
        await bridge.stop()

    async def read_json(request: Request):
        length = request.headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > max_body):
            raise BadRequest(f"The request body is larger than {max_body} bytes.", status=413, code="body_too_large")
        chunks, size = [], 0
        try:
            async for chunk in request.stream():
                size += len(chunk)
                if size > max_body:
                    raise BadRequest(f"The request body is larger than {max_body} bytes.", status=413, code="body_too_large")
                chunks.append(chunk)
        except ClientDisconnect:
            raise ClientGone() from None
        try:
            return json.loads(b"".join(chunks) or b"null")
        except (ValueError, UnicodeDecodeError) as exc:
            raise BadRequest(f"The request body is not valid JSON ({exc}).", code="invalid_json") from None

    def require_model():
        if bridge.failure:
            raise BadRequest(f"The model could not be started: {bridge.failure}", status=503, code="model_failed")
        if not bridge.ready:
            raise BadRequest("The model is still loading; try again in a moment.", status=503, code="loading")
        return bridge.model, bridge.tokenizer

    def guarded(handler):
        """Authentication, then the handler; every refusal or failure becomes a JSON error."""

        async def endpoint(request: Request):
            if api_key and request.url.path not in OPEN_PATHS:
                given = request.headers.get("authorization", "")
                if not hmac.compare_digest(given.encode(), f"Bearer {api_key}".encode()):
                    return error(401, "Missing or wrong API key: send `Authorization: Bearer <key>` (the --api-key "
                                      "given to `parley serve`).", code="invalid_api_key")
            try:
                return await handler(request)
            except BadRequest as exc:
                return error(exc.status, exc.message, exc.param, exc.code)
            except ClientGone:
                return error(499, "The client closed the connection.")
            except Exception:
                log.exception("request %s failed", request.url.path)
                return error(500, "Internal error while handling the request; the server log has the details.")

        return endpoint

    # -- generation -------------------------------------------------------------------------
    async def generate(request: Request, kind: str):
        model, tokenizer = require_model()
        body = await read_json(request)
        parsed = parse_request(body, kind, tokenizer, model.context_window, request.headers.get("x-session-id"))
        request_id = ("chatcmpl-" if kind == "chat" else "cmpl-") + uuid.uuid4().hex[:24]
        events = bridge.subscribe(request_id)
        bridge.submit(cmd.Complete(request_id, parsed.prompt_ids, parsed.options, parsed.session))
        name = parsed.model or model.name
        if parsed.stream:
            stream = llama_stream if kind == "llama" else openai_stream
            return StreamingResponse(stream(request, request_id, events, parsed, kind, name), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        outcome = await collect(request, request_id, events, parsed)
        if kind == "llama":
            return JSONResponse(llama_final(name, outcome))
        return JSONResponse(openai_body(kind, request_id, name, outcome))

    async def collect(request: Request, request_id: str, events: asyncio.Queue, parsed: Parsed) -> Outcome:
        watcher = asyncio.create_task(wait_for_disconnect(request))
        outcome = Outcome()
        try:
            async for event in request_events(request_id, events, parsed, watcher):
                record(outcome, event)
                if isinstance(event, ev.CompletionFailed):
                    raise BadRequest(event.message, status=500, code="generation_failed")
            if len(outcome.finished) < parsed.options.n and watcher.done():
                raise ClientGone()
            return outcome
        finally:
            watcher.cancel()

    async def openai_stream(request, request_id, events, parsed: Parsed, kind: str, name: str):
        outcome = Outcome()
        first_sent: set[int] = set()
        async with watched(request, request_id, events, parsed) as stream:
            async for event in stream:
                for chunk in openai_chunks(outcome, event, first_sent, request_id, kind, name):
                    yield chunk
                if isinstance(event, ev.CompletionFailed):
                    return
        if parsed.include_usage:
            yield sse(openai_usage_chunk(kind, request_id, name, outcome))
        yield sse("[DONE]")

    def openai_chunks(outcome: Outcome, event, first_sent: set[int], request_id: str, kind: str, name: str):
        """The SSE lines one engine event becomes."""
        record(outcome, event)
        if isinstance(event, ev.CompletionFailed):
            yield sse({"error": {"message": event.message, "type": "server_error", "param": None, "code": "failed"}})
            return
        index = getattr(event, "index", None)
        if kind == "chat" and index is not None and index not in first_sent:
            first_sent.add(index)
            yield sse(openai_chunk(kind, request_id, name, index, first=True))
        if isinstance(event, ev.CompletionTokens):
            yield sse(openai_chunk(kind, request_id, name, index, event.text))
        elif isinstance(event, ev.CompletionFinished):
            chunk = openai_chunk(kind, request_id, name, index, None if kind == "chat" else "",
                                 finish="length" if event.finish_reason == "length" else "stop")
            if index == 0:
                chunk["parley"] = parley_extra(outcome)
            yield sse(chunk)

    async def llama_stream(request, request_id, events, parsed: Parsed, kind: str, name: str):
        outcome = Outcome()
        async with watched(request, request_id, events, parsed) as stream:
            async for event in stream:
                record(outcome, event)
                if isinstance(event, ev.CompletionFailed):
                    yield sse({"error": {"message": event.message, "type": "server_error", "code": 500}})
                    return
                if isinstance(event, ev.CompletionTokens):
                    yield sse({"content": event.text, "stop": False, "index": event.index, "id_slot": 0})
                elif isinstance(event, ev.CompletionFinished):
                    yield sse(llama_final(name, outcome, event.index, with_content=False))

    @contextlib.asynccontextmanager
    async def watched(request, request_id, events, parsed: Parsed):
        """This request's events, watching for the client to leave; closing it cancels an unfinished request."""
        watcher = asyncio.create_task(wait_for_disconnect(request))
        stream = request_events(request_id, events, parsed, watcher)
        try:
            yield stream
        finally:
            watcher.cancel()
            await stream.aclose()

    async def request_events(request_id: str, events: asyncio.Queue, parsed: Parsed, watcher=None):
        """This request's events until it is over; a client that leaves cancels it (engine side too)."""
        done = False
        finished = 0
        try:
            while not done:
                try:
                    event = await next_event(events, watcher)
                except ClientGone:
                    return
                if isinstance(event, ev.CompletionFailed):
                    done = True
                elif isinstance(event, ev.CompletionFinished):
                    finished += 1
                    done = finished >= parsed.options.n or event.finish_reason == "cancelled"
                yield event
        finally:
            bridge.unsubscribe(request_id)
            if not done:
                bridge.cancel(request_id)

    async def tokenize(request: Request):
        _, tokenizer = require_model()
        body = await read_json(request)
        content = body.get("content") if isinstance(body, dict) else None
        if not isinstance(content, str):
            raise BadRequest("`content` must be the text to tokenize.", "content")
        ids = tokenizer.encode(content)
        if isinstance(body.get("with_pieces"), bool) and body["with_pieces"]:
            return JSONResponse({"tokens": [{"id": i, "piece": tokenizer.decode([i])} for i in ids]})
        return JSONResponse({"tokens": ids})

    async def detokenize(request: Request):
        _, tokenizer = require_model()
        body = await read_json(request)
        tokens = body.get("tokens") if isinstance(body, dict) else None
        if not isinstance(tokens, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in tokens):
            raise BadRequest("`tokens` must be a list of token ids.", "tokens")
        bad = [t for t in tokens if not 0 <= t < tokenizer.vocab_size]
        if bad:
            raise BadRequest(f"`tokens` holds {bad[0]}, which is not a token id of this model "
                             f"(0..{tokenizer.vocab_size - 1}).", "tokens")
        return JSONResponse({"content": tokenizer.decode(tokens)})

    async def health(request: Request):
        if bridge.failure:
            return JSONResponse({"status": "error", "error": {"message": bridge.failure}}, status_code=503)
        if not bridge.ready:
            return JSONResponse({"status": "loading model"}, status_code=503)
        return JSONResponse({"status": "ok", "parley": bridge.counters()})

    async def models(request: Request):
        model, _ = require_model()
        return JSONResponse({"object": "list", "data": [{
            "id": model.name, "object": "model", "created": int(time.time()), "owned_by": "parley",
            "meta": {"n_ctx_train": model.context_window, "kv_scheme": model.scheme}}]})

    async def props(request: Request):
        model, tokenizer = require_model()
        return JSONResponse({
            "default_generation_settings": {"n_ctx": model.context_window, "model": model.name,
                                            "params": {"n_predict": -1, "temperature": 0.8, "top_p": 1.0,
                                                       "top_k": 0, "min_p": 0.0, "cache_prompt": True}},
            "n_ctx": model.context_window, "total_slots": 1, "model_path": model.folder,
            "model_alias": model.name, "chat_template": tokenizer.template_source, "build_info": "parley",
            "modalities": {"vision": False, "audio": False}})

    def post(handler):
        return guarded(handler)

    routes = [
        Route("/v1/chat/completions", post(lambda r: generate(r, "chat")), methods=["POST"]),
        Route("/chat/completions", post(lambda r: generate(r, "chat")), methods=["POST"]),
        Route("/v1/completions", post(lambda r: generate(r, "text")), methods=["POST"]),
        Route("/completions", post(lambda r: generate(r, "text")), methods=["POST"]),
        Route("/completion", post(lambda r: generate(r, "llama")), methods=["POST"]),
        Route("/tokenize", post(tokenize), methods=["POST"]),
        Route("/detokenize", post(detokenize), methods=["POST"]),
        Route("/v1/models", guarded(models), methods=["GET"]),
        Route("/models", guarded(models), methods=["GET"]),
        Route("/props", guarded(props), methods=["GET"]),
        Route("/health", guarded(health), methods=["GET"]),
        Route("/v1/health", guarded(health), methods=["GET"]),
    ]

    async def http_error(request: Request, exc: HTTPException):
        message = {404: f"There is no endpoint {request.url.path}: see the README for the ones Parley serves.",
                   405: f"{request.method} is not allowed on {request.url.path}."}.get(exc.status_code, str(exc.detail))
        return error(exc.status_code, message)

    async def server_error(request: Request, exc: Exception):
        log.exception("unhandled error on %s", request.url.path)
        return error(500, "Internal error while handling the request; the server log has the details.")

    return Starlette(routes=routes, lifespan=lifespan,
                     exception_handlers={HTTPException: http_error, Exception: server_error})


async def next_event(events: asyncio.Queue, watcher: asyncio.Task | None):
    """The next engine event, or `ClientGone` if the client left first."""
    if watcher is None:
        return await events.get()
    getter = asyncio.ensure_future(events.get())
    done, _ = await asyncio.wait({getter, watcher}, return_when=asyncio.FIRST_COMPLETED)
    if getter in done:
        return getter.result()
    getter.cancel()
    raise ClientGone()


async def wait_for_disconnect(request: Request) -> None:
    """Returns when the client closes the connection (the body is already read, so only that can arrive)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


def record(outcome: Outcome, event: ev.Event) -> None:
    if isinstance(event, ev.CompletionStarted):
        outcome.started = event
    elif isinstance(event, ev.CompletionFinished):
        outcome.finished[event.index] = event


__all__ = ["create_app", "timings"]
