"""`lmtrain serve`: an OpenAI-compatible HTTP server over the batch engine, and the web chat page.

Endpoints (the subset of OpenAI's API that chat clients use):

    POST /v1/chat/completions   messages -> a reply, whole or streamed as server-sent events
    POST /v1/completions        a prompt -> its continuation, whole or streamed
    GET  /v1/models             the one model this server holds
    GET  /health                {"status": "ok", running and waiting requests}
    GET  /                      the chat page (lmtrain/web/index.html, no CDN, no build step)

Errors come back as OpenAI's error object ``{"error": {"message", "type", "param", "code"}}`` with
400 for a malformed request, 401 for a wrong or missing key (``--api-key``), 404 for another
model's name or an unknown path, 413 for a prompt longer than the context, 503 when the queue is
full. Requests are decoded together (``lmtrain.batching``); a client that disconnects mid-stream
gives its slot back at the next step. FastAPI and uvicorn come with the ``serve`` extra: the
well-kept ASGI stack litgpt and vLLM serve with too, so clients meet the same HTTP behaviour.
"""

# No `from __future__ import annotations`: FastAPI reads the handlers' annotations as objects, and the
# request class is imported inside create_app (FastAPI is an extra).
import asyncio
import contextlib
import json
import logging
import secrets
import time
import uuid
from dataclasses import dataclass
from importlib import resources
from typing import Any

from lmtrain.batching import BatchEngine, Job, QueueFull
from lmtrain.chat import ChatModel
from lmtrain.chat_template import ROLES
from lmtrain.errors import DataError, LmtrainError
from lmtrain.generate import SamplingParams
from lmtrain.sample import prompt_tokens

log = logging.getLogger(__name__)

MAX_BODY_BYTES = 4 << 20
MAX_STOP_STRINGS = 4


class ApiError(Exception):
    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.kind, self.param, self.code = status, kind, param, code

    def body(self) -> dict:
        return {"error": {"message": str(self), "type": self.kind, "param": self.param, "code": self.code}}


@dataclass
class Request:
    """A completion request, checked: what the engine needs."""

    prompt_ids: list[int]
    params: SamplingParams
    max_tokens: int
    stop: list[str]
    seed: int | None
    stream: bool
    include_usage: bool


def _number(body: dict, key: str, default, low: float, high: float, integer: bool = False):
    value = body.get(key, default)
    if value is None:
        return default
    kinds = (int,) if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kinds) or not low <= value <= high:
        kind = "an integer" if integer else "a number"
        raise ApiError(400, f"'{key}' must be {kind} in [{low:g}, {high:g}], got {json.dumps(value)[:40]}", param=key)
    return value


def _stop(body: dict) -> list[str]:
    stop = body.get("stop")
    if stop is None:
        return []
    stop = [stop] if isinstance(stop, str) else stop
    if not isinstance(stop, list) or len(stop) > MAX_STOP_STRINGS or not all(isinstance(s, str) for s in stop):
        raise ApiError(400, f"'stop' must be a string or a list of at most {MAX_STOP_STRINGS} strings", param="stop")
    return [s for s in stop if s]


def _content(message: dict, n: int) -> str:
    content = message.get("content")
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # [{"type": "text", "text": ...}, ...]: OpenAI's content parts
        if all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str) for p in content):
            return "".join(p["text"] for p in content)
    raise ApiError(400, f"messages[{n}].content must be a string or a list of text parts", param="messages")


def parse_messages(body: dict) -> list[dict]:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "'messages' must be a non-empty list", param="messages")
    out = []
    for n, message in enumerate(messages):
        if not isinstance(message, dict):
            raise ApiError(400, f"messages[{n}] must be an object", param="messages")
        role = message.get("role")
        role = "system" if role == "developer" else role  # OpenAI's newer name for it
        if role not in ROLES:
            raise ApiError(400, f"messages[{n}].role must be one of {', '.join(ROLES)}, got {json.dumps(role)[:40]}",
                           param="messages")
        out.append({"role": role, "content": _content(message, n)})
    return out


class Server:
    """The HTTP side: turns requests into engine jobs and jobs' events into responses."""

    def __init__(self, chat_model: ChatModel, model_name: str, api_key: str | None = None, slots: int = 8,
                 queue_size: int = 32, context: int | None = None) -> None:
        loaded = chat_model.loaded
        self.chat_model, self.model_name, self.api_key = chat_model, model_name, api_key
        self.engine = BatchEngine(loaded.model, loaded.tokenizer, chat_model.stop_ids, loaded.amp_dtype, slots,
                                  queue_size, context)
        self.created = int(time.time())

    # -- requests ---------------------------------------------------------------------------

    def check_key(self, headers) -> None:
        if self.api_key is None:
            return
        given = headers.get("authorization", "")
        if not secrets.compare_digest(given.encode(), f"Bearer {self.api_key}".encode()):
            raise ApiError(401, "invalid API key: send 'Authorization: Bearer <key>' with the key given to "
                                "`lmtrain serve --api-key`", "invalid_api_key", code="invalid_api_key")

    def check_model(self, body: dict) -> None:
        name = body.get("model")
        if name is not None and name != self.model_name:
            raise ApiError(404, f"the model '{str(name)[:80]}' does not exist; this server has '{self.model_name}'",
                           "invalid_request_error", "model", "model_not_found")

    def request(self, body: dict, prompt_ids: list[int]) -> Request:
        temperature = _number(body, "temperature", 1.0, 0.0, 2.0)
        top_p = _number(body, "top_p", 1.0, 0.0, 1.0)
        if top_p == 0:
            raise ApiError(400, "'top_p' must be greater than 0", param="top_p")
        max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
        room = self.engine.context - len(prompt_ids)
        if room <= 0:
            raise ApiError(413, f"the prompt is {len(prompt_ids)} tokens; this model's context is "
                                f"{self.engine.context} tokens", code="context_length_exceeded")
        if max_tokens is not None:
            key = "max_completion_tokens" if "max_completion_tokens" in body else "max_tokens"
            max_tokens = _number(body, key, None, 1, 1 << 20, integer=True)
        if body.get("n", 1) != 1:
            raise ApiError(400, "'n' must be 1: this server returns one choice", param="n")
        seed = _number(body, "seed", None, -(1 << 63), (1 << 63) - 1, integer=True)
        stream = body.get("stream", False)
        if not isinstance(stream, bool):
            raise ApiError(400, "'stream' must be true or false", param="stream")
        options = body.get("stream_options") or {}
        include_usage = isinstance(options, dict) and options.get("include_usage") is True
        return Request(prompt_ids, SamplingParams(temperature=float(temperature), top_p=float(top_p)),
                       min(max_tokens or room, room), _stop(body), None if seed is None else seed % (1 << 63),
                       stream, include_usage)

    def chat_prompt(self, body: dict) -> list[int]:
        try:
            return self.chat_model.prompt_ids(parse_messages(body))
        except DataError as exc:  # the template refused the conversation (raise_exception)
            raise ApiError(400, str(exc), param="messages") from None

    def completion_prompt(self, body: dict) -> list[int]:
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
            prompt = prompt[0]
        if not isinstance(prompt, str):
            raise ApiError(400, "'prompt' must be a string", param="prompt")
        try:
            return prompt_tokens(self.chat_model.loaded, prompt)  # as `lmtrain sample` reads a prompt
        except LmtrainError as exc:
            raise ApiError(413, str(exc), code="context_length_exceeded") from None

    # -- running them ---------------------------------------------------------------------

    def start(self, request: Request) -> tuple[Job, asyncio.Queue]:
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()

        def emit(kind: str, value) -> None:
            loop.call_soon_threadsafe(events.put_nowait, (kind, value))

        job = Job(request.prompt_ids, request.params, request.max_tokens, emit, request.stop, request.seed)
        try:
            self.engine.submit(job)
        except QueueFull as exc:
            raise ApiError(503, str(exc), "server_overloaded", code="queue_full") from None
        except LmtrainError as exc:
            raise ApiError(413, str(exc), code="context_length_exceeded") from None
        return job, events

    def usage(self, request: Request, job: Job) -> dict:
        prompt = len(request.prompt_ids)
        return {"prompt_tokens": prompt, "completion_tokens": job.completion_tokens,
                "total_tokens": prompt + job.completion_tokens}


def _finish_reason(reason: str) -> str:
    if reason.startswith("error"):
        raise ApiError(500, f"generation failed: {reason}", "server_error")
    return "length" if reason == "length" else "stop"


def page_html() -> str:
    return resources.files("lmtrain").joinpath("web/index.html").read_text(encoding="utf-8")


def create_app(server: Server):
    """The FastAPI application of ``server``."""
    from fastapi import FastAPI, Request as HttpRequest
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
    from starlette.exceptions import HTTPException

    @contextlib.asynccontextmanager
    async def lifespan(_):
        yield
        server.engine.stop()

    app = FastAPI(title="lmtrain serve", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan)

    @app.exception_handler(ApiError)
    async def api_error(_, exc: ApiError):
        return JSONResponse(exc.body(), status_code=exc.status)

    @app.exception_handler(HTTPException)
    async def http_error(_, exc: HTTPException):
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return JSONResponse(ApiError(exc.status_code, str(exc.detail), kind).body(), status_code=exc.status_code)

    @app.exception_handler(RequestValidationError)
    async def validation_error(_, exc):
        return JSONResponse(ApiError(400, "malformed request").body(), status_code=400)

    async def read_body(http: HttpRequest) -> dict:
        server.check_key(http.headers)
        raw = await http.body()
        if len(raw) > MAX_BODY_BYTES:
            raise ApiError(413, f"the request body is over {MAX_BODY_BYTES >> 20} MB")
        try:
            body = json.loads(raw)
        except (ValueError, UnicodeDecodeError) as exc:
            raise ApiError(400, f"the request body is not valid JSON ({str(exc)[:80]})") from None
        if not isinstance(body, dict):
            raise ApiError(400, "the request body must be a JSON object")
        server.check_model(body)
        return body

    @app.get("/", response_class=HTMLResponse)
    async def page():
        return HTMLResponse(page_html())

    @app.get("/health")
    async def health():
        running, waiting = server.engine.load
        return {"status": "ok", "model": server.model_name, "running": running, "waiting": waiting}

    @app.get("/v1/models")
    async def models(http: HttpRequest):
        server.check_key(http.headers)
        return {"object": "list", "data": [{"id": server.model_name, "object": "model", "created": server.created,
                                            "owned_by": "lmtrain", "context_length": server.engine.context}]}

    @app.post("/v1/chat/completions")
    async def chat_completions(http: HttpRequest):
        body = await read_body(http)
        request = server.request(body, server.chat_prompt(body))
        return await respond(http, request, chat=True)

    @app.post("/v1/completions")
    async def completions(http: HttpRequest):
        body = await read_body(http)
        request = server.request(body, server.completion_prompt(body))
        return await respond(http, request, chat=False)

    async def respond(http: HttpRequest, request: Request, chat: bool):
        job, events = server.start(request)
        ident = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}"
        created = int(time.time())
        kind = "chat.completion" if chat else "text_completion"
        if request.stream:
            return StreamingResponse(stream(job, events, request, ident, created, chat),
                                     media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        pieces = []
        try:
            while True:
                try:
                    event, value = await asyncio.wait_for(events.get(), timeout=1.0)
                except asyncio.TimeoutError:
                    if await http.is_disconnected():
                        server.engine.cancel(job)
                        return JSONResponse({}, status_code=499)
                    continue
                if event == "text":
                    pieces.append(value)
                else:
                    break
        except asyncio.CancelledError:
            server.engine.cancel(job)
            raise
        reason = _finish_reason(value)
        text = "".join(pieces)
        choice = ({"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": reason,
                   "logprobs": None} if chat else
                  {"index": 0, "text": text, "finish_reason": reason, "logprobs": None})
        return {"id": ident, "object": kind, "created": created, "model": server.model_name,
                "choices": [choice], "usage": server.usage(request, job)}

    async def stream(job: Job, events: asyncio.Queue, request: Request, ident: str, created: int, chat: bool):
        kind = "chat.completion.chunk" if chat else "text_completion"

        def chunk(delta: dict | str, reason=None, usage=None) -> str:
            choice = ({"index": 0, "delta": delta, "finish_reason": reason, "logprobs": None} if chat else
                      {"index": 0, "text": delta, "finish_reason": reason, "logprobs": None})
            out: dict[str, Any] = {"id": ident, "object": kind, "created": created, "model": server.model_name,
                                   "choices": [choice]}
            if request.include_usage:
                out["usage"] = usage
            return f"data: {json.dumps(out, ensure_ascii=False)}\n\n"

        finished = False
        try:
            if chat:
                yield chunk({"role": "assistant", "content": ""})
            while True:
                event, value = await events.get()
                if event == "text":
                    yield chunk({"content": value} if chat else value)
                    continue
                finished = True
                if value.startswith("error"):
                    yield f"data: {json.dumps(ApiError(500, value, 'server_error').body())}\n\n"
                    return
                reason = "length" if value == "length" else "stop"
                yield chunk({} if chat else "", reason)
                if request.include_usage:
                    usage = {"id": ident, "object": kind, "created": created, "model": server.model_name,
                             "choices": [], "usage": server.usage(request, job)}
                    yield f"data: {json.dumps(usage)}\n\n"
                yield "data: [DONE]\n\n"
                return
        finally:
            if not finished:  # the client went away mid-stream: free its slot
                server.engine.cancel(job)

    return app


def open_server(path, checkpoint: str = "best", device: str = "auto", api_key: str | None = None,
                slots: int = 8, queue_size: int = 32, context: int | None = None, name: str | None = None) -> Server:
    """A server over the run's checkpoint (or the model at ``path``), its engine started."""
    from pathlib import Path

    from lmtrain.inference import load_model

    loaded = load_model(Path(path), checkpoint, device)
    default_name = loaded.config.run.name if loaded.tokenizer_dir and loaded.tokenizer_dir.name == "tokenizer" \
        else Path(path).resolve().name
    server = Server(ChatModel.of(loaded), name or default_name, api_key, slots, queue_size, context)
    server.engine.start()
    return server


def serve(server: Server, host: str = "127.0.0.1", port: int = 8000) -> None:
    """Serve until interrupted (uvicorn)."""
    import uvicorn

    app = create_app(server)
    uvicorn.run(app, host=host, port=port, log_level="warning", access_log=False)
