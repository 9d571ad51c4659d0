"""`selfalign serve` under concurrent load: N requests sent at once, against one engine batch of the
same N prompts, measured in the same run (issue #14: 10 concurrent 64-token requests should take
within 2x one batch of 10, and a request for 10^30 tokens is refused, not run).

    python benchmarks/bench_serve.py [--model tiny:llama] [--concurrent 10] [--max-tokens 64] [--repeats 5]

Each repeat times one direct batch (the anchor) and one burst of concurrent HTTP requests on
loopback (one pooled client, as an OpenAI client keeps its connections), alternately, and prints the medians, their
ratio, and how many engine calls the server
made per burst. The huge request goes in with every burst and must come back 400.
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="tiny:llama")
    ap.add_argument("--concurrent", type=int, default=10)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()

    import uvicorn

    from selfalign.core.engines.base import Sampling
    from selfalign.core.engines.hf import HFEngine
    from selfalign.serve import build_app

    engine = HFEngine(args.model, batch_size=max(16, args.concurrent))
    prompts = [f"Question {i}: what is {i} plus {i}?" for i in range(args.concurrent)]
    sampling = Sampling(temperature=0, max_new_tokens=args.max_tokens)
    engine.generate(prompts, sampling.model_copy(update={"max_new_tokens": 2}))  # warm up

    calls: list[int] = []
    plain = engine.generate

    def counted(requests, s):
        calls.append(len(requests))
        return plain(requests, s)

    engine.generate = counted
    app = build_app(engine, "bench")
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="error"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    while not server.started:
        time.sleep(0.05)

    # one client with a connection pool, as an OpenAI client keeps: a fresh httpx client per request costs
    # ~20 ms of set-up each, which under 10 threads is more than the tiny model's whole batch
    client = httpx.Client(timeout=600, limits=httpx.Limits(max_connections=args.concurrent + 1))
    for _ in range(2):  # open the pool's connections
        list(ThreadPoolExecutor(args.concurrent).map(lambda p: client.get(f"{url}/health"), prompts))

    def complete(prompt: str, max_tokens: int) -> httpx.Response:
        return client.post(f"{url}/v1/completions",
                           json={"model": "bench", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0})

    batch_s, burst_s, calls_per_burst = [], [], []
    print(f"load average at start: {os.getloadavg()}")
    with ThreadPoolExecutor(args.concurrent + 1) as pool:
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            plain(prompts, sampling)
            batch_s.append(time.perf_counter() - t0)

            before = len(calls)
            barrier = threading.Barrier(args.concurrent + 1)

            def one(prompt: str, barrier=barrier) -> httpx.Response:
                barrier.wait()
                return complete(prompt, args.max_tokens)

            huge = pool.submit(complete, "Hello", 10**30)
            futures = [pool.submit(one, p) for p in prompts]
            barrier.wait()
            t0 = time.perf_counter()
            statuses = [f.result().status_code for f in futures]
            burst_s.append(time.perf_counter() - t0)
            calls_per_burst.append(len(calls) - before)
            assert statuses == [200] * args.concurrent, statuses
            assert huge.result().status_code == 400, huge.result().text
    client.close()
    server.should_exit = True
    thread.join(timeout=10)
    batch, burst = statistics.median(batch_s), statistics.median(burst_s)
    print(f"{args.model}: {args.concurrent} prompts x {args.max_tokens} tokens, {args.repeats} repeats (medians)")
    print(f"  one engine batch:          {batch:.3f} s")
    print(f"  {args.concurrent} concurrent requests:    {burst:.3f} s  -> {burst / batch:.2f}x one "
          "batch (target <= 2x)")
    print(f"  engine calls per burst:    {calls_per_burst}")
    print("  request for 10^30 tokens:  400 every time")
    print(f"load average at end: {os.getloadavg()}")


if __name__ == "__main__":
    main()
