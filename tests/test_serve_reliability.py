"""`selfalign serve` under load and abuse (issue #14): batching of concurrent requests, caps, 404,
API key, a bounded queue, disconnects, a truthful /health and a prompt stop on SIGTERM.

The servers run a 2-layer random model on loopback only. Time is never compared with a constant:
the batching test measures one engine batch of 10 in the same test and asserts a ratio; the other
waits have generous guards that only stop a hung test.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from selfalign.core.engines.base import Sampling
from selfalign.core.engines.hf import HFEngine
from selfalign.core.tiny import build_byte_tokenizer, build_tiny_model
from selfalign.serve import _ApiError, build_app, cap_new_tokens

HOST = "127.0.0.1"
NAME = "tiny-served"


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def tiny_engine() -> HFEngine:
    return HFEngine("tiny:llama", model=build_tiny_model("llama"), tokenizer=build_byte_tokenizer(), batch_size=16)


def wait_until(check, guard_s: float = 120.0, what: str = "condition"):
    """Poll `check` until it is truthy; the guard only ends a hung test."""
    end = time.monotonic() + guard_s
    while time.monotonic() < end:
        if value := check():
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


class Served:
    """A uvicorn server in a thread on a loopback port."""

    def __init__(self, app):
        import uvicorn

        self.port = free_port()
        self.url = f"http://{HOST}:{self.port}"
        self.app = app
        self.server = uvicorn.Server(uvicorn.Config(app, host=HOST, port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self):
        self.thread.start()
        wait_until(lambda: self.server.started, 60, "the server to start")
        return self

    def __exit__(self, *exc):
        self.app.state.scheduler.stop()
        self.server.should_exit = True
        self.thread.join(30)


def complete(url: str, timeout: float = 300, **body) -> httpx.Response:
    payload = {"model": NAME, "prompt": "Hello", "max_tokens": 8, "temperature": 0, **body}
    return httpx.post(f"{url}/v1/completions", json=payload, timeout=timeout)


def test_cap_new_tokens_caps_to_room_and_refuses_what_cannot_fit():
    assert cap_new_tokens(64, 10, 2048) == 64
    assert cap_new_tokens(2048, 100, 2048) == 1948  # capped at what fits after the prompt
    with pytest.raises(_ApiError, match="max_tokens"):
        cap_new_tokens(10**30, 10, 2048)
    with pytest.raises(_ApiError, match="shorten the prompt"):
        cap_new_tokens(16, 2048, 2048)


def test_ten_concurrent_requests_run_as_one_batch_and_a_huge_one_is_refused():
    """Requests that arrive together share engine calls: counted at the engine, not timed."""
    engine = tiny_engine()
    prompts = [f"Question {i}: what is {i} plus {i}?" for i in range(10)]
    sampling = Sampling(temperature=0, max_new_tokens=64)
    direct = engine.generate(prompts, sampling)
    calls: list[int] = []
    plain_generate = engine.generate

    def counted(requests, sampling):
        calls.append(len(requests))
        return plain_generate(requests, sampling)

    engine.generate = counted
    app = build_app(engine, NAME, gather_s=0.25)  # a generous gathering window: threads start unevenly under load
    barrier = threading.Barrier(10)
    with Served(app) as srv, ThreadPoolExecutor(11) as pool:
        def together(prompt):
            barrier.wait()
            return complete(srv.url, prompt=prompt, max_tokens=64)

        huge = pool.submit(complete, srv.url, max_tokens=10**30)
        results = list(pool.map(together, prompts))
        huge = huge.result()
    for r, want in zip(results, direct, strict=True):
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["text"] == want[0].text  # the same greedy answer as the engine alone
    assert sum(calls) == 10 and len(calls) <= 2, f"engine calls per request batch: {calls}"
    assert app.state.scheduler.batches == len(calls)
    assert huge.status_code == 400 and "max_tokens" in huge.json()["error"]["message"]


def test_bad_requests_get_clear_statuses():
    engine = tiny_engine()
    with Served(build_app(engine, NAME, api_key="s3cret-key", max_n=4)) as srv:
        auth = {"Authorization": "Bearer s3cret-key"}
        assert httpx.get(f"{srv.url}/health").status_code == 200  # probes need no key
        assert complete(srv.url).status_code == 401
        bad = httpx.post(f"{srv.url}/v1/completions", json={"prompt": "x"}, headers={"Authorization": "Bearer nope"})
        assert bad.status_code == 401 and "s3cret" not in bad.text

        def post(**body):
            payload = {"model": NAME, "prompt": "Hello", "max_tokens": 4, "temperature": 0, **body}
            return httpx.post(f"{srv.url}/v1/completions", json=payload, headers=auth, timeout=300)

        assert post().status_code == 200
        r = post(model="gpt-4")
        assert r.status_code == 404 and NAME in r.json()["error"]["message"]
        r = post(n=128)
        assert r.status_code == 400 and "at most 4" in r.json()["error"]["message"]
        r = post(max_tokens=10**30, n=128)
        assert r.status_code == 400
        r = post(prompt="x" * 1_000_000)  # a 1 MB prompt is refused, not silently cut from the left
        assert r.status_code == 400 and "context" in r.json()["error"]["message"]
        r = httpx.post(f"{srv.url}/v1/completions", json={"model": NAME, "max_tokens": 4}, headers=auth)
        assert r.status_code == 400 and r.json()["error"]["message"] == "prompt: required field is missing"


class _BlockingEngine:
    """An engine whose generation waits for the test: a stand-in for a stuck model."""

    name, batch_size = "blocking", 1

    def __init__(self):
        self.release = threading.Event()

    def generate(self, requests, sampling):
        self.release.wait(120)
        from selfalign.core.engines.base import Completion

        return [[Completion("ok", "stop", 1, 1)] for _ in requests]

    def render(self, request):
        return request


def test_full_queue_gets_429_and_health_tells_busy_then_wedged():
    engine = _BlockingEngine()
    app = build_app(engine, NAME, max_queue=1, gather_s=0.0, wedged_after_s=0.5)
    with Served(app) as srv, ThreadPoolExecutor(2) as pool:
        first = pool.submit(complete, srv.url, prompt="a")
        wait_until(lambda: httpx.get(f"{srv.url}/health").json()["status"] != "ok", what="a busy worker")
        second = pool.submit(complete, srv.url, prompt="b")
        wait_until(lambda: httpx.get(f"{srv.url}/health").json().get("queued") == 1, what="a queued request")
        third = complete(srv.url, prompt="c")
        assert third.status_code == 429 and int(third.headers["Retry-After"]) >= 1
        health = wait_until(lambda: (h := httpx.get(f"{srv.url}/health")).status_code == 503 and h, what="wedged")
        assert health.json()["status"] == "wedged"
        engine.release.set()
        assert first.result().status_code == 200 and second.result().status_code == 200
        assert httpx.get(f"{srv.url}/health").json()["status"] == "ok"


def test_generation_stops_when_the_client_disconnects():
    app = build_app(tiny_engine(), NAME)
    with Served(app) as srv:
        with pytest.raises(httpx.TimeoutException):
            # 2000 tokens take far longer than the client waits; it then closes the connection
            complete(srv.url, max_tokens=2000, timeout=1.0)
        sched = app.state.scheduler
        wait_until(lambda: sched.batches == 1 and sched.busy_since is None, what="the worker to drop the batch")
        assert sched.cancelled == 1


def test_sigterm_stops_a_busy_server_and_cuts_its_work_short(tmp_path):
    port = free_port()
    env = {**os.environ, "SELFALIGN_CACHE": str(tmp_path / "cache")}
    log = open(tmp_path / "serve.log", "wb")
    proc = subprocess.Popen([sys.executable, "-m", "selfalign.cli", "serve", "tiny:llama", "--port", str(port)],
                            env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://{HOST}:{port}"
    try:
        def up():
            try:
                return httpx.get(f"{url}/health").status_code == 200
            except httpx.TransportError:
                assert proc.poll() is None, (tmp_path / "serve.log").read_text()
                return False

        wait_until(up, 180, "the server to start")
        with ThreadPoolExecutor(1) as pool:
            long = pool.submit(complete, url, model="tiny:llama", max_tokens=2000)
            wait_until(lambda: httpx.get(f"{url}/health").json()["status"] == "busy", what="a busy server")
            proc.send_signal(signal.SIGTERM)
            rc = proc.wait(60)
            try:
                answer = long.result()
                assert answer.status_code == 503  # cancelled, not a 2000-token answer
            except httpx.TransportError:
                pass  # the connection closed with the server: also no answer
        # uvicorn exits by re-raising the signal it caught once it has shut down
        assert rc in (0, -signal.SIGTERM), (tmp_path / "serve.log").read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        log.close()
