"""vLLM's CPU build as the anchor of issue #11's generation figures, measured through the project's
`vllm` engine, on the prompts and sampling of bench_throughput.py (imported from it):

- generation tok/s at each batch size, `--new-tokens` new tokens a row: EOS ignored (vLLM's
  `ignore_eos`, through `engine.ignore_eos`) and no stop string (the prompts are plain text), so
  every row writes every token, as the hf engine's rows do with EOS off;
- kept tok/s on the chat prompts that stop at a new "Human:" turn (sampling 0.7 / 0.9, seed 1, up
  to `--new-tokens` tokens): the tokens the rows kept, and the generated-then-discarded ones apart.
  vLLM gets them in one call (its scheduler batches them itself, up to 256 at once).

It runs in a venv with vLLM's CPU build (see tests/test_vllm_real.py for how to make one):

    /work/vllmenv/bin/python benchmarks/bench_vllm_cpu.py --batch-sizes 1,4 --new-tokens 16 --stop-prompts 8
    python benchmarks/bench_throughput.py --vllm-python /work/vllmenv/bin/python   # beside the hf engine

With `--serve`, bench_throughput.py starts it once and asks for one measurement at a time (a JSON
line on stdin, a JSON line back), so that its runs alternate with the hf engine's in the same run.
vLLM's own log goes to stderr. dtype "auto" is the engine's: float32 on a CPU. On the 2-core AMD
EPYC (AVX2, no bf16 hardware) bfloat16 was slower in a loaded smoke run (batch 16: 19 tok/s against
35-39 in float32); `--dtype bfloat16` measures it. vLLM compiles the model with torch.compile by
default (~3 minutes at start on 2 cores, no faster here than `--eager` in that smoke run).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time


def build_engine(args):
    from selfalign.core.engines import make_engine

    t0 = time.perf_counter()
    engine = make_engine("vllm", args.model, dtype=args.dtype, **({"enforce_eager": True} if args.eager else {}))
    startup = time.perf_counter() - t0
    import vllm

    info = {"vllm": vllm.__version__, "dtype": engine.dtype, "eager": args.eager, "startup_s": startup,
            "threads_bind": os.environ.get("VLLM_CPU_OMP_THREADS_BIND", "auto"),
            "reserved_cpus": os.environ.get("VLLM_CPU_NUM_OF_RESERVED_CPU")}
    return engine, info


def measure(engine, request: dict) -> dict:
    """One timed run: {"part": "generate", "batch": B, "new_tokens": N} or {"part": "stopping",
    "prompts": P, "new_tokens": N, "one_by_one": false}; seconds and token counts back."""
    from bench_throughput import bench_sampling, chat_prompts, fixed_prompts

    sampling = bench_sampling(request["new_tokens"])
    if request["part"] == "warmup":
        engine.generate(fixed_prompts(2), sampling.model_copy(update={"max_new_tokens": 4}))
        return {"seconds": 0.0}
    if request["part"] == "generate":
        prompts, engine.ignore_eos = fixed_prompts(request["batch"]), True
    elif request["part"] == "stopping":
        prompts, engine.ignore_eos = chat_prompts(request["prompts"]), False
    else:
        raise ValueError(f"unknown part {request['part']!r}")
    # one vLLM call (its scheduler batches the requests), or with "one_by_one" a call a prompt (batch 1)
    single = request.get("one_by_one", False)
    engine.batch_size = 1 if single else len(prompts)
    t0 = time.perf_counter()
    if single:
        out = [cs for p in prompts for cs in engine.generate([p], sampling)]
    else:
        out = engine.generate(prompts, sampling)
    seconds = time.perf_counter() - t0
    engine.ignore_eos = False
    kept = sum(c.completion_tokens for cs in out for c in cs)
    discarded = sum(c.discarded_tokens for cs in out for c in cs)
    return {"seconds": seconds, "kept": kept, "discarded": discarded, "tokens": kept + discarded,
            "stopped": sum(c.finish_reason == "stop" for cs in out for c in cs)}


def serve(args) -> int:
    """Answer one JSON line per request on stdin; everything else that writes to stdout (vLLM's log,
    its engine processes) goes to stderr."""
    reply = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    engine, info = build_engine(args)
    measure(engine, {"part": "warmup", "new_tokens": 4})
    reply.write(json.dumps({"ready": True, **info}) + "\n")
    for line in sys.stdin:
        request = json.loads(line)
        if request.get("part") == "quit":
            break
        try:
            reply.write(json.dumps(measure(engine, request)) + "\n")
        except Exception as exc:  # reported to the caller, which stops
            reply.write(json.dumps({"error": f"{type(exc).__name__}: {exc}"}) + "\n")
    engine.close()
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="embedded:gemma-3-270m")
    ap.add_argument("--dtype", default="auto", help="auto (the engine's: float32 on a CPU), float32, bfloat16")
    ap.add_argument("--eager", action="store_true", help="enforce_eager: no torch.compile at start")
    ap.add_argument("--serve", action="store_true", help="answer JSON requests on stdin (bench_throughput.py)")
    ap.add_argument("--only", default="generate,stopping")
    ap.add_argument("--batch-sizes", default="1,16,64")
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--stop-prompts", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3, help="runs of each figure at batch <= 16")
    ap.add_argument("--repeats-large", type=int, default=1, help="runs at larger batches and of the stopping prompts")
    ap.add_argument("--json", help="also write the figures to this file")
    args = ap.parse_args(argv)
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    if args.serve:
        return serve(args)

    engine, info = build_engine(args)
    print(f"vLLM {info['vllm']} ({args.model}), {info['dtype']}, {'eager' if args.eager else 'compiled'}, "
          f"started in {info['startup_s']:.0f} s", flush=True)
    measure(engine, {"part": "warmup", "new_tokens": 4})
    results: dict = {"info": info, "generate": {}}
    parts = set(args.only.split(","))
    if "generate" in parts:
        print(f"\ngeneration, {args.new_tokens} new tokens a row, EOS ignored (tok/s, median of the runs)")
        for bs in (int(x) for x in args.batch_sizes.split(",")):
            runs = [measure(engine, {"part": "generate", "batch": bs, "new_tokens": args.new_tokens})
                    for _ in range(args.repeats if bs <= 16 else args.repeats_large)]
            rate = statistics.median(r["tokens"] / r["seconds"] for r in runs)
            results["generate"][bs] = {"vllm": rate, "runs": len(runs)}
            print(f"  batch {bs:>4}: {rate:7.1f}   ({len(runs)} runs)", flush=True)
    if "stopping" in parts:
        runs = [measure(engine, {"part": "stopping", "prompts": args.stop_prompts, "new_tokens": args.new_tokens})
                for _ in range(args.repeats_large)]
        r = runs[-1]
        rate = statistics.median(x["kept"] / x["seconds"] for x in runs)
        results["stopping"] = {"vllm_kept_tok_s": rate, "kept": r["kept"], "discarded": r["discarded"]}
        print(f"\n{args.stop_prompts} chat prompts stopping at a new 'Human:' turn, one call: {rate:.1f} kept tok/s "
              f"({r['kept']} kept, {r['discarded']} generated and discarded, {r['stopped']} stopped)", flush=True)
    engine.close()
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
