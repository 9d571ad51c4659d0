"""`selfalign serve` and the `openai` engine, end to end over loopback HTTP.

A real server runs `tiny:llama` in a subprocess; small stub servers in threads script the
failures (429s, 400s) the engine must retry or report.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest

from selfalign.core.engines.base import Sampling
from selfalign.core.engines.openai import OpenAIEngine
from selfalign.core.errors import SelfAlignError

HOST = "127.0.0.1"


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("selfalign-cache")
    old = os.environ.get("SELFALIGN_CACHE")
    os.environ["SELFALIGN_CACHE"] = str(path)
    from selfalign.core.models import resolve

    resolve("tiny:llama")  # build the model once, before the server and the test both load it
    yield path
    if old is None:
        os.environ.pop("SELFALIGN_CACHE", None)
    else:
        os.environ["SELFALIGN_CACHE"] = old


@pytest.fixture(scope="module")
def server(cache_dir, tmp_path_factory):
    port = free_port()
    log = tmp_path_factory.mktemp("server") / "server.log"
    env = {**os.environ, "SELFALIGN_CACHE": str(cache_dir)}
    code = (
        f"from selfalign.serve import run_server; run_server('tiny:llama', port={port}, log_level='warning')"
    )
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-c", code], env=env, stdout=out, stderr=subprocess.STDOUT)
    url = f"http://{HOST}:{port}/v1"
    try:
        deadline = time.monotonic() + 60
        while True:
            if proc.poll() is not None:
                pytest.fail(f"the server exited with {proc.returncode}:\n{log.read_text()}")
            try:
                if httpx.get(f"http://{HOST}:{port}/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"the server did not become healthy within 60 s:\n{log.read_text()}")
            time.sleep(0.2)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture
def engine(server):
    with OpenAIEngine(
        "tiny:llama", base_url=server, max_concurrency=2, max_retries=1, retry_delay=0.01
    ) as eng:
        yield eng


# -- the real server ----------------------------------------------------------------------------
def test_models_health_and_shapes(server):
    models = httpx.get(f"{server}/models").json()
    assert models["object"] == "list" and models["data"][0]["id"] == "tiny:llama"
    body = {
        "model": "tiny:llama",
        "prompt": ["ab", "cd"],
        "n": 2,
        "max_tokens": 4,
        "temperature": 0.7,
        "seed": 1,
    }
    data = httpx.post(f"{server}/completions", json=body, timeout=30).json()
    assert data["object"] == "text_completion" and data["model"] == "tiny:llama"
    assert [c["index"] for c in data["choices"]] == [0, 1, 2, 3]
    assert (
        data["usage"]["total_tokens"] == data["usage"]["prompt_tokens"] + data["usage"]["completion_tokens"]
    )
    bad = httpx.post(f"{server}/completions", json={"prompt": "x", "temperature": -1}, timeout=30)
    assert bad.status_code == 400 and "temperature" in bad.json()["error"]["message"]
    bad = httpx.post(f"{server}/completions", json={"prompt": [1, 2, 3]})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "prompt"
    bad = httpx.post(f"{server}/chat/completions", json={"messages": [{"role": "robot", "content": "hi"}]})
    assert bad.status_code == 400 and "role" in bad.json()["error"]["message"]


def test_echo_logprobs_shape(server):
    body = {"prompt": "Hello", "echo": True, "logprobs": 2, "max_tokens": 0}
    lp = httpx.post(f"{server}/completions", json=body, timeout=30).json()["choices"][0]["logprobs"]
    assert "".join(lp["tokens"]) == "Hello"
    assert lp["token_logprobs"][0] is None and all(x < 0 for x in lp["token_logprobs"][1:])
    assert lp["text_offset"] == sorted(lp["text_offset"]) and len(lp["text_offset"]) == len(lp["tokens"])
    assert lp["top_logprobs"][0] is None and all(len(t) <= 2 for t in lp["top_logprobs"][1:])


def test_generate_plain_and_chat(engine):
    sampling = Sampling(n=2, temperature=0.8, max_new_tokens=6, seed=3)
    chat = [{"role": "user", "content": "Say hi."}]
    out = engine.generate(["The cat", "Once upon", chat], sampling)
    assert len(out) == 3 and all(len(comps) == 2 for comps in out)
    assert all(
        isinstance(c.text, str) and c.finish_reason in ("stop", "length") for comps in out for c in comps
    )
    assert any(c.text for comps in out[:2] for c in comps)
    assert all(c.completion_tokens >= 0 and c.prompt_tokens > 0 for comps in out for c in comps)


def test_generate_iter_chunks_and_completions_endpoint(server):
    with OpenAIEngine(
        "tiny:llama", base_url=server, endpoint="completions", max_concurrency=1, batch_size=2
    ) as eng:
        chunks = list(
            eng.generate_iter(
                ["a", "b", "c", [{"role": "user", "content": "hi"}]], Sampling(max_new_tokens=3)
            )
        )
    assert [len(c) for c in chunks] == [2, 2]
    assert sorted(i for chunk in chunks for i, _ in chunk) == [0, 1, 2, 3]


def test_score_matches_hf_engine(engine, cache_dir):
    from selfalign.core.engines.hf import HFEngine

    context, continuations = "Question: is the sky blue?\nAnswer:", [" yes", " no", " it depends on the hour"]
    chat = [{"role": "user", "content": "Pick a colour."}]
    remote = engine.score_many([(context, continuations), (chat, [" red", " blue"])])
    local = HFEngine("tiny:llama").score_many([(context, continuations), (chat, [" red", " blue"])])
    for r_row, l_row in zip(remote, local, strict=True):
        assert r_row == pytest.approx(l_row, abs=1e-3)
    assert len(set(remote[0])) == 3  # real, distinct scores


# -- stub servers for failures ------------------------------------------------------------------
class Stub:
    """A loopback HTTP server answering scripted (status, body, headers) and recording requests."""

    def __init__(self, script):
        self.script, self.seen = list(script), []
        stub = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                length = int(self.headers.get("content-length") or 0)
                stub.seen.append(
                    {
                        "path": self.path,
                        "headers": dict(self.headers),
                        "body": json.loads(self.rfile.read(length)),
                    }
                )
                status, body, headers = stub.script.pop(0) if len(stub.script) > 1 else stub.script[0]
                data = json.dumps(body).encode()
                self.send_response(status)
                for k, v in {
                    **headers,
                    "Content-Type": "application/json",
                    "Content-Length": str(len(data)),
                }.items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer((HOST, 0), Handler)
        self.url = f"http://{HOST}:{self.httpd.server_address[1]}/v1"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()


OK = {
    "choices": [{"index": 0, "text": " fine\nHuman: more", "finish_reason": "length"}],
    "usage": {"completion_tokens": 5},
}
LIMITED = {"error": {"message": "rate limited"}}


def test_retries_429_then_succeeds_and_sends_key(monkeypatch):
    monkeypatch.setenv("SELFALIGN_TEST_KEY", "sk-test-secret-123")
    script = [(429, LIMITED, {"Retry-After": "0"}), (429, LIMITED, {}), (200, OK, {})]
    with (
        Stub(script) as stub,
        OpenAIEngine("m", base_url=stub.url, api_key_env="SELFALIGN_TEST_KEY", retry_delay=0.01) as eng,
    ):
        out = eng.generate(["hello"], Sampling(stop=["\nHuman:"]))
    assert len(stub.seen) == 3 and stub.seen[0]["path"] == "/v1/completions"
    assert stub.seen[0]["headers"]["Authorization"] == "Bearer sk-test-secret-123"
    assert stub.seen[0]["body"]["prompt"] == "hello" and stub.seen[0]["body"]["stop"] == ["\nHuman:"]
    assert out[0][0].text == " fine" and out[0][0].finish_reason == "stop"  # truncated locally at the stop


def test_persistent_5xx_gives_up():
    with Stub([(503, {"error": {"message": "overloaded"}}, {})]) as stub:
        with OpenAIEngine("m", base_url=stub.url, max_retries=2, retry_delay=0.01) as eng:
            with pytest.raises(SelfAlignError, match="503.*overloaded"):
                eng.generate(["x"], Sampling())
    assert len(stub.seen) == 3


def test_400_is_not_retried_and_keeps_key_out(monkeypatch):
    monkeypatch.setenv("SELFALIGN_TEST_KEY", "sk-test-secret-123")
    bad = {"error": {"message": "max_tokens is too large for key sk-test-secret-123"}}
    with Stub([(400, bad, {})]) as stub:
        with OpenAIEngine("m", base_url=stub.url, api_key_env="SELFALIGN_TEST_KEY", retry_delay=0.01) as eng:
            with pytest.raises(SelfAlignError) as info:
                eng.generate([[{"role": "user", "content": "hi"}]], Sampling())
    assert len(stub.seen) == 1 and stub.seen[0]["path"] == "/v1/chat/completions"
    assert "max_tokens is too large" in str(info.value) and "400" in str(info.value)
    assert "sk-test-secret-123" not in str(info.value) and "sk-test-secret-123" not in repr(info.value)


def test_server_down_is_reported_quickly(monkeypatch):
    monkeypatch.setenv("SELFALIGN_TEST_KEY", "sk-test-secret-123")
    url = f"http://{HOST}:{free_port()}/v1"
    import selfalign.core.engines.openai as openai_engine

    waits: list[float] = []
    monkeypatch.setattr(openai_engine.time, "sleep", waits.append)  # counted, not slept
    with OpenAIEngine(
        "m", base_url=url, api_key_env="SELFALIGN_TEST_KEY", max_retries=1, retry_delay=0.01
    ) as eng:
        with pytest.raises(SelfAlignError) as info:
            eng.score("context", [" a"])
    assert len(waits) == 1 and waits[0] < 1  # max_retries=1: one short wait, then the error
    assert "(after 2 attempts)" in str(info.value)
    assert "cannot reach the OpenAI-compatible server" in str(info.value) and url in str(info.value)
    assert "selfalign serve" in (info.value.hint or "") and "sk-test-secret-123" not in str(info.value)


def test_score_against_vllm_style_answers():
    """vLLM refuses max_tokens 0, counts a BOS string in its offsets and echoes a generated token."""
    lp = {"tokens": ["<s>", "Answer", ":", " yes", "!"], "text_offset": [0, 3, 9, 10, 14]}
    lp["token_logprobs"] = [None, -1.0, -2.0, -3.0, -4.0]
    echoed = {"choices": [{"index": 0, "text": "Answer: yes!", "logprobs": lp, "finish_reason": "length"}]}
    refused = {"error": {"message": "max_tokens must be at least 1, got 0."}}
    with Stub([(400, refused, {}), (200, echoed, {})]) as stub, OpenAIEngine("m", base_url=stub.url) as eng:
        assert eng.score("Answer: ", ["yes"]) == [-3.0]
    assert [s["body"]["max_tokens"] for s in stub.seen] == [0, 1]
    assert stub.seen[1]["body"]["prompt"] == ["Answer: yes"] and stub.seen[1]["body"]["echo"] is True
