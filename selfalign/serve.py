"""`selfalign serve`: an OpenAI-compatible HTTP server over a selfalign engine.

Endpoints: `GET /v1/models`, `GET /health`, `POST /v1/completions` and `POST /v1/chat/completions`,
answering in OpenAI's JSON shapes. `/v1/completions` also returns token log-probabilities in the
OpenAI/vLLM `logprobs` shape (`tokens`, `token_logprobs`, `text_offset`, `top_logprobs`); with
`echo: true` and `max_tokens: 0` that is the prompt's own log-probabilities, which is how the
`openai` engine scores continuations. Requests are served one at a time: a model is not
thread-safe, and on a CPU one request already keeps every core busy.
"""

from __future__ import annotations

import random
import socket
import sys
import threading
import time
import uuid
from typing import Any

from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field

from selfalign.core.chat import render_plain
from selfalign.core.engines.base import Completion, Engine, Sampling
from selfalign.core.errors import SelfAlignError


class _ApiError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param = status, message, param


def _error(status: int, message: str, param: str | None = None) -> JSONResponse:
    kind = "invalid_request_error" if status < 500 else "server_error"
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": None}}, status)


class _Body(BaseModel):
    model_config = ConfigDict(extra="allow")  # clients send fields we ignore (user, presence_penalty, ...)

    model: str | None = None
    n: int = Field(1, ge=1, le=128)
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
    stops = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
    return Sampling(
        n=body.n,
        temperature=1.0 if body.temperature is None else body.temperature,
        top_p=1.0 if body.top_p is None else body.top_p,
        max_new_tokens=max(1, max_tokens),
        stop=[s for s in stops if s],
        seed=random.randrange(2**31) if body.seed is None else body.seed,
        repetition_penalty=body.repetition_penalty,
    )


def build_app(engine: Engine, model_name: str) -> FastAPI:
    """A FastAPI app serving `engine` under the model name `model_name`."""
    app = FastAPI(title="selfalign", description=f"OpenAI-compatible server for {model_name}")
    lock = threading.Lock()
    started = int(time.time())

    @app.exception_handler(RequestValidationError)
    async def _invalid(_request, exc: RequestValidationError):
        err = exc.errors()[0]
        loc = [str(p) for p in err.get("loc", ()) if p != "body"]
        where, msg = (loc[0] if loc else None), str(err.get("msg"))
        if err.get("type") == "json_invalid":
            where, msg = None, "the request body is not valid JSON"
        elif where == "prompt":
            msg = "give a string or a list of strings (token ids are not supported)"
        return _error(400, f"{where}: {msg}" if where else msg, where)

    @app.exception_handler(_ApiError)
    async def _api_error(_request, exc: _ApiError):
        return _error(exc.status, exc.message, exc.param)

    @app.exception_handler(Exception)
    async def _crash(_request, exc: Exception):
        return _error(500, f"internal error: {type(exc).__name__}: {exc}")

    def run(fn):
        with lock:
            try:
                return fn()
            except (SelfAlignError, ValueError) as exc:
                raise _ApiError(400, str(exc)) from exc

    def n_tokens(text: str) -> int:
        tok = getattr(engine, "tokenizer", None)
        return len(tok(text, add_special_tokens=True)["input_ids"]) if tok is not None else 0

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

    @app.get("/health")
    def health():
        return {"status": "ok", "model": model_name}

    @app.get("/v1/models")
    def models():
        card = {"id": model_name, "object": "model", "created": started, "owned_by": "selfalign"}
        return {"object": "list", "data": [card]}

    @app.post("/v1/completions")
    def completions(body: CompletionBody):
        if body.stream:
            raise _ApiError(400, "streaming is not supported; send stream: false", "stream")
        prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
        if not prompts:
            raise _ApiError(400, "prompt: give a string or a non-empty list of strings", "prompt")
        sampling = _sampling(body, body.max_tokens)

        def work():
            if body.max_tokens > 0:
                outs = engine.generate(prompts, sampling)
            else:
                outs = [[Completion("", "length", 0, n_tokens(p))] * body.n for p in prompts]
            choices = []
            for i, (prompt, comps) in enumerate(zip(prompts, outs, strict=True)):
                for j, c in enumerate(comps):
                    lp = None
                    if body.logprobs is not None:
                        lp = prompt_logprobs(engine, prompt + c.text, body.logprobs)
                        lp = lp if body.echo else _after(lp, len(prompt))
                    text = prompt + c.text if body.echo else c.text
                    choices.append(
                        {
                            "index": i * body.n + j,
                            "text": text,
                            "logprobs": lp,
                            "finish_reason": c.finish_reason,
                        }
                    )
            return envelope("text_completion", choices, outs)

        return run(work)

    @app.post("/v1/chat/completions")
    def chat_completions(body: ChatBody):
        if body.stream:
            raise _ApiError(400, "streaming is not supported; send stream: false", "stream")
        try:
            render_plain(body.messages)  # validates roles and order
        except ValueError as exc:
            raise _ApiError(400, f"messages: {exc}", "messages") from exc
        sampling = _sampling(body, body.max_completion_tokens or body.max_tokens or 256)

        def work():
            outs = engine.generate([body.messages], sampling)
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

        return run(work)

    return app


def run_server(
    model_ref: str,
    host: str = "127.0.0.1",
    port: int = 8000,
    engine_options: dict | None = None,
    log_level: str = "info",
) -> None:
    """Load `model_ref` with the hf engine and serve it until interrupted."""
    import uvicorn

    from selfalign.core.engines.hf import HFEngine

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
    app = build_app(engine, model_ref)
    print(
        f"selfalign: serving {model_ref} at http://{host}:{port}/v1 (OpenAI-compatible)",
        file=sys.stderr,
        flush=True,
    )
    uvicorn.run(app, host=host, port=port, log_level=log_level)
