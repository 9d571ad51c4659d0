"""The `openai` engine: any OpenAI-compatible server (`selfalign serve`, vLLM, llama.cpp, OpenAI).

Requests go out in parallel (a thread pool of `max_concurrency`) and come back in chunks as they
finish, so stages can write rows as they go. 429s, 5xx answers, dropped connections and timeouts
are retried with exponential backoff and jitter (honouring Retry-After); any other 4xx fails at
once with the server's message. Scoring asks `/completions` for the log-probabilities of
context + continuation (`echo` with `logprobs`) and sums those of the continuation's tokens, as
lm-eval does against vLLM. The API key is read from an environment variable and only ever sent
as a Bearer header: it is kept out of logs, errors and rows.
"""

from __future__ import annotations

import os
import random
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed

import httpx

from selfalign.core.chat import Request, first_stop, is_chat, render, truncate_at_stop
from selfalign.core.engines.base import Completion, Engine, Sampling, split_context
from selfalign.core.errors import SelfAlignError

DEFAULT_BASE_URL = "http://127.0.0.1:8000/v1"
SERVER_STOPS = 4  # OpenAI accepts at most 4 stop strings; all of them are also applied here
UNREACHABLE_HINT = "start it (e.g. `selfalign serve MODEL`) or set --base-url / OPENAI_BASE_URL"


class RequestRefused(SelfAlignError):
    """A 4xx answer (other than 429) from the server."""

    def __init__(self, message: str, status: int, hint: str | None = None):
        super().__init__(message, hint)
        self.status = status


def _server_message(resp: httpx.Response) -> str:
    try:
        body = resp.json()
    except ValueError:
        return resp.text.strip()[:300] or resp.reason_phrase
    err = body.get("error", body) if isinstance(body, dict) else body
    if isinstance(err, dict):
        err = err.get("message") or err.get("detail") or err
    return str(err)[:300]


def _retry_after(resp: httpx.Response) -> float | None:
    try:
        return min(max(float(resp.headers["retry-after"]), 0.0), 60.0)
    except (KeyError, ValueError):
        return None


class OpenAIEngine(Engine):
    name = "openai"

    def __init__(
        self,
        model_ref: str,
        base_url: str | None = None,
        api_key_env: str = "OPENAI_API_KEY",
        endpoint: str = "auto",
        max_concurrency: int = 8,
        max_retries: int = 5,
        timeout: float = 120.0,
        chat_format: str = "plain",
        batch_size: int | None = None,
        retry_delay: float = 1.0,
    ):
        super().__init__(model_ref, chat_format)
        if endpoint not in ("auto", "completions", "chat"):
            raise SelfAlignError(f"unknown openai endpoint {endpoint!r}", "use auto, completions or chat")
        self.base_url = (base_url or os.environ.get("OPENAI_BASE_URL") or DEFAULT_BASE_URL).rstrip("/")
        self.endpoint = endpoint
        self.api_key_env = api_key_env
        self.max_concurrency = max(1, int(max_concurrency))
        self.max_retries = max(0, int(max_retries))
        self.timeout = timeout
        self.retry_delay = retry_delay
        self.chunk_size = batch_size or 2 * self.max_concurrency
        self._score_max_tokens = 0  # vLLM refuses 0: switched to 1 on the first refusal
        key = os.environ.get(api_key_env) or ""
        self._secrets = [key] if key else []
        self._client = httpx.Client(
            headers={"Authorization": f"Bearer {key}"} if key else {},
            timeout=timeout,
            limits=httpx.Limits(
                max_connections=self.max_concurrency, max_keepalive_connections=self.max_concurrency
            ),
        )
        self._pool = ThreadPoolExecutor(self.max_concurrency, thread_name_prefix="selfalign-openai")

    # -- HTTP ----------------------------------------------------------------------------------
    def _scrub(self, text: str) -> str:
        for secret in self._secrets:
            text = text.replace(secret, "***")
        return text

    def _post(self, path: str, payload: dict) -> dict:
        url = self.base_url + path
        problem, hint, wait = "", None, 0.0
        for attempt in range(self.max_retries + 1):
            if attempt:
                time.sleep(wait)
            wait = self.retry_delay * 2**attempt * random.uniform(0.5, 1.5)
            try:
                resp = self._client.post(url, json=payload)
            except httpx.TimeoutException:
                problem = f"the server at {url} did not answer within {self.timeout:g} s"
                hint = "raise the engine's timeout or lower its max_concurrency"
                continue
            except httpx.TransportError as exc:
                problem = (
                    f"cannot reach the OpenAI-compatible server at {self.base_url} ({type(exc).__name__})"
                )
                hint = UNREACHABLE_HINT
                continue
            if resp.is_success:
                try:
                    return resp.json()
                except ValueError:
                    raise SelfAlignError(
                        f"the server at {url} answered with something that is not JSON"
                    ) from None
            message = self._scrub(_server_message(resp))
            if resp.status_code == 429 or resp.status_code >= 500:
                problem = f"the server at {url} kept answering {resp.status_code}: {message}"
                hint = "lower max_concurrency or try again later"
                retry_after = _retry_after(resp)
                wait = wait if retry_after is None else retry_after
                continue
            hint = {
                401: f"check the API key in ${self.api_key_env}",
                403: f"check the API key in ${self.api_key_env}",
                404: f"check the model name {self.model_ref!r} and that the base URL ends in /v1",
            }.get(resp.status_code)
            raise RequestRefused(
                f"the server at {url} refused the request ({resp.status_code}): {message}",
                resp.status_code,
                hint,
            )
        raise SelfAlignError(f"{problem} (after {self.max_retries + 1} attempts)", hint)

    # -- generation ----------------------------------------------------------------------------
    def _render(self, request: Request) -> str:
        if not is_chat(request):
            return request
        try:
            return render(request, None, self.chat_format)
        except ValueError as exc:
            raise SelfAlignError(
                f"cannot send this chat to /completions: {exc}", "use endpoint chat"
            ) from exc

    def _generate_one(self, request: Request, sampling: Sampling) -> list[Completion]:
        stops = self.stops_for(request, sampling)
        body = {
            "model": self.model_ref,
            "n": sampling.n,
            "temperature": sampling.temperature,
            "top_p": sampling.top_p,
            "max_tokens": sampling.max_new_tokens,
            "seed": sampling.seed,
        }
        if stops:
            body["stop"] = stops[:SERVER_STOPS]
        if sampling.repetition_penalty != 1.0:
            body["repetition_penalty"] = sampling.repetition_penalty  # vLLM's extension
        chat = is_chat(request) and self.endpoint != "completions"
        if chat:
            data = self._post("/chat/completions", {**body, "messages": list(request)})
        else:
            data = self._post("/completions", {**body, "prompt": self._render(request)})
        choices = sorted(data.get("choices") or [], key=lambda c: c.get("index", 0))
        if len(choices) != sampling.n:
            raise SelfAlignError(
                f"the server at {self.base_url} returned {len(choices)} choices for n={sampling.n}"
            )
        usage = data.get("usage") or {}
        spent, prompt_tokens = int(usage.get("completion_tokens") or 0), int(usage.get("prompt_tokens") or 0)
        out = []
        for j, choice in enumerate(choices):
            text = ((choice.get("message") or {}).get("content") if chat else choice.get("text")) or ""
            hit = first_stop(text, stops)  # a server that applied the stop itself leaves no trace (None)
            text, stopped = truncate_at_stop(text, stops)
            reason = "stop" if stopped or choice.get("finish_reason") != "length" else "length"
            tokens = spent // sampling.n + (j < spent % sampling.n)  # usage is per request: share it out
            out.append(Completion(text, reason, tokens, prompt_tokens, stop_string=hit))
        return out

    def generate_iter(
        self, requests: Sequence[Request], sampling: Sampling
    ) -> Iterator[list[tuple[int, list[Completion]]]]:
        futures = {self._pool.submit(self._generate_one, r, sampling): i for i, r in enumerate(requests)}
        try:
            done: list[tuple[int, list[Completion]]] = []
            for fut in as_completed(futures):
                done.append((futures[fut], fut.result()))
                if len(done) >= self.chunk_size:
                    yield done
                    done = []
            if done:
                yield done
        finally:
            for fut in futures:
                fut.cancel()

    # -- scoring -------------------------------------------------------------------------------
    def _score_one(self, context: Request, continuations: Sequence[str]) -> list[float]:
        if not continuations:
            return []
        ctx_text = self._render(context)
        pairs = [split_context(ctx_text, c) for c in continuations]
        body = {
            "model": self.model_ref,
            "prompt": [c + k for c, k in pairs],
            "echo": True,
            "logprobs": 1,
            "temperature": 0.0,
        }
        try:
            data = self._post("/completions", {**body, "max_tokens": self._score_max_tokens})
        except RequestRefused as exc:
            if exc.status != 400 or "max_tokens" not in exc.message or self._score_max_tokens:
                raise
            self._score_max_tokens = 1
            data = self._post("/completions", {**body, "max_tokens": 1})
        choices = sorted(data.get("choices") or [], key=lambda c: c.get("index", 0))
        if len(choices) != len(pairs):
            raise SelfAlignError(
                f"the server at {self.base_url} returned {len(choices)} choices for {len(pairs)} prompts"
            )
        return [
            self._continuation_logprob(ch, ctx, ctx + cont)
            for ch, (ctx, cont) in zip(choices, pairs, strict=True)
        ]

    def _continuation_logprob(self, choice: dict, ctx: str, prompt: str) -> float:
        lp = choice.get("logprobs") or {}
        tokens, offsets, logprobs = lp.get("tokens"), lp.get("text_offset"), lp.get("token_logprobs")
        if not tokens or not offsets or not logprobs:
            raise SelfAlignError(
                f"the server at {self.base_url} returned no prompt logprobs",
                "scoring needs /completions with echo and logprobs (selfalign serve and vLLM have it)",
            )
        # Offsets count characters of the echoed text. Some servers also count a BOS string, and a
        # generated token may follow the prompt: locate the prompt from the end of the echoed text.
        echoed = choice.get("text") or ""
        echoed = echoed if echoed.startswith(prompt) else prompt
        shift = offsets[-1] + len(tokens[-1]) - len(echoed)
        start, end = len(ctx) + shift, len(prompt) + shift
        return float(
            sum(x for o, x in zip(offsets, logprobs, strict=False) if start <= o < end and x is not None)
        )

    def score_many(self, items: Sequence[tuple[Request, Sequence[str]]]) -> list[list[float]]:
        futures = [self._pool.submit(self._score_one, ctx, conts) for ctx, conts in items]
        try:
            return [f.result() for f in futures]
        finally:
            for fut in futures:
                fut.cancel()

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
        self._client.close()
