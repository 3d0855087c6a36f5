"""`twofile serve`: the model behind an OpenAI-compatible HTTP API, and a web page.

    twofile serve [MODEL.gguf] [--host 127.0.0.1] [--port 8080] [--parallel 8] [--api-key KEY]

Two kinds of work, two threads. uvicorn's event loop answers HTTP: it checks the key and the
request, turns messages into tokens and streams the answer back. One engine thread runs the
model: requests wait in a queue for one of `--parallel` slots (a run.Session each: its own KV
cache), and at every step the engine passes the last token of every generating slot, plus a
chunk of any prompt being read, through the model in ONE pass over the weights
(run.feed_many), then samples each slot's next token with that request's own settings. New
requests join between steps (continuous batching). A slot keeps its tokens after its request
ends, and a new request takes the free slot holding the longest prefix of its prompt, so a
chat's next turn does not recompute the turns before it.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import signal
import sys
import threading
import time
import traceback
import uuid
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Literal

import numpy as np
import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client import Counter as Metric
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr
from starlette.exceptions import HTTPException

from twofile import assets, run

MAX_BODY_BYTES = 1 << 20   # a request body over this gets 413 (a full 8k-token chat is ~40 KB)
STEP_TOKENS = run.KERNEL_BATCH  # tokens per pass: every generating slot's one, then prompt chunks
PAGE = Path(__file__).parent / "static" / "index.html"


# ---------------------------------------------------------------------------
# Requests: OpenAI's fields, validated by pydantic (a bad one is a 400 naming it)
# ---------------------------------------------------------------------------

Probability = Annotated[float, Field(ge=0, le=1)]
Penalty = Annotated[float, Field(ge=-2, le=2)]


class Sampling(BaseModel):
    """The fields chat and completions share. Missing ones take `twofile run`'s defaults
    (llama-server's): temperature 0.8, top_k 40, top_p 0.95, min_p 0.05."""
    model_config = ConfigDict(extra="ignore")
    model: StrictStr | None = None
    temperature: Annotated[float, Field(ge=0, le=2)] = 0.8
    top_p: Annotated[float, Field(gt=0, le=1)] = 0.95
    top_k: Annotated[int, Field(ge=0)] = 40
    min_p: Annotated[float, Field(ge=0, lt=1)] = 0.05
    repeat_penalty: Annotated[float, Field(gt=0, le=10)] = 1.0
    presence_penalty: Penalty = 0.0
    frequency_penalty: Penalty = 0.0
    max_tokens: Annotated[int, Field(ge=1)] | None = None
    stop: StrictStr | Annotated[list[StrictStr], Field(max_length=4)] | None = None
    seed: StrictInt | None = None
    n: Annotated[int, Field(ge=1, le=4)] = 1
    stream: StrictBool = False
    stream_options: StreamOptions | None = None


class StreamOptions(BaseModel):
    include_usage: StrictBool = False


class TextPart(BaseModel):
    type: Literal["text"]
    text: StrictStr


class Message(BaseModel):
    role: Literal["system", "developer", "user", "assistant"]
    content: StrictStr | list[TextPart] | None = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(part.text for part in self.content)
        return self.content or ""


class ChatRequest(Sampling):
    messages: Annotated[list[Message], Field(min_length=1)]
    max_completion_tokens: Annotated[int, Field(ge=1)] | None = None
    logprobs: StrictBool = False
    top_logprobs: Annotated[int, Field(ge=0, le=20)] | None = None


class CompletionRequest(Sampling):
    prompt: StrictStr
    max_tokens: Annotated[int, Field(ge=1)] = 16  # OpenAI's default for completions
    logprobs: Annotated[int, Field(ge=0, le=5)] | None = None
    echo: StrictBool = False


Sampling.model_rebuild()


class APIError(Exception):
    """An error the client gets in OpenAI's shape: {"error": {message, type, param, code}}."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.type, self.param, self.code, self.headers = status, type, param, code, headers

    def response(self) -> JSONResponse:
        return JSONResponse({"error": self.body()}, self.status, headers=self.headers)

    def body(self) -> dict:
        return {"message": str(self), "type": self.type, "param": self.param, "code": self.code}


# ---------------------------------------------------------------------------
# The engine: slots, the queue, and one pass over the weights per step
# ---------------------------------------------------------------------------

@dataclass
class TokenInfo:
    """One sampled token, for logprobs: its id, text, log-probability under the model (before
    temperature and filters) and the `top` most likely alternatives, most likely first."""
    id: int
    logprob: float
    top: list[tuple[int, float]]


@dataclass(eq=False)
class Job:
    """One sequence to generate (a request with n choices makes n of them). The engine calls
    `emit` from its thread with ("token", index, text, TokenInfo | None), then ("done", index,
    finish_reason, completion_tokens) or ("error", index, APIError)."""
    index: int
    prompt: list[int]
    max_tokens: int
    settings: Sampling
    stop: list[str]
    seed: int | None
    top_logprobs: int | None  # None: no logprobs
    emit: Callable[[tuple], None]
    prompt_logprobs: bool = False  # completions with echo and logprobs: also the prompt's
    cancelled: bool = False
    # the engine's state
    slot: Slot | None = None
    pending: list[int] = field(default_factory=list)  # prompt tokens not yet fed
    generated: list[int] = field(default_factory=list)
    counts: Counter = field(default_factory=Counter)
    rng: np.random.Generator | None = None
    decoder: run.StreamDecoder | None = None
    queued_at: float = field(default_factory=time.perf_counter)
    first_token_at: float | None = None


@dataclass(eq=False)
class Slot:
    session: run.Session
    job: Job | None = None
    last_used: float = 0.0


class Busy(Exception):
    pass


class Engine:
    def __init__(self, load: Callable[[], run.Model], parallel: int, max_queue: int, metrics: Metrics):
        self.load, self.parallel, self.max_queue, self.metrics = load, parallel, max_queue, metrics
        self.model: run.Model | None = None
        self.error: str | None = None  # why the model could not be loaded
        self.slots: list[Slot] = []
        self.waiting: deque[Job] = deque()
        self.cond = threading.Condition()
        self.draining = False
        self.thread = threading.Thread(target=self._main, name="twofile-engine", daemon=True)

    def start(self):
        self.thread.start()

    def submit(self, jobs: list[Job]):
        with self.cond:
            if self.draining:
                raise Busy("the server is shutting down")
            if len(self.waiting) + len(jobs) > self.max_queue:
                raise Busy(f"the queue is full ({len(self.waiting)} requests waiting)")
            self.waiting.extend(jobs)
            self.metrics.queue.set(len(self.waiting))
            self.cond.notify()

    def cancel(self, jobs: list[Job]):
        """A client went away: its slots are freed before the next step."""
        with self.cond:
            for job in jobs:
                job.cancelled = True
            self.cond.notify()

    def drain(self):
        """Shutting down: no new requests; waiting ones get an error, generating ones end now
        (their text so far, finish_reason 'length', a well-formed end of stream)."""
        with self.cond:
            self.draining = True
            self.cond.notify()

    # -- the engine thread ------------------------------------------------------
    def _main(self):
        try:
            self.model = self.load()
            self.slots = [Slot(self.model.session()) for _ in range(self.parallel)]
        except Exception as e:  # reported by /health and every request; the server stays up to say so
            self.error = f"{type(e).__name__}: {e}"
            print(f"twofile serve: could not load the model: {self.error}", file=sys.stderr)
            return
        while True:
            with self.cond:
                while not (self.waiting or self.draining or any(s.job for s in self.slots)):
                    self.cond.wait()
                if self.draining:
                    self._end_all()
                    while True:  # nothing more to do but refuse
                        self.cond.wait()
                self._admit()
            try:
                self._step()
            except Exception:  # a bug, not a client's doing: fail the jobs in flight, keep serving
                traceback.print_exc()
                for slot in self.slots:
                    if slot.job:
                        self._finish(slot, error=APIError(500, "internal error while generating", "server_error"))

    def _admit(self):
        """Give waiting jobs the free slots: each the one holding the longest prefix of its prompt."""
        while self.waiting:
            job = self.waiting[0]
            if job.cancelled:
                self.waiting.popleft()
                continue
            free = [s for s in self.slots if s.job is None]
            if not free:
                break
            self.waiting.popleft()

            def shared(slot, job=job):
                n = 0
                for a, b in zip(slot.session.tokens, job.prompt[:-1]):  # the last one always runs
                    if a != b:
                        break
                    n += 1
                return n, -slot.last_used

            slot = max(free, key=shared)
            common = 0 if job.prompt_logprobs else shared(slot)[0]
            slot.session.rewind(common)
            self.metrics.cached_tokens.inc(common)
            slot.job, job.slot, job.pending = job, slot, job.prompt[common:]
            job.rng = np.random.default_rng(job.seed)
            job.decoder = run.StreamDecoder(self.model.tokenizer, job.stop)
            self.metrics.prompt_tokens.inc(len(job.prompt))
        self.metrics.queue.set(len(self.waiting))
        self.metrics.active.set(sum(s.job is not None for s in self.slots))

    def _step(self):
        for slot in self.slots:
            if slot.job and slot.job.cancelled:
                self._finish(slot, None)
        sessions, lists, jobs = [], [], []
        budget = STEP_TOKENS
        for slot in self.slots:  # generating slots first: one token each
            job = slot.job
            if job and not job.pending:
                sessions.append(slot.session), lists.append([job.generated[-1]]), jobs.append(job)
                budget -= 1
        for slot in sorted((s for s in self.slots if s.job and s.job.pending), key=lambda s: s.job.queued_at):
            job = slot.job
            if job.prompt_logprobs:  # the prompt's every logits: a pass of its own
                self._prompt_logprobs(job)
                continue
            if budget <= 0:
                break
            chunk, job.pending = job.pending[:budget], job.pending[budget:]
            sessions.append(slot.session), lists.append(chunk), jobs.append(job)
            budget -= len(chunk)
        if not sessions:
            return
        generating = sum(bool(job.generated) for job in jobs)  # the rest are reading their prompts
        started = time.perf_counter()
        all_logits = run.feed_many(sessions, lists)
        if generating:
            self.metrics.step_rate.set(generating / (time.perf_counter() - started))
        for job, logits in zip(jobs, all_logits):
            if not job.pending:  # its prompt is read: a new token
                self._sample(job, logits)

    def _prompt_logprobs(self, job: Job):
        session = job.slot.session
        logits = session.feed(job.pending, all_logits=True)
        job.pending = []
        logprobs = run.log_softmax(logits)
        infos = [None] + [TokenInfo(t, float(row[t]), _top(row, job.top_logprobs))
                          for t, row in zip(job.prompt[1:], logprobs[:-1])]
        job.emit(("prompt", job.index, infos))
        self._sample(job, logits[-1])

    def _sample(self, job: Job, logits: np.ndarray):
        s, slot = job.settings, job.slot
        model_logits = logits
        if job.counts and (s.presence_penalty or s.frequency_penalty):  # OpenAI's definition
            ids = np.fromiter(job.counts, np.int64)
            counts = np.array([job.counts[i] for i in ids], np.float32)
            logits = logits.copy()
            logits[ids] -= s.presence_penalty + s.frequency_penalty * counts
        recent = (job.prompt + job.generated)[-64:]
        token = run.sample(logits, job.rng, s.temperature, s.top_k, s.top_p, s.min_p, s.repeat_penalty, recent)
        now = time.perf_counter()
        if job.first_token_at is None:
            job.first_token_at = now
            self.metrics.ttft.observe(now - job.queued_at)
        if token in self.model.tokenizer.eog_ids:
            self._finish(slot, "stop")
            return
        job.generated.append(token)
        job.counts[token] += 1
        self.metrics.generated_tokens.inc()
        info = None
        if job.top_logprobs is not None:
            row = run.log_softmax(model_logits)
            info = TokenInfo(token, float(row[token]), _top(row, job.top_logprobs))
        job.emit(("token", job.index, job.decoder(token), info))
        if job.decoder.stopped:
            self._finish(slot, "stop")
        elif len(job.generated) >= job.max_tokens or len(slot.session.tokens) >= slot.session.n_ctx:
            self._finish(slot, "length")

    def _finish(self, slot: Slot, reason: str | None = None, error: APIError | None = None):
        job, slot.job, slot.last_used = slot.job, None, time.perf_counter()
        if error:
            job.emit(("error", job.index, error))
        elif reason:  # None: cancelled, nobody to tell
            rest = job.decoder.flush() if reason != "stop" or not job.decoder.stopped else ""
            if rest:
                job.emit(("token", job.index, rest, None))
            job.emit(("done", job.index, reason, len(job.generated)))
            if job.first_token_at and len(job.generated) > 1:
                self.metrics.stream_rate.observe((len(job.generated) - 1) / (time.perf_counter() - job.first_token_at))
        self.metrics.active.set(sum(s.job is not None for s in self.slots))

    def _end_all(self):
        for job in self.waiting:
            job.emit(("error", job.index, APIError(503, "the server is shutting down", "server_error")))
        self.waiting.clear()
        for slot in self.slots:
            if slot.job:
                self._finish(slot, "length")


def _top(logprobs: np.ndarray, n: int | None) -> list[tuple[int, float]]:
    if not n:
        return []
    ids = run.top_k_ids(logprobs, n) if n < len(logprobs) else np.arange(len(logprobs))
    ids = ids[np.argsort(-logprobs[ids], kind="stable")]
    return [(int(i), float(logprobs[i])) for i in ids]


# ---------------------------------------------------------------------------
# Metrics (Prometheus)
# ---------------------------------------------------------------------------

class Metrics:
    def __init__(self):
        self.registry = r = CollectorRegistry()
        self.requests = Metric("twofile_requests", "HTTP requests by route and status", ["route", "status"], registry=r)
        self.prompt_tokens = Metric("twofile_prompt_tokens", "prompt tokens of admitted requests", registry=r)
        self.cached_tokens = Metric("twofile_prompt_tokens_cached", "prompt tokens whose keys and values a slot "
                                    "already held (not recomputed)", registry=r)
        self.generated_tokens = Metric("twofile_generated_tokens", "tokens generated", registry=r)
        self.ttft = Histogram("twofile_time_to_first_token_seconds", "from arrival to the first generated token",
                              buckets=(.05, .1, .25, .5, 1, 2.5, 5, 10, 30), registry=r)
        self.stream_rate = Histogram("twofile_request_tokens_per_second", "each request's generation speed",
                                     buckets=(1, 2, 5, 10, 20, 50, 100, 200), registry=r)
        self.step_rate = Gauge("twofile_tokens_per_second", "tokens generated per second, all requests together, "
                               "in the last step", registry=r)
        self.queue = Gauge("twofile_queue_length", "requests waiting for a slot", registry=r)
        self.active = Gauge("twofile_active_sessions", "slots generating or reading a prompt", registry=r)


# ---------------------------------------------------------------------------
# The HTTP side
# ---------------------------------------------------------------------------

def create_app(model: str | None = None, parallel: int = 8, ctx_size: int | None = None, threads: int | None = None,
               api_key: str | None = None, max_queue: int = 64) -> FastAPI:
    """The ASGI app; the model loads in the engine thread (GET /health says 503 until then).
    model None: the default model, fetched into the cache if it is not there."""
    metrics = Metrics()

    def load():
        path = model or str(assets.fetch(assets.DEFAULT_MODEL))
        return run.load(path, n_ctx=ctx_size or None, threads=threads)

    engine = Engine(load, parallel, max_queue, metrics)
    name = Path(model).name.removesuffix(".gguf") if model else assets.DEFAULT_MODEL.name.removesuffix(".gguf")

    @contextlib.asynccontextmanager
    async def lifespan(app):
        engine.start()
        yield
        engine.drain()

    app = FastAPI(title="twofile", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.engine, app.state.metrics, app.state.model_name = engine, metrics, name

    # -- errors, always in OpenAI's shape ---------------------------------------
    @app.exception_handler(APIError)
    async def api_error(request, e: APIError):
        return e.response()

    @app.exception_handler(RequestValidationError)
    async def invalid(request, e: RequestValidationError):
        first = e.errors()[0]
        where = []
        for part in first.get("loc", ())[1:]:  # ("body", field, index, ...), then pydantic's union tags
            if isinstance(part, str) and (part in ("str", "int", "float", "bool") or "[" in part or "-" in part):
                break
            where.append(str(part))
        if first.get("type") == "json_invalid":
            return APIError(400, "the request body is not valid JSON").response()
        message = first.get("msg", "invalid request")
        return APIError(400, f"{'.'.join(where) or 'body'}: {message}", param=".".join(where) or None).response()

    @app.exception_handler(HTTPException)
    async def http_error(request, e: HTTPException):
        kind = {404: "not_found_error", 405: "invalid_request_error"}.get(e.status_code, "invalid_request_error")
        message = f"no route {request.method} {request.url.path}" if e.status_code in (404, 405) else str(e.detail)
        return APIError(e.status_code, message, kind).response()

    @app.exception_handler(Exception)
    async def crashed(request, e: Exception):
        traceback.print_exc()
        return APIError(500, "internal error", "server_error").response()

    app.add_middleware(Guard, api_key=api_key, metrics=metrics)

    def ready() -> run.Model:
        if engine.error:
            raise APIError(503, f"the model could not be loaded: {engine.error}", "server_error")
        if engine.model is None:
            raise APIError(503, "the model is loading", "server_error", headers={"Retry-After": "1"})
        return engine.model

    def check_model(requested: str | None):
        if requested is not None and requested not in (name, name + ".gguf"):
            raise APIError(404, f"the model {requested!r} does not exist; this server has {name!r}",
                           param="model", code="model_not_found")

    # -- routes -------------------------------------------------------------------
    @app.get("/", include_in_schema=False)
    async def page():
        return FileResponse(PAGE, media_type="text/html")

    @app.get("/health")
    async def health():
        ready()
        return {"status": "ok"}

    @app.get("/metrics")
    async def prometheus():
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": name, "object": "model", "created": 0, "owned_by": "twofile"}]}

    @app.get("/props")
    async def props():
        m = ready()
        return {"model": name, "chat_template": bool(m.metadata.get("tokenizer.chat_template")),
                "n_ctx": m.n_ctx, "parallel": parallel}

    @app.post("/v1/chat/completions")
    async def chat(body: ChatRequest, request: Request):
        m = ready()
        check_model(body.model)
        if body.top_logprobs is not None and not body.logprobs:
            raise APIError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
        if not m.metadata.get("tokenizer.chat_template"):
            raise APIError(400, "this model has no chat template: use /v1/completions", param="messages")
        messages = [{"role": "system" if msg.role == "developer" else msg.role, "content": msg.text()}
                    for msg in body.messages]
        try:  # special tokens come only from the template: a message cannot spell one
            prompt = m.chat_tokens(messages)
        except ValueError as e:
            raise APIError(400, str(e), param="messages") from None
        limit = body.max_completion_tokens or body.max_tokens
        top = (body.top_logprobs or 0) if body.logprobs else None
        return await respond(request, "chat", body, prompt, limit, top)

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        m = ready()
        check_model(body.model)
        if not body.prompt:
            raise APIError(400, "prompt: the prompt is empty", param="prompt")
        prompt = m.tokenize(body.prompt, parse_special=False)
        return await respond(request, "completion", body, prompt, body.max_tokens, body.logprobs)

    async def respond(request, kind, body, prompt, limit, top):
        m = engine.model
        if len(prompt) >= m.n_ctx:
            raise APIError(400, f"the prompt is {len(prompt)} tokens; the context holds {m.n_ctx} "
                           "(and needs room for one more)", param="messages" if kind == "chat" else "prompt",
                           code="context_length_exceeded")
        loop, events = asyncio.get_running_loop(), asyncio.Queue()

        def emit(event):
            loop.call_soon_threadsafe(events.put_nowait, event)

        stop = [body.stop] if isinstance(body.stop, str) else body.stop or []
        echo_logprobs = kind == "completion" and body.echo and top is not None
        jobs = [Job(i, prompt, min(limit or m.n_ctx, m.n_ctx), body, stop,
                    None if body.seed is None else body.seed + i, top, emit, prompt_logprobs=echo_logprobs)
                for i in range(body.n)]
        try:
            engine.submit(jobs)
        except Busy as e:
            status = 503 if engine.draining else 429
            raise APIError(status, str(e), "server_error" if status == 503 else "rate_limit_exceeded",
                           headers={"Retry-After": "1"}) from None
        reply = Reply(kind, name, m.tokenizer, body, prompt, top)
        if body.stream:
            return StreamingResponse(stream(reply, events, jobs), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        done = 0
        try:
            while done < len(jobs):
                try:
                    event = await asyncio.wait_for(events.get(), 1.0)
                except asyncio.TimeoutError:
                    if await request.is_disconnected():
                        engine.cancel(jobs)
                        return Response(status_code=499)
                    continue
                if event[0] == "error":
                    engine.cancel(jobs)
                    raise event[2]
                reply.add(event)
                done += event[0] == "done"
        except asyncio.CancelledError:
            engine.cancel(jobs)
            raise
        return reply.whole()

    async def stream(reply: Reply, events: asyncio.Queue, jobs: list[Job]):
        try:
            for chunk in reply.opening():
                yield _sse(chunk)
            done = 0
            while done < len(jobs):
                event = await events.get()
                if event[0] == "error":
                    yield _sse({"error": event[2].body()})
                    break
                chunk = reply.add(event)
                if chunk:
                    yield _sse(chunk)
                done += event[0] == "done"
            else:
                if reply.include_usage:
                    yield _sse(reply.usage_chunk())
            yield "data: [DONE]\n\n"
        finally:  # also when the client went away: starlette cancels this generator
            engine.cancel(jobs)

    return app


ROUTES = ("/", "/health", "/metrics", "/props", "/v1/models", "/v1/chat/completions", "/v1/completions")


class Guard:
    """What every request passes before its route (plain ASGI, so that streams and client
    disconnects go through untouched): the body size limit, the API key, and counting."""

    def __init__(self, app, api_key: str | None, metrics: Metrics):
        self.app, self.api_key, self.metrics = app, api_key, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path, status = scope["path"], [0]

        async def counted(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            error, receive = await self._check(scope, receive)
            if error:
                await error.response()(scope, receive, counted)
            else:
                await self.app(scope, receive, counted)
        finally:
            self.metrics.requests.labels(path if path in ROUTES else "other", str(status[0])).inc()

    async def _check(self, scope, receive):
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        too_big = APIError(413, f"the request body is over {MAX_BODY_BYTES} bytes", code="body_too_large")
        length = headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > MAX_BODY_BYTES):
            return too_big, receive
        if length is None and scope["method"] in ("POST", "PUT", "PATCH"):  # chunked: read it here, bounded
            messages, size = [], 0
            while True:
                message = await receive()
                messages.append(message)
                size += len(message.get("body", b""))
                if size > MAX_BODY_BYTES:
                    return too_big, receive
                if message["type"] != "http.request" or not message.get("more_body"):
                    break

            async def replay():
                return messages.pop(0) if messages else await receive()
            receive = replay
        if self.api_key and (scope["path"].startswith("/v1/") or scope["path"] == "/props"):
            scheme, _, token = headers.get("authorization", "").partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), self.api_key.encode()):
                return APIError(401, "a valid API key is needed: Authorization: Bearer KEY", "authentication_error",
                                code="invalid_api_key"), receive
        return None, receive


def _sse(obj) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


class Reply:
    """Builds one request's answer, streamed chunk by chunk or whole, in the shape of OpenAI's
    chat.completion(.chunk) or text_completion objects."""

    def __init__(self, kind, model_name, tokenizer, body, prompt, top):
        self.kind, self.model, self.tokenizer, self.body, self.prompt, self.top = \
            kind, model_name, tokenizer, body, prompt, top
        self.id = ("chatcmpl-" if kind == "chat" else "cmpl-") + uuid.uuid4().hex[:24]
        self.created = int(time.time())
        n = body.n
        echo = kind == "completion" and body.echo
        prompt_text = tokenizer.decode(prompt) if echo else ""
        self.texts = [prompt_text] * n
        self.infos: list[list] = [[] for _ in range(n)]
        self.finish = [None] * n
        self.completion_tokens = [0] * n
        # completions' legacy logprobs with echo: the prompt's tokens come first (first one: None)
        self.prompt_infos = [(i, None) for i in prompt] if echo and top is not None else []
        self.echo = echo
        self.include_usage = bool(body.stream and body.stream_options and body.stream_options.include_usage)

    # -- logprobs in the two shapes ----------------------------------------------
    def _token(self, i: int) -> tuple[str, list[int]]:
        raw = self.tokenizer.token_bytes(i)
        return raw.decode("utf-8", errors="replace"), list(raw)

    def _chat_entry(self, info: TokenInfo) -> dict:
        text, raw = self._token(info.id)
        top = []
        for i, lp in info.top:
            t, b = self._token(i)
            top.append({"token": t, "logprob": lp, "bytes": b})
        return {"token": text, "logprob": info.logprob, "bytes": raw, "top_logprobs": top}

    def _legacy(self, infos: list[tuple[int, TokenInfo | None]], offset: int) -> dict:
        tokens, logprobs, tops, offsets = [], [], [], []
        for token, info in infos:
            text, _ = self._token(token)
            tokens.append(text)
            logprobs.append(None if info is None else info.logprob)
            tops.append(None if info is None else {self._token(i)[0]: lp for i, lp in info.top})
            offsets.append(offset)
            offset += len(text)
        return {"tokens": tokens, "token_logprobs": logprobs, "top_logprobs": tops, "text_offset": offsets}

    # -- events from the engine --------------------------------------------------
    def add(self, event) -> dict | None:
        """Record an engine event; the stream chunk for it (None: nothing to send yet)."""
        kind, index = event[0], event[1]
        if kind == "prompt":  # completions' echo with logprobs: the prompt, now with its logprobs
            self.prompt_infos = [(self.prompt[0], None)] + [(info.id, info) for info in event[2][1:]]
            return self._chunk(index, self.texts[index], None, self._legacy(self.prompt_infos, 0))
        if kind == "token":
            text, info = event[2], event[3]
            start = len(self.texts[index])
            self.texts[index] += text
            if info is not None:
                self.infos[index].append(info)
            if not text and info is None:
                return None
            if self.kind == "chat":
                delta = {"content": text}
                logprobs = {"content": [self._chat_entry(info)]} if info is not None and self.top is not None else None
                if self.top is not None and info is None:
                    logprobs = {"content": []}
                return self._chunk(index, delta, None, logprobs)
            logprobs = None
            if self.top is not None:
                logprobs = self._legacy([(info.id, info)] if info else [], start)
            return self._chunk(index, text, None, logprobs)
        if kind == "done":
            self.finish[index], self.completion_tokens[index] = event[2], event[3]
            return self._chunk(index, {} if self.kind == "chat" else "", event[2], None)
        return None

    def opening(self) -> list[dict]:
        """The first chunks of a stream: the role for chat, the echoed prompt for completions."""
        chunks = []
        for i in range(self.body.n):
            if self.kind == "chat":
                chunks.append(self._chunk(i, {"role": "assistant", "content": ""}, None,
                                          {"content": []} if self.top is not None else None))
            elif self.echo and self.top is None:  # with logprobs, it waits for them (see add)
                chunks.append(self._chunk(i, self.texts[i], None, None))
        return chunks

    def _chunk(self, index, delta, finish, logprobs) -> dict:
        usage = {"usage": None} if self.include_usage else {}
        if self.kind == "chat":
            choice = {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish}
            return {"id": self.id, "object": "chat.completion.chunk", "created": self.created, "model": self.model,
                    "system_fingerprint": None, "choices": [choice], **usage}
        choice = {"index": index, "text": delta, "logprobs": logprobs, "finish_reason": finish}
        return {"id": self.id, "object": "text_completion", "created": self.created, "model": self.model,
                "choices": [choice], **usage}

    def usage(self) -> dict:
        completion = sum(self.completion_tokens)
        return {"prompt_tokens": len(self.prompt), "completion_tokens": completion,
                "total_tokens": len(self.prompt) + completion}

    def usage_chunk(self) -> dict:
        chunk = self._chunk(0, None, None, None)
        chunk["choices"], chunk["usage"] = [], self.usage()
        return chunk

    def whole(self) -> dict:
        choices = []
        for i in range(self.body.n):
            if self.kind == "chat":
                logprobs = None if self.top is None else {"content": [self._chat_entry(x) for x in self.infos[i]]}
                choices.append({"index": i, "message": {"role": "assistant", "content": self.texts[i]},
                                "logprobs": logprobs, "finish_reason": self.finish[i]})
            else:
                logprobs = None
                if self.top is not None:
                    logprobs = self._legacy(self.prompt_infos + [(x.id, x) for x in self.infos[i]], 0)
                choices.append({"index": i, "text": self.texts[i], "logprobs": logprobs,
                                "finish_reason": self.finish[i]})
        obj = "chat.completion" if self.kind == "chat" else "text_completion"
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model,
                "choices": choices, "usage": self.usage()}


# ---------------------------------------------------------------------------
# The command
# ---------------------------------------------------------------------------

class _Server(uvicorn.Server):
    """uvicorn, with Ctrl-C and SIGTERM ending the generations in flight (each stream gets its
    last chunk and [DONE]) before it stops, and the process exiting 0."""

    def __init__(self, config, engine: Engine):
        super().__init__(config)
        self.engine = engine

    @contextlib.contextmanager
    def capture_signals(self):
        previous = {sig: signal.signal(sig, self.handle_exit) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def handle_exit(self, sig, frame):
        self.engine.drain()
        super().handle_exit(sig, frame)


def serve(model: str | None, host: str = "127.0.0.1", port: int = 8080, api_key: str | None = None,
          parallel: int = 8, ctx_size: int | None = None, threads: int | None = None, max_queue: int = 64) -> None:
    if host not in ("127.0.0.1", "localhost", "::1") and not api_key:
        print(f"twofile serve: warning: listening on {host} without an API key: anyone who can reach this "
              "machine can use the model (--api-key KEY)", file=sys.stderr)
    if model:
        run.read_gguf(model)  # a missing or broken file: one line and exit 1, before listening
    app = create_app(model, parallel, ctx_size, threads, api_key, max_queue)
    config = uvicorn.Config(app, host=host, port=port, log_level="warning", timeout_graceful_shutdown=5)
    server = _Server(config, app.state.engine)
    shown = "localhost" if host in ("0.0.0.0", "::") else host
    print(f"twofile serve: http://{shown}:{port}/  (OpenAI API at http://{shown}:{port}/v1; Ctrl-C stops)",
          file=sys.stderr)
    server.run()
    if not server.started:
        raise OSError(f"could not listen on {host}:{port} (in use, or not an address of this machine?)")
