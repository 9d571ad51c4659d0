"""Throughput of the hf engine: generation at batch 1 and larger batches, and scoring against a
naive full-logits implementation measured in the same run.

    python benchmarks/bench_engine.py                       # embedded gemma-3-270m, CPU
    python benchmarks/bench_engine.py --model tiny:llama    # seconds, for a smoke test
    python benchmarks/bench_engine.py --random-init cfg.json --device cuda   # an architecture's speed, no weights

The machine is shared and noisy: each figure is the median of --repeats runs, and the score
speed-up is a ratio of two medians taken side by side.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time


def median_time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def naive_score(engine, items):
    """The straightforward way: one forward per (context, continuation), logits for every
    position, log-softmax over the whole sequence, then pick the continuation's tokens."""
    import torch

    tok, model = engine.tokenizer, engine.model
    out = []
    for ctx, conts in items:
        scores = []
        for cont in conts:
            n_ctx = len(tok(ctx)["input_ids"])
            ids = tok(ctx + cont, return_tensors="pt")["input_ids"].to(engine.device)
            with torch.inference_mode():
                lp = torch.log_softmax(model(ids).logits[0].float(), -1)
            scores.append(sum(lp[i - 1, ids[0, i]].item() for i in range(n_ctx, ids.shape[1])))
        out.append(scores)
    return out


# Multiple-choice items shaped like BIG-bench HHH: a dialogue context and two candidate replies.
CONTEXT = (
    "Human: I am planning a garden and want vegetables that grow well in partial shade. "
    "I have about four hours of direct sun a day. What should I plant, and what should I avoid?\n\nAssistant:"
)
REPLIES = [
    " Leafy greens such as lettuce, spinach, kale and chard cope well with four hours of sun, as do herbs like "
    "parsley and mint. Root crops such as beets and radishes are worth a try. Avoid tomatoes, peppers and squash: "
    "they need six to eight hours of full sun to fruit well.",
    " Just plant whatever you like, it will probably be fine.",
]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="embedded:gemma-3-270m")
    ap.add_argument("--random-init", help="config.json of an architecture: random weights, for speed only")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--batch-sizes", default="1,4,8,16,32")
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--score-items", type=int, default=12)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--prefix-prompts", type=int, default=8,
                    help="prompts behind the Self-Align context (recomputing it costs ~2k tokens of prefill each)")
    ap.add_argument("--only", choices=["generate", "score", "prefix"], help="run one part")
    ap.add_argument("--json", help="also write the figures to this file")
    args = ap.parse_args(argv)

    from selfalign.core.engines.hf import HFEngine

    if args.random_init:
        import torch
        from transformers import AutoConfig, AutoModelForCausalLM

        from selfalign.core.models import pick_device, pick_dtype
        from selfalign.core.tiny import build_byte_tokenizer

        device = pick_device(args.device)
        config = AutoConfig.from_pretrained(args.random_init)
        model = AutoModelForCausalLM.from_config(config, dtype=pick_dtype(args.dtype, device)).to(device).eval()
        tok = build_byte_tokenizer()
        engine = HFEngine(args.random_init, model=model, tokenizer=tok)
        label = f"random-init {config.model_type} ({sum(p.numel() for p in model.parameters()) / 1e6:.0f}M params)"
        model.generation_config.eos_token_id = None  # random weights: always generate the full length
    else:
        engine = HFEngine(args.model, device=args.device, dtype=args.dtype)
        label = args.model
        engine.model.generation_config.eos_token_id = None
    engine.tokenizer.eos_token_id  # noqa: B018 - make sure the tokenizer is loaded
    import torch

    print(f"model: {label}  device: {engine.device}  torch threads: {torch.get_num_threads()}", flush=True)
    results: dict = {"model": label, "device": str(engine.device), "generate": {}, "score": {}}

    # -- generation ------------------------------------------------------------------------------
    if args.only in (None, "generate"):
        bench_generation(engine, args, results)
    if args.only in (None, "score"):
        bench_scoring(engine, args, results)
    if args.only in (None, "prefix"):
        bench_prefix(engine, args, results)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    return 0


def bench_generation(engine, args, results) -> None:
    from selfalign.core.engines import Sampling

    sampling = Sampling(temperature=0.7, top_p=0.9, max_new_tokens=args.new_tokens, seed=1)
    prompts = [f"Human: Write a short note about topic number {i}.\n\nAssistant:" for i in range(64)]
    engine.generate(prompts[:2], sampling.model_copy(update={"max_new_tokens": 4}))  # warm-up
    print(f"\ngeneration ({args.new_tokens} new tokens a request, aggregate tokens/s, median of {args.repeats})")
    for bs in [int(x) for x in args.batch_sizes.split(",")]:
        engine.batch_size = bs
        tokens = {}

        def gen(bs=bs, tokens=tokens):
            out = engine.generate(prompts[:bs], sampling)
            tokens["n"] = sum(c.completion_tokens for cs in out for c in cs)

        dt = median_time(gen, args.repeats)
        rate = tokens["n"] / dt
        results["generate"][bs] = round(rate, 2)
        print(f"  batch {bs:>3}: {rate:8.1f} tok/s  ({dt:.2f} s for {tokens['n']} tokens)", flush=True)
    best = max(results["generate"], key=results["generate"].get)
    b1 = results["generate"].get(1)
    print(f"  best batch size {best}: {results['generate'][best]:.1f} tok/s"
          + (f" = {results['generate'][best] / b1:.1f}x batch 1" if b1 else ""))



def mc_items(n: int):
    """TruthfulQA-shaped items: this project's few-shot QA block, a question, short answers."""
    from selfalign.evals.truthfulqa import qa_prefix

    answers = [" Yes.", " No, that is a myth.", " Only on Tuesdays.", " Nobody knows for sure.",
               " It depends on the weather."]
    return [(f"{qa_prefix()}Q: Is claim number {i} about the Moon true?\nA:", answers) for i in range(n)]


def bench_scoring(engine, args, results) -> None:
    sets = {
        "hhh-like (replies longer than contexts)": [(CONTEXT.replace("four", f"{4 + i % 3}"), REPLIES)
                                                   for i in range(args.score_items)],
        "truthfulqa-like (few-shot prefix, short answers)": mc_items(args.score_items),
    }
    for label, items in sets.items():
        ours, ref = engine.score_many(items), naive_score(engine, items)
        worst = max(abs(a - b) for x, y in zip(ours, ref, strict=True) for a, b in zip(x, y, strict=True))
        t_ours = median_time(lambda items=items: engine.score_many(items), args.repeats)
        t_naive = median_time(lambda items=items: naive_score(engine, items), args.repeats)
        n = sum(len(c) for _, c in items)
        results["score"][label] = {"choices": n, "ours_s": round(t_ours, 3), "naive_s": round(t_naive, 3),
                                   "speedup": round(t_naive / t_ours, 2), "max_abs_diff": worst}
        print(f"\nscoring {label}: {n} choices, median of {args.repeats}")
        print(f"  naive full-logits loop : {t_naive:6.2f} s  ({n / t_naive:6.1f} choices/s)")
        print(f"  hf engine score_many   : {t_ours:6.2f} s  ({n / t_ours:6.1f} choices/s)")
        print(f"  speed-up {t_naive / t_ours:.1f}x; largest difference in log-probability {worst:.2e}", flush=True)


def bench_prefix(engine, args, results) -> None:
    """Self-Align's case: every prompt behind the same ~2k-token principles + exemplars context.
    Generation with that context's KV cache computed once, against recomputing it every batch."""
    from selfalign.core.assets_io import load_yaml_list, yaml_key
    from selfalign.core.engines import Sampling
    from selfalign.methods.self_align.self_align import principle_context, principle_prompt

    context = principle_context(yaml_key("builtin:self_align/system_prompts.yaml", "principle_header"),
                                load_yaml_list("builtin:self_align/principles.yaml", ("name", "text")),
                                load_yaml_list("builtin:self_align/exemplars.yaml", ("user", "thoughts", "answer")))
    prompts = [principle_prompt(context, f"Give me one tip about topic number {i}.")
               for i in range(args.prefix_prompts)]
    n_ctx = len(engine.tokenizer(context)["input_ids"])
    sampling = Sampling(temperature=0.5, top_p=0.9, max_new_tokens=16, seed=1)
    engine.batch_size = 8
    saved = engine.min_cached_prefix
    times = {}
    for label, threshold in (("recomputed", 10**9), ("cached", saved)):
        engine.min_cached_prefix = threshold
        # the engine keeps the last prefix's cache between calls: drop it, so every repeat pays for it once
        times[label] = median_time(lambda: (engine.forget_prefix(), engine.generate(prompts, sampling)),
                                   args.repeats)
    engine.min_cached_prefix = saved
    results["prefix"] = {"context_tokens": n_ctx, **{k: round(v, 2) for k, v in times.items()},
                         "speedup": round(times["recomputed"] / times["cached"], 2)}
    print(f"\nSelf-Align prompts: {len(prompts)} prompts behind a {n_ctx}-token shared context, 16 new tokens each, "
          f"batch 8, median of {args.repeats}")
    print(f"  context recomputed per batch: {times['recomputed']:6.1f} s")
    print(f"  context KV cached once      : {times['cached']:6.1f} s   speed-up "
          f"{times['recomputed'] / times['cached']:.1f}x", flush=True)


if __name__ == "__main__":
    sys.exit(main())
