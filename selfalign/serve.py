"""`selfalign serve`: an OpenAI-compatible HTTP server over a selfalign engine.

Endpoints: `GET /v1/models`, `GET /health`, `POST /v1/completions` and `POST /v1/chat/completions`,
answering in OpenAI's JSON shapes. `/v1/completions` also returns token log-probabilities in the
OpenAI/vLLM `logprobs` shape (`tokens`, `token_logprobs`, `text_offset`, `top_logprobs`); with
`echo: true` and `max_tokens: 0` that is the prompt's own log-probabilities, which is how the
`openai` engine scores continuations.

How it stays up (issue #14). One worker thread owns the model (a model is not thread-safe); the
HTTP handlers only validate, queue and wait. The worker takes the oldest request, waits a few
milliseconds for others, and runs every waiting request with the same sampling settings as one
batch, so 10 concurrent short requests cost about one batch, not 10 sequential calls. The queue
is bounded: when it is full a request gets 429 with `Retry-After`. Generation checks, at every
token, whether its clients are still connected and whether the server is stopping, so a
disconnect or SIGTERM ends it within a token. `max_tokens` is capped at what fits in the model's
context after the prompt, a `max_tokens` larger than the whole context is refused (400, as vLLM
does), a prompt that does not fit is refused rather than cut, and `n` is capped by `--max-n`.
`/health` says `busy` while a batch runs and `wedged` (503) when it has made no progress for a
while or the worker has died.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import copy
import hmac
import random
import socket
import sys
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field

from selfalign.core.chat import render_plain
from selfalign.core.engines.base import Completion, Engine, Sampling
from selfalign.core.errors import SelfAlignError

API_KEY_ENV = "SELFALIGN_API_KEY"


class _ApiError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.headers = status, message, param, headers


def _error(status: int, message: str, param: str | None = None, headers: dict | None = None) -> JSONResponse:
    kind = "invalid_request_error" if status < 500 else "server_error"
    body = {"error": {"message": message, "type": kind, "param": param, "code": None}}
    return JSONResponse(body, status, headers=headers)


class _Body(BaseModel):
    model_config = ConfigDict(extra="allow")  # clients send fields we ignore (user, presence_penalty, ...)

    model: str | None = None
    n: int = Field(1, ge=1)
    temperature: float | None = Field(None, ge=0.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    stop: str | list[str] | None = None
    seed: int | None = None
    repetition_penalty: float = Field(1.0, gt=0.0)  # an extension, as in vLLM
    stream: bool = False


class CompletionBody(_Body):
    prompt: str | list[str]
    max_tokens: int = Field(16, ge=0)
    echo: bool = False
    logprobs: int | None = Field(None, ge=0, le=20)


class ChatBody(_Body):
    messages: list[dict[str, Any]]
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)


def prompt_logprobs(engine: Engine, text: str, top_n: int = 0) -> dict:
    """Log-probability of every token of `text` under the engine's model (one full forward), in the
    OpenAI `logprobs` shape. The first token has none. Token strings are the slices of `text`
    between consecutive offsets, so they join back to `text` exactly."""
    import torch

    model, tok = getattr(engine, "model", None), getattr(engine, "tokenizer", None)
    if model is None or tok is None:
        raise _ApiError(400, f"the {engine.name} engine cannot return logprobs", "logprobs")
    if tok.is_fast:
        enc = tok(text, add_special_tokens=True, return_offsets_mapping=True)
        ids, starts = enc["input_ids"], [s for s, _ in enc["offset_mapping"]]
    else:  # slow tokenizers have no offsets: measure decoded prefixes
        ids = tok(text, add_special_tokens=True)["input_ids"]
        starts = [len(tok.decode(ids[:i], skip_special_tokens=True)) for i in range(len(ids))]
    limit = getattr(engine, "max_length", None)
    if limit and len(ids) > limit:
        raise _ApiError(
            400, f"the text is {len(ids)} tokens long, more than the server's limit of {limit}", "prompt"
        )
    for i in range(1, len(starts)):  # specials report (0, 0): keep offsets non-decreasing
        starts[i] = max(starts[i], starts[i - 1])
    ends = starts[1:] + [len(text)]
    out = {
        "tokens": [text[s:e] for s, e in zip(starts, ends, strict=True)],
        "token_logprobs": [None],
        "text_offset": starts,
    }
    if len(ids) > 1:
        device = next(model.parameters()).device
        with torch.inference_mode():
            logits = (
                model(input_ids=torch.tensor([ids], device=device), use_cache=False).logits[0, :-1].float()
            )
        lse = torch.logsumexp(logits, dim=-1)
        target = torch.tensor(ids[1:], device=logits.device)
        out["token_logprobs"] += (logits.gather(-1, target[:, None]).squeeze(-1) - lse).tolist()
    if top_n:
        tops: list[dict | None] = [None]
        if len(ids) > 1:
            vals, idx = torch.topk(logits, top_n, dim=-1)
            for v_row, i_row in zip((vals - lse[:, None]).tolist(), idx.tolist(), strict=True):
                tops.append({tok.decode([i]): v for i, v in zip(i_row, v_row, strict=True)})
        out["top_logprobs"] = tops
    return out


def _after(lp: dict, start: int) -> dict:
    """The part of a `logprobs` dict from character `start` on (the generated tokens)."""
    keep = [i for i, off in enumerate(lp["text_offset"]) if off >= start]
    return {k: [v[i] for i in keep] for k, v in lp.items()}


def _sampling(body: _Body, max_tokens: int) -> Sampling:
    """The engine's sampling for a request. Without a client seed the seed is left at 0 here and
    drawn per batch by the worker, so such requests can share a batch."""
    stops = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
    return Sampling(
        n=body.n,
        temperature=1.0 if body.temperature is None else body.temperature,
        top_p=1.0 if body.top_p is None else body.top_p,
        max_new_tokens=max(1, max_tokens),
        stop=[s for s in stops if s],
        seed=0 if body.seed is None else body.seed,
        repetition_penalty=body.repetition_penalty,
    )


def cap_new_tokens(max_tokens: int, prompt_tokens: int, context: int) -> int:
    """New tokens a request may have: what it asked for, capped at what fits in the context after
    its prompt. A prompt that fills the context, or a `max_tokens` beyond the whole context (no model
    of this size could honour it), is a 400: cutting the prompt would answer a different question."""
    if max_tokens > context:
        raise _ApiError(400, f"max_tokens: {max_tokens} is more than the model's context of {context} tokens",
                        "max_tokens")
    room = context - prompt_tokens
    if room < 1:
        raise _ApiError(400, f"the prompt is {prompt_tokens} tokens; the model's context is {context} tokens, "
                        "so nothing fits after it: shorten the prompt", "prompt")
    return min(max_tokens, room)




class _Cancelled(Exception):
    """A job ended early: its client went away or the server is stopping."""


@dataclass(eq=False)
class _Job:
    """One HTTP request's work. Jobs with the same `key` run together as one engine batch; a job
    with `fn` (log-probabilities) runs alone."""

    requests: list = field(default_factory=list)
    sampling: Sampling | None = None
    key: tuple | None = None
    fn: Callable[[], Any] | None = None
    future: concurrent.futures.Future = field(default_factory=concurrent.futures.Future)
    gone: threading.Event = field(default_factory=threading.Event)  # the client disconnected


class Scheduler:
    """The one thread that touches the model, and the bounded queue in front of it."""

    def __init__(self, engine: Engine, max_queue: int = 64, max_batch: int | None = None,
                 gather_s: float = 0.02, wedged_after_s: float = 120.0):
        self.engine, self.max_queue, self.gather_s, self.wedged_after_s = engine, max_queue, gather_s, wedged_after_s
        self.max_batch = max_batch or getattr(engine, "batch_size", 16)
        self.pending: deque[_Job] = deque()
        self.cond = threading.Condition()
        self.stopping = threading.Event()
        self.running: list[_Job] = []
        self.busy_since: float | None = None
        self.last_progress = time.monotonic()
        self.batches = 0
        self.cancelled = 0
        self._hook_generation()
        self.thread = threading.Thread(target=self._loop, name="selfalign-serve-worker", daemon=True)
        self.thread.start()

    # -- the cancellation hook -----------------------------------------------------------------------
    def _hook_generation(self) -> None:
        """Make generation stop at the next token when every client of the batch has gone or the server
        is stopping, and mark progress for `/health`: the hf engine's decode loop asks its `step_hook`
        once a step. (Other engines generate elsewhere: vLLM in-process in one call, openai remotely.)"""
        sched = self

        def step_hook() -> bool:
            sched.last_progress = time.monotonic()
            return sched.should_stop()

        if hasattr(self.engine, "step_hook"):
            self.engine.step_hook = step_hook

    def should_stop(self) -> bool:
        return self.stopping.is_set() or (bool(self.running) and all(j.gone.is_set() for j in self.running))

    # -- queue ---------------------------------------------------------------------------------------
    def submit(self, job: _Job) -> _Job:
        with self.cond:
            if self.stopping.is_set():
                raise _ApiError(503, "the server is shutting down")
            if len(self.pending) >= self.max_queue:
                raise _ApiError(429, f"the server is busy ({len(self.pending)} requests waiting); retry shortly",
                                headers={"Retry-After": str(self.retry_after())})
            self.pending.append(job)
            self.cond.notify()
        return job

    def retry_after(self) -> int:
        busy = time.monotonic() - self.busy_since if self.busy_since else 0.0
        return max(1, min(60, round(busy) or 1))

    def stop(self) -> None:
        """Refuse new work, end the batch in flight at its next token, fail what is queued."""
        self.stopping.set()
        with self.cond:
            while self.pending:
                self.pending.popleft().future.set_exception(_Cancelled("the server is shutting down"))
            self.cond.notify_all()

    def health(self) -> tuple[int, dict]:
        queued = len(self.pending)
        if not self.thread.is_alive():
            return 503, {"status": "wedged", "reason": "the worker thread has stopped", "queued": queued}
        if self.stopping.is_set():
            return 503, {"status": "stopping", "queued": queued}
        if self.busy_since is None:
            return 200, {"status": "ok", "queued": queued, "batches": self.batches}
        stalled = time.monotonic() - self.last_progress
        info = {"queued": queued, "running": len(self.running), "busy_s": round(time.monotonic() - self.busy_since, 1),
                "since_progress_s": round(stalled, 1), "batches": self.batches}
        if stalled > self.wedged_after_s:
            return 503, {"status": "wedged", "reason": f"no token generated for {stalled:.0f} s", **info}
        return 200, {"status": "busy", **info}

    # -- worker --------------------------------------------------------------------------------------
    def _next_group(self) -> list[_Job] | None:
        with self.cond:
            while not self.pending and not self.stopping.is_set():
                self.cond.wait()
            if self.stopping.is_set():
                return None
            first = self.pending.popleft()
            if first.key is None:
                return [first]
            # let requests sent at the same moment arrive: wait while they keep coming (each arrival
            # gives gather_s more), at most 10 x gather_s, and not once the batch is full
            last, seen, give_up = time.monotonic(), len(self.pending), time.monotonic() + 10 * self.gather_s
            while len(self.pending) + 1 < self.max_batch and not self.stopping.is_set():
                now = time.monotonic()
                if len(self.pending) != seen:
                    last, seen = now, len(self.pending)
                left = min(last + self.gather_s, give_up) - now
                if left <= 0:
                    break
                self.cond.wait(left)
            group, rest, size = [first], deque(), len(first.requests)
            for job in self.pending:
                if job.key == first.key and size + len(job.requests) <= self.max_batch:
                    group.append(job)
                    size += len(job.requests)
                else:
                    rest.append(job)
            self.pending = rest
            return group

    def _loop(self) -> None:
        while (group := self._next_group()) is not None:
            group = [j for j in group if not j.gone.is_set() and j.future.set_running_or_notify_cancel()]
            if not group:
                continue
            self.running, self.busy_since, self.last_progress = group, time.monotonic(), time.monotonic()
            try:
                self._run(group)
            except BaseException as exc:  # noqa: BLE001 - every waiting client gets the error
                for job in group:
                    if not job.future.done():
                        job.future.set_exception(exc)
            finally:
                self.running, self.busy_since = [], None
                self.batches += 1

    def _run(self, group: list[_Job]) -> None:
        if group[0].fn is not None:
            group[0].future.set_result(group[0].fn())
            return
        requests = [r for job in group for r in job.requests]
        sampling = group[0].sampling
        if group[0].key[-1] is None:  # no client seed: one fresh seed for the batch
            sampling = sampling.model_copy(update={"seed": random.randrange(2**31)})
        outs = self.engine.generate(requests, sampling)
        if self.should_stop():  # cut short: the texts are partial
            self.cancelled += len(group)
            for job in group:
                job.future.set_exception(_Cancelled("cancelled: the client went away or the server is stopping"))
            return
        at = 0
        for job in group:
            job.future.set_result(outs[at:at + len(job.requests)])
            at += len(job.requests)

def build_app(engine: Engine, model_name: str, *, api_key: str | None = None, max_n: int = 16,
              max_queue: int = 64, max_batch: int | None = None, gather_s: float = 0.02,
              wedged_after_s: float = 120.0) -> FastAPI:
    """A FastAPI app serving `engine` under the model name `model_name`. `api_key`, when set, must come
    as `Authorization: Bearer KEY` on every endpoint but `/health`."""
    key_bytes = api_key.encode() if api_key else None

    def check_key(request: Request) -> None:
        """A dependency rather than an HTTP middleware: Starlette's middleware wrapper hides client
        disconnects from the endpoints, and those must stay visible to stop abandoned work."""
        if key_bytes is None or request.url.path == "/health":
            return
        given = request.headers.get("authorization", "")
        token = given[7:].strip() if given[:7].lower() == "bearer " else ""
        if not hmac.compare_digest(token.encode(), key_bytes):  # constant time; the key is never logged
            raise _ApiError(401, "missing or wrong API key: send the header Authorization: Bearer <key>")

    app = FastAPI(title="selfalign", description=f"OpenAI-compatible server for {model_name}",
                  dependencies=[Depends(check_key)])
    sched = Scheduler(engine, max_queue=max_queue, max_batch=max_batch, gather_s=gather_s,
                      wedged_after_s=wedged_after_s)
    app.state.scheduler = sched
    started = int(time.time())
    context = getattr(engine, "max_length", None)
    tok = getattr(engine, "tokenizer", None)
    counting_tok = copy.deepcopy(tok) if tok is not None else None  # a Rust tokenizer is not shared across threads
    counting_lock = threading.Lock()

    @app.exception_handler(RequestValidationError)
    async def _invalid(_request, exc: RequestValidationError):
        err = exc.errors()[0]
        loc = [str(p) for p in err.get("loc", ()) if p != "body"]
        where, msg = (loc[0] if loc else None), str(err.get("msg"))
        if err.get("type") == "json_invalid":
            where, msg = None, "the request body is not valid JSON"
        elif err.get("type") == "missing":
            msg = "required field is missing"
        elif where == "prompt":
            msg = "give a string or a list of strings (token ids are not supported)"
        return _error(400, f"{where}: {msg}" if where else msg, where)

    @app.exception_handler(_ApiError)
    async def _api_error(_request, exc: _ApiError):
        return _error(exc.status, exc.message, exc.param, exc.headers)

    @app.exception_handler(Exception)
    async def _crash(_request, exc: Exception):
        return _error(500, f"internal error: {type(exc).__name__}: {exc}")

    def n_tokens(text: str) -> int:
        if counting_tok is None:
            return 0
        with counting_lock:
            return len(counting_tok(text, add_special_tokens=True)["input_ids"])

    def check_request(body: _Body, requests: list) -> None:
        if body.model and body.model != model_name:
            raise _ApiError(404, f"model {body.model!r} is not served here; this server serves {model_name!r}", "model")
        if body.stream:
            raise _ApiError(400, "streaming is not supported; send stream: false", "stream")
        if body.n > max_n:
            raise _ApiError(400, f"n: at most {max_n} completions per request on this server (--max-n)", "n")
        if len(requests) * body.n > max(max_n, sched.max_batch):
            raise _ApiError(400, f"{len(requests)} prompts x n={body.n} is more completions than this server "
                            f"runs in one request ({max(max_n, sched.max_batch)}); split the request", "prompt")

    async def capped(requests: list, max_tokens: int) -> int:
        if context is None:
            return max_tokens
        from starlette.concurrency import run_in_threadpool

        lengths = await run_in_threadpool(lambda: [n_tokens(engine.render(r)) for r in requests])
        return min(cap_new_tokens(max_tokens, n, context) for n in lengths)

    async def wait_for(job: _Job, request: Request):
        """The job's result; if the client disconnects first, mark the job so the worker skips or stops it."""
        sched.submit(job)
        fut = asyncio.wrap_future(job.future)
        while True:
            done, _ = await asyncio.wait({fut}, timeout=0.25)
            if done:
                break
            if await request.is_disconnected():
                job.gone.set()
                job.future.cancel()  # only succeeds while it still waits in the queue
        try:
            return fut.result()
        except (_Cancelled, concurrent.futures.CancelledError, asyncio.CancelledError) as exc:
            raise _ApiError(503, str(exc) or "cancelled") from None
        except (SelfAlignError, ValueError) as exc:
            raise _ApiError(400, str(exc)) from exc

    def envelope(kind: str, choices: list, outs: list[list[Completion]]) -> dict:
        prompt = sum(cs[0].prompt_tokens for cs in outs if cs)
        done = sum(c.completion_tokens for cs in outs for c in cs)
        return {
            "id": f"{'chatcmpl' if kind == 'chat.completion' else 'cmpl'}-{uuid.uuid4().hex[:24]}",
            "object": kind,
            "created": int(time.time()),
            "model": model_name,
            "choices": choices,
            "usage": {"prompt_tokens": prompt, "completion_tokens": done, "total_tokens": prompt + done},
        }

    def batch_key(kind: str, body: _Body, sampling: Sampling) -> tuple:
        return (kind, tuple(sorted(sampling.model_dump(exclude={"seed", "stop"}).items())),
                tuple(sampling.stop), body.seed)

    @app.get("/health")
    def health():
        status, info = sched.health()
        return JSONResponse({**info, "model": model_name}, status)

    @app.get("/v1/models")
    def models():
        card = {"id": model_name, "object": "model", "created": started, "owned_by": "selfalign"}
        return {"object": "list", "data": [card]}

    @app.post("/v1/completions")
    async def completions(body: CompletionBody, request: Request):
        prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
        if not prompts:
            raise _ApiError(400, "prompt: give a string or a non-empty list of strings", "prompt")
        check_request(body, prompts)
        if body.max_tokens > 0:
            sampling = _sampling(body, await capped(prompts, body.max_tokens))
            outs = await wait_for(_Job(prompts, sampling, batch_key("text", body, sampling)), request)
        else:
            if context is not None and max(n_tokens(p) for p in prompts) > context:
                raise _ApiError(400, f"the prompt is longer than the model's context of {context} tokens", "prompt")
            outs = [[Completion("", "length", 0, n_tokens(p))] * body.n for p in prompts]
        if body.logprobs is not None:
            texts = [[p + c.text for c in comps] for p, comps in zip(prompts, outs, strict=True)]
            lps = await wait_for(_Job(fn=lambda: [[prompt_logprobs(engine, t, body.logprobs) for t in ts]
                                                  for ts in texts]), request)
        choices = []
        for i, (prompt, comps) in enumerate(zip(prompts, outs, strict=True)):
            for j, c in enumerate(comps):
                lp = None
                if body.logprobs is not None:
                    lp = lps[i][j] if body.echo else _after(lps[i][j], len(prompt))
                text = prompt + c.text if body.echo else c.text
                choices.append({"index": i * body.n + j, "text": text, "logprobs": lp,
                                "finish_reason": c.finish_reason})
        return envelope("text_completion", choices, outs)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatBody, request: Request):
        try:
            render_plain(body.messages)  # validates roles and order
        except ValueError as exc:
            raise _ApiError(400, f"messages: {exc}", "messages") from exc
        check_request(body, [body.messages])
        asked = body.max_completion_tokens or body.max_tokens or 256
        sampling = _sampling(body, await capped([body.messages], asked))
        outs = await wait_for(_Job([body.messages], sampling, batch_key("chat", body, sampling)), request)
        choices = [
            {
                "index": j,
                "message": {"role": "assistant", "content": c.text.strip()},
                "logprobs": None,
                "finish_reason": c.finish_reason,
            }
            for j, c in enumerate(outs[0])
        ]
        return envelope("chat.completion", choices, outs)

    return app


def run_server(
    model_ref: str,
    host: str = "127.0.0.1",
    port: int = 8000,
    engine_options: dict | None = None,
    log_level: str = "info",
    api_key: str | None = None,
    max_n: int = 16,
    max_queue: int = 64,
) -> None:
    """Load `model_ref` with the hf engine and serve it until SIGTERM or Ctrl-C, which end the work in
    flight at its next token and stop the server within a few seconds."""
    import uvicorn

    from selfalign.core.engines.hf import HFEngine

    if not 0 < port < 65536:
        raise SelfAlignError(f"--port {port} is not a TCP port", "use a number from 1 to 65535, e.g. 8000")
    try:  # fail before loading the model if the address is taken
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
        with socket.socket(family) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn does
            probe.bind((host, port))
    except OSError as exc:
        reason = exc.strerror or str(exc)
        raise SelfAlignError(
            f"cannot listen on {host}:{port}: {reason}", "pick another --port or --host"
        ) from exc
    engine = HFEngine(model_ref, **(engine_options or {}))
    app = build_app(engine, model_ref, api_key=api_key or None, max_n=max_n, max_queue=max_queue)
    sched: Scheduler = app.state.scheduler

    class _Server(uvicorn.Server):
        def handle_exit(self, sig, frame):  # SIGTERM / Ctrl-C: stop generating first, then close
            sched.stop()
            super().handle_exit(sig, frame)

    print(
        f"selfalign: serving {model_ref} at http://{host}:{port}/v1 (OpenAI-compatible"
        f"{', API key required' if api_key else ''})",
        file=sys.stderr,
        flush=True,
    )
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=3)
    _Server(config).run()
