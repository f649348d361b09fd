"""The ASGI app (Starlette): OpenAI-compatible routes over a Backend. No model code here: requests become the batch
runner's submissions, its events become JSON or server-sent events. Every error is OpenAI-shaped JSON."""
from __future__ import annotations

import asyncio
import hmac
import json
import logging
from functools import partial

import anyio
from sse_starlette import EventSourceResponse
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from ..engine.batch import BatchClosed
from ..engine.events import Done, Error, Text
from ..engine.scheduler import QueueFull
from ..errors import ContextOverflowError, HybridMoEError
from .backend import Backend
from .metrics import CONTENT_TYPE, registry_for, render
from .protocol import (FINISH, APIError, ChatRequest, CompletionRequest, envelope, new_id, parse, usage)

log = logging.getLogger("hybridmoe.server")
DISCONNECT_POLL_S = 0.25  # how often a non-streamed request checks that its client is still there
PUBLIC = ("/health",)  # answered without the API key (load balancers and supervisors probe it)


def json_dumps(obj) -> str:
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":"))


class Submission:
    """A request handed to the batch runner, its events carried to this event loop."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop = loop
        self.queue: asyncio.Queue = asyncio.Queue()
        self.request = None

    def put(self, event) -> None:  # on the runner's thread
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, event)
        except RuntimeError:  # the loop has closed (shutdown): nobody is listening
            pass

    @classmethod
    async def start(cls, backend: Backend, prompt, config) -> "Submission":
        sub = cls(asyncio.get_running_loop())
        submit = partial(backend.batch.submit, prompt, config, on_event=sub.put)
        try:
            sub.request = await anyio.to_thread.run_sync(submit)  # tokenizing may take a while: off the loop
        except QueueFull as e:
            raise APIError(429, str(e)) from None
        except BatchClosed as e:
            raise APIError(503, str(e)) from None
        except ContextOverflowError as e:
            raise APIError(400, str(e), code="context_length_exceeded") from None
        except (HybridMoEError, ValueError) as e:
            raise APIError(400, str(e)) from None
        return sub

    async def events(self):
        """The events in order; consecutive texts of one channel that are already waiting come as one, so a busy
        server sends fewer, larger chunks instead of falling behind."""
        while True:
            ev = await self.queue.get()
            while isinstance(ev, Text) and not self.queue.empty():
                nxt = self.queue.get_nowait()
                if not (isinstance(nxt, Text) and nxt.channel == ev.channel):
                    yield ev
                    ev = nxt
                    continue
                ev = Text(ev.text + nxt.text, ev.channel, ev.token_ids + nxt.token_ids)
            yield ev
            if isinstance(ev, Done):
                return

    def cancel(self) -> None:
        if self.request is not None and self.request.done is None:
            self.request.cancel()


def build_app(backend: Backend) -> Starlette:
    opts = backend.serve
    registry = registry_for(backend)

    def authorize(request: Request) -> None:
        if opts.api_key is None or request.url.path in PUBLIC:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), opts.api_key.encode()):
            raise APIError(401, "invalid or missing API key (send: Authorization: Bearer KEY)",
                           code="invalid_api_key")

    def serving() -> Backend:
        if backend.error is not None:
            raise APIError(503, f"the model failed to load: {backend.error}")
        if not backend.ready:
            raise APIError(503, f"the model is loading ({100 * backend.progress:.0f}%); try again shortly")
        return backend

    async def read_json(request: Request):
        limit = opts.max_body_bytes
        size = request.headers.get("content-length", "")
        if size.isdigit() and int(size) > limit:
            raise APIError(413, f"the request body has {size} bytes; this server takes at most {limit}")
        body = bytearray()
        async for part in request.stream():
            body += part
            if len(body) > limit:
                raise APIError(413, f"the request body is over {limit} bytes, the most this server takes")
        try:
            return json.loads(body)
        except (ValueError, UnicodeDecodeError) as e:
            raise APIError(400, f"the request body is not valid JSON ({e})") from None

    async def health(request: Request) -> Response:
        if backend.error is not None:
            return JSONResponse({"status": "error", "message": backend.error}, status_code=503)
        if not backend.ready:
            return JSONResponse({"status": "loading", "progress": round(backend.progress, 4)}, status_code=503)
        return JSONResponse({"status": "ok", "progress": 1.0})

    async def metrics(request: Request) -> Response:
        authorize(request)
        return Response(render(registry), media_type=CONTENT_TYPE)

    async def models(request: Request) -> Response:
        authorize(request)
        b = serving()
        return JSONResponse({"object": "list", "data": [
            {"id": b.id, "object": "model", "created": b.created, "owned_by": "hybridmoe", "meta": b.meta()}]})

    async def chat_completions(request: Request) -> Response:
        authorize(request)
        body: ChatRequest = parse(ChatRequest, await read_json(request))
        b = serving()
        sub = await Submission.start(b, body.conversation(), body.config(body.token_limit or b.engine.max_context))
        if body.stream:
            return stream(sub, chat_chunks(sub, body, b.id))
        texts, done = await collect(request, sub)
        message = {"role": "assistant", "content": "".join(texts["answer"])}
        if texts["reasoning"]:
            message["reasoning_content"] = "".join(texts["reasoning"])
        return JSONResponse(envelope(new_id("chatcmpl"), "chat.completion", b.id, [
            {"index": 0, "message": message, "logprobs": None, "finish_reason": FINISH.get(done.reason)}],
            usage=usage(done.prompt_tokens, done.completion_tokens)))

    async def completions(request: Request) -> Response:
        authorize(request)
        body: CompletionRequest = parse(CompletionRequest, await read_json(request))
        b = serving()
        sub = await Submission.start(b, body.input(), body.config(body.token_limit or b.engine.max_context))
        if body.stream:
            return stream(sub, completion_chunks(sub, body, b.id))
        texts, done = await collect(request, sub)
        return JSONResponse(envelope(new_id("cmpl"), "text_completion", b.id, [
            {"index": 0, "text": "".join(texts["raw"]), "logprobs": None, "finish_reason": FINISH.get(done.reason)}],
            usage=usage(done.prompt_tokens, done.completion_tokens)))

    async def http_error(request: Request, exc: HTTPException) -> Response:
        message = {404: f"no route {request.url.path}", 405: f"{request.method} is not allowed on {request.url.path}"}
        err = APIError(exc.status_code, message.get(exc.status_code, str(exc.detail)))
        return JSONResponse(err.body(), status_code=exc.status_code, headers=getattr(exc, "headers", None))

    return Starlette(routes=[
        Route("/health", answered(health), methods=["GET"]),
        Route("/metrics", answered(metrics), methods=["GET"]),
        Route("/v1/models", answered(models), methods=["GET"]),
        Route("/v1/chat/completions", answered(chat_completions), methods=["POST"]),
        Route("/v1/completions", answered(completions), methods=["POST"]),
    ], exception_handlers={HTTPException: http_error})


def answered(endpoint):
    """The endpoint, with its errors answered as OpenAI-shaped JSON; an unexpected one is logged in one line (a
    handler registered for Exception would still let the traceback through to the server's log)."""
    async def run(request: Request) -> Response:
        try:
            return await endpoint(request)
        except APIError as e:
            return JSONResponse(e.body(), status_code=e.status)
        except Exception as e:
            log.error("internal error on %s: %s: %s", request.url.path, type(e).__name__, e)
            return JSONResponse(APIError(500, f"internal error: {type(e).__name__}: {e}").body(), status_code=500)
    return run


def stream(sub: Submission, chunks) -> Response:
    async def guarded():
        try:
            async for chunk in chunks:
                yield chunk
        finally:  # the client went away (the task is cancelled) or the answer ended: the row leaves the batch
            sub.cancel()
    return EventSourceResponse(guarded(), sep="\n", ping=15)


async def collect(request: Request, sub: Submission) -> tuple[dict[str, list[str]], Done]:
    """A whole answer: text by channel ("raw" with the <think> tags as the model wrote them), and its Done. A
    client that disconnects meanwhile cancels the request."""
    texts: dict[str, list[str]] = {"answer": [], "reasoning": [], "raw": []}
    tags = ThinkTags(sub)
    try:
        while True:
            try:
                ev = await asyncio.wait_for(sub.queue.get(), DISCONNECT_POLL_S)  # (a cancelled get loses nothing)
            except TimeoutError:
                if await request.is_disconnected():
                    sub.cancel()
                    raise APIError(499, "the client closed the connection") from None
                continue
            if isinstance(ev, Text):
                texts[ev.channel].append(ev.text)
                texts["raw"].append(tags.wrap(ev))
            elif isinstance(ev, Error):
                raise APIError(500, ev.message)
            elif isinstance(ev, Done):
                return texts, ev
    finally:
        sub.cancel()


class ThinkTags:
    """Puts back the <think> tags that the engine's channels took out, for plain completions (a prompt that opened
    <think> itself starts in the reasoning channel)."""

    def __init__(self, sub: Submission):
        self.channel = "reasoning" if sub.request.opened_think else "answer"

    def wrap(self, ev: Text) -> str:
        tag = ""
        if ev.channel != self.channel:
            tag = "<think>" if ev.channel == "reasoning" else "</think>"
            self.channel = ev.channel
        return tag + ev.text


async def chat_chunks(sub: Submission, body: ChatRequest, model: str):
    id_ = new_id("chatcmpl")
    extra = {"usage": None} if body.include_usage else {}

    def chunk(delta: dict, finish: str | None = None) -> str:
        return json_dumps(envelope(id_, "chat.completion.chunk", model,
                                   [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}], **extra))

    yield chunk({"role": "assistant", "content": ""})
    async for ev in sub.events():
        if isinstance(ev, Text) and ev.text:
            yield chunk({"reasoning_content" if ev.channel == "reasoning" else "content": ev.text})
        elif isinstance(ev, Error):
            yield json_dumps(APIError(500, ev.message).body())
        elif isinstance(ev, Done):
            if ev.reason in FINISH:
                yield chunk({}, FINISH[ev.reason])
            if body.include_usage:
                yield json_dumps(envelope(id_, "chat.completion.chunk", model, [],
                                          usage=usage(ev.prompt_tokens, ev.completion_tokens)))
    yield "[DONE]"


async def completion_chunks(sub: Submission, body: CompletionRequest, model: str):
    id_ = new_id("cmpl")
    extra = {"usage": None} if body.include_usage else {}
    tags = ThinkTags(sub)

    def chunk(text: str, finish: str | None = None) -> str:
        return json_dumps(envelope(id_, "text_completion", model,
                                   [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish}], **extra))

    async for ev in sub.events():
        if isinstance(ev, Text) and ev.text:
            yield chunk(tags.wrap(ev))
        elif isinstance(ev, Error):
            yield json_dumps(APIError(500, ev.message).body())
        elif isinstance(ev, Done):
            if ev.reason in FINISH:
                yield chunk("", FINISH[ev.reason])
            if body.include_usage:
                yield json_dumps(envelope(id_, "text_completion", model, [],
                                          usage=usage(ev.prompt_tokens, ev.completion_tokens)))
    yield "[DONE]"
