"""Issue #11's figures, each as a ratio against its anchor measured in the same run:

- generation tok/s at batch 1 / 16 / 64, fixed length (EOS off, no stop): the `hf` engine against
  the plain path it replaced (`model.generate` on the same padded batches, batch-wide stop, one
  random stream a batch);
- kept tokens/s on chat prompts that stop at a new "Human:" turn: the same two, plus the generated
  but discarded tokens;
- a breakdown of the generation steps at batch 64: body, head, sampling, cache, Python;
- full-set BIG-bench HHH likelihood scoring: `score_many` against a plain loop (one forward per
  reply at batch 1, output layer only at the reply's positions), with the verdicts compared;
- LoRA SFT tokens/s (`sft_train`, what `engrave` runs) against a raw PEFT loop on the same batches,
  and against `sft_train` with the output layer on every position (the code before this issue).

    python benchmarks/bench_throughput.py                      # everything, embedded gemma-3-270m
    python benchmarks/bench_throughput.py --only generate,hhh  # some parts
    python benchmarks/bench_throughput.py --model tiny:llama --hhh-items 8 --train-steps 2   # smoke test

The machine is shared: every ratio compares two figures taken side by side, the two runs alternated
(ours, anchor, ours, anchor, ...) so that a change in the machine's load hits both; medians of
--repeats for the cheap parts (batch sizes up to 16) and of --repeats-large for the rest. The load
average is printed at the start and the end. vLLM's CPU build is not measured here (it needs its own
venv; see DESIGN.md and issue #11).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time


def paired(ours, anchor, repeats: int):
    """((median seconds, last result) of `ours`, the same of `anchor`), the runs alternated so that
    both see the same machine when its load changes."""
    times: tuple[list, list] = ([], [])
    results = [None, None]
    for _ in range(repeats):
        for k, fn in enumerate((ours, anchor)):
            t0 = time.perf_counter()
            results[k] = fn()
            times[k].append(time.perf_counter() - t0)
    return (statistics.median(times[0]), results[0]), (statistics.median(times[1]), results[1])


def load_line() -> str:
    import os

    one, five, fifteen = os.getloadavg()
    return f"load average {one:.2f}, {five:.2f}, {fifteen:.2f} on {os.cpu_count()} CPUs"


# -- the anchors ----------------------------------------------------------------------------------
def plain_generate(engine, requests, sampling):
    """The engine's generation before this issue: `model.generate` on each padded batch, which runs
    until its longest row is done (a stop string ends a row only when every row has met one).
    Returns (kept tokens, generated tokens)."""
    import torch
    from transformers import LogitsProcessorList

    from selfalign.core.chat import truncate_at_stop
    from selfalign.core.engines.decode import kept_token_count
    from selfalign.core.engines.sampling import TemperatureTopP

    prompts = [engine.render(r) for r in requests]
    encoded = [engine._encode(p) for p in prompts]
    stops = engine.stops_for(requests[0], sampling)
    order = sorted(range(len(prompts)), key=lambda i: -len(encoded[i]))
    eos = engine.model.generation_config.eos_token_id
    eos = set(eos if isinstance(eos, list) else [eos]) - {None}
    kept = generated = 0
    for at in range(0, len(order), engine.batch_size):
        batch = order[at: at + engine.batch_size]
        ids, mask = engine._left_pad([encoded[i] for i in batch])
        kwargs = dict(max_new_tokens=sampling.max_new_tokens, pad_token_id=engine.tokenizer.pad_token_id,
                      do_sample=True,
                      temperature=1.0, top_p=1.0, top_k=0,
                      logits_processor=LogitsProcessorList([TemperatureTopP(sampling.temperature, sampling.top_p)]))
        if stops:
            kwargs.update(stop_strings=stops, tokenizer=engine.tokenizer)
        torch.manual_seed(sampling.seed + at)
        with torch.inference_mode():
            out = engine.model.generate(input_ids=ids, attention_mask=mask, **kwargs)
        for toks in out[:, ids.shape[1]:].tolist():
            generated += len(toks)
            end = next((k for k, t in enumerate(toks) if t in eos), len(toks))
            text, _ = truncate_at_stop(engine.tokenizer.decode(toks[:end], skip_special_tokens=True), stops)
            kept += kept_token_count(engine.tokenizer, toks[:end], text)
    return kept, generated


def plain_score_loop(engine, items):
    """One forward per (context, reply) at batch 1, the output layer only at the reply's positions."""
    import torch

    from selfalign.core.engines.base import score_token_rows

    head, body = engine._head(), engine.model.get_decoder()
    out = []
    for item in items:
        scores = []
        for whole, n in score_token_rows(engine, [item], None):
            with torch.inference_mode():
                h = body(input_ids=torch.tensor([whole[:-1]], device=engine.device)).last_hidden_state[0, -n:]
                logits = head(h)
                tgt = torch.tensor(whole[-n:], device=engine.device)
                scores.append(float((logits.gather(-1, tgt[:, None]).squeeze(-1) - logits.logsumexp(-1)).sum()))
        out.append(scores)
    return out


# -- the parts ------------------------------------------------------------------------------------
def chat_prompts(n: int):
    topics = ["a garden in partial shade", "learning to juggle", "a slow laptop", "baking bread", "a first 10k run",
              "writing a cover letter", "saving for a bicycle", "keeping basil alive"]
    return [[{"role": "user", "content": f"Give me advice about {topics[i % len(topics)]} (question {i})."}]
            for i in range(n)]


def bench_generate(engine, args, results) -> None:
    from selfalign.core.engines import Sampling

    fixed = Sampling(temperature=0.7, top_p=0.9, max_new_tokens=args.new_tokens, seed=1)
    prompts = [f"Human: Write a short note about topic number {i}.\n\nAssistant:" for i in range(64)]
    eos = engine.model.generation_config.eos_token_id
    engine.model.generation_config.eos_token_id = None  # fixed length: every row writes every token
    engine.generate(prompts[:2], fixed.model_copy(update={"max_new_tokens": 4}))  # warm-up
    print(f"\ngeneration, {args.new_tokens} new tokens a row, EOS off (tok/s, median of the runs shown)")
    print("  batch   runs   hf engine   plain generate   ratio")
    table = {}
    for bs in args.batch_sizes:
        engine.batch_size = bs
        runs = args.repeats if bs <= 16 else args.repeats_large
        (t_ours, out), (t_plain, (_, n_plain)) = paired(lambda bs=bs: engine.generate(prompts[:bs], fixed),
                                                        lambda bs=bs: plain_generate(engine, prompts[:bs], fixed), runs)
        n = sum(c.completion_tokens for cs in out for c in cs)
        table[bs] = {"hf": n / t_ours, "plain": n_plain / t_plain, "runs": runs}
        print(f"  {bs:>5}   {runs:>4}   {n / t_ours:9.1f}   {n_plain / t_plain:14.1f}   "
              f"{n / t_ours / (n_plain / t_plain):5.2f}x",
              flush=True)
        if bs == max(args.batch_sizes):
            results["profile"] = profile_lines(engine.last_profile, bs)  # the last timed run's steps
    engine.model.generation_config.eos_token_id = eos
    results["generate"] = table


def bench_stopping(engine, args, results) -> None:
    from selfalign.core.engines import Sampling

    chats = chat_prompts(args.stop_prompts)
    stopping = Sampling(temperature=0.7, top_p=0.9, max_new_tokens=args.new_tokens, seed=1)
    engine.batch_size = max(args.batch_sizes)
    engine.generate(chats[:2], stopping.model_copy(update={"max_new_tokens": 4}))  # warm-up, if generate did not run
    (t_ours, out), (t_plain, (kept_plain, gen_plain)) = paired(lambda: engine.generate(chats, stopping),
                                                               lambda: plain_generate(engine, chats, stopping),
                                                               args.repeats_large)
    kept = sum(c.completion_tokens for cs in out for c in cs)
    waste = sum(c.discarded_tokens for cs in out for c in cs)
    results["stopping"] = {"hf_kept_tok_s": kept / t_ours, "plain_kept_tok_s": kept_plain / t_plain,
                           "hf_discarded": waste, "plain_generated": gen_plain, "plain_kept": kept_plain}
    print(f"\n{len(chats)} chat prompts stopping at a new 'Human:' turn, batch {engine.batch_size}, "
          f"up to {args.new_tokens} tokens (kept tok/s, median of {args.repeats_large})")
    print(f"  hf engine      : {kept / t_ours:7.1f}  ({kept} kept, {waste} generated and discarded)")
    print(f"  plain generate : {kept_plain / t_plain:7.1f}  ({kept_plain} kept of {gen_plain} generated)")
    print(f"  ratio {kept / t_ours / (kept_plain / t_plain):.2f}x", flush=True)


def profile_lines(prof, batch: int) -> dict:
    parts = {k: v for k, v in prof.as_dict().items() if k in ("body", "head", "sampling", "cache", "python")}
    total = sum(parts.values())
    print(f"\n  where a generation step's time goes at batch {batch} ({prof.steps} steps, "
          f"{total / max(prof.steps, 1) * 1000:.0f} ms a step):")
    for k, v in parts.items():
        print(f"    {k:<9} {v / max(prof.steps, 1) * 1000:7.1f} ms  {v / total:6.1%}")
    print("    (body includes the KV cache's growth; cache is dropping finished rows)")
    return {k: v / max(prof.steps, 1) for k, v in parts.items()}


def bench_hhh(engine, args, results) -> None:
    from selfalign.evals.data import load_hhh
    from selfalign.evals.hhh import dialogue

    items = load_hhh()[: args.hhh_items]
    pairs = [(dialogue(it.input, None), [" " + it.good.strip(), " " + it.bad.strip()]) for it in items]
    engine.forget_prefix()
    def ours():
        engine.forget_prefix()  # each run pays for its own shared-prefix cache, if any
        return engine.score_many(pairs)

    (t_ours, got), (t_plain, ref) = paired(ours, lambda: plain_score_loop(engine, pairs), args.repeats_large)
    agree = sum((g[0] > g[1]) == (r[0] > r[1]) for g, r in zip(got, ref, strict=True))
    worst = max(abs(a - b) for g, r in zip(got, ref, strict=True) for a, b in zip(g, r, strict=True))
    results["hhh"] = {"items": len(items), "hf_s": t_ours, "plain_s": t_plain, "ratio": t_ours / t_plain,
                      "verdicts_agree": agree, "max_abs_diff": worst}
    print(f"\nHHH likelihood, {len(items)} items (seconds, median of {args.repeats_large})")
    print(f"  plain loop (batch 1, head at reply positions): {t_plain:7.1f}")
    print(f"  hf engine score_many                         : {t_ours:7.1f}   = {t_ours / t_plain:.2f}x the loop's time")
    print(f"  verdicts agree on {agree}/{len(items)} items; largest log-probability difference {worst:.1e}", flush=True)


def training_examples(n: int) -> list[dict]:
    """Prompt/completion pairs shaped like engrave's: a short system prompt, a question, a long answer."""
    from selfalign.core.chat import render_plain

    answer = (" Start small: pick two or three things you can keep up every day, write them down, and check them "
              "off in the evening. After a week, look at what slipped and why, and adjust the plan rather than your "
              "expectations. Most habits fail from too much ambition at the start, not too little.")
    out = []
    for i, chat in enumerate(chat_prompts(n)):
        prompt = render_plain([{"role": "system", "content": "You are a helpful, honest assistant."}] + chat)
        out.append({"prompt": prompt, "completion": answer[: 120 + 40 * (i % 5)] + "</s>"})
    return out


def raw_peft_loop(base: str, rows: list[dict], batch_size: int, steps: int, lr: float) -> tuple[float, int]:
    """Seconds and non-padding tokens for `steps` optimizer steps of a plain PEFT LoRA loop."""
    import torch
    from peft import get_peft_model

    from selfalign.core.training import TrainSettings, load_for_training

    settings = TrainSettings()  # engrave's LoRA: r 16, alpha 16, dropout 0.05 on q/k/v/o
    model, tok = load_for_training(base, settings)
    model = get_peft_model(model, settings.peft_config("CAUSAL_LM"))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    tokens, t0 = 0, time.perf_counter()
    for step in range(steps):
        batch = [rows[(step * batch_size + k) % len(rows)] for k in range(batch_size)]
        width = max(len(r["input_ids"]) for r in batch)
        ids = torch.tensor([r["input_ids"] + [pad] * (width - len(r["input_ids"])) for r in batch])
        labels = torch.tensor([r["labels"] + [-100] * (width - len(r["labels"])) for r in batch])
        mask = torch.tensor([[1] * len(r["input_ids"]) + [0] * (width - len(r["input_ids"])) for r in batch])
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        tokens += int(mask.sum())
    return time.perf_counter() - t0, tokens


def bench_train(args, results) -> None:
    import contextlib
    import tempfile
    from pathlib import Path

    import selfalign.core.training as training
    from selfalign.core.models import load_tokenizer, resolve

    examples = training_examples(args.train_steps * 4)
    tok = load_tokenizer(resolve(args.model))
    rows, _ = training.tokenize_examples(tok, examples, 512)
    figures = {}

    def sft(label):
        with tempfile.TemporaryDirectory() as tmp:
            settings = training.TrainSettings(lr=4e-4, epochs=1, max_length=512, batch_size=4,
                                              max_steps=args.train_steps)
            training.sft_train(args.model, examples, Path(tmp), settings, seed=0)
            state = json.loads((Path(tmp) / training.STATE_FILE).read_text())
        runtime = next(x["train_runtime"] for x in state["log_history"] if "train_runtime" in x)
        figures[label] = state["num_input_tokens_seen"] / runtime

    sft("sft_train")
    saved = training.head_at_label_positions
    training.head_at_label_positions = contextlib.nullcontext  # the output layer on every position, as before
    try:
        sft("sft_train, head on every position")
    finally:
        training.head_at_label_positions = saved
    seconds, tokens = raw_peft_loop(args.model, rows, 4, args.train_steps, 4e-4)
    figures["raw PEFT loop"] = tokens / seconds
    results["train"] = figures
    ours = figures["sft_train"]
    print(f"\nLoRA SFT (engrave's settings), {args.train_steps} steps of 4 examples (non-padding tokens/s)")
    for label, rate in figures.items():
        print(f"  {label:<36}: {rate:6.1f}   ours = {ours / rate:.2f}x", flush=True)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="embedded:gemma-3-270m")
    ap.add_argument("--only", default="generate,stopping,hhh,train",
                    help="comma-separated parts: generate (fixed length), stopping (kept tok/s), hhh, train")
    ap.add_argument("--batch-sizes", default="1,16,64")
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--stop-prompts", type=int, default=128)
    ap.add_argument("--hhh-items", type=int, default=221)
    ap.add_argument("--train-steps", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=3, help="runs of each cheap figure (generation at batch <= 16)")
    ap.add_argument("--repeats-large", type=int, default=1,
                    help="runs of each expensive figure (larger batches, stopping prompts, HHH)")
    ap.add_argument("--json", help="also write the figures to this file")
    args = ap.parse_args(argv)
    args.batch_sizes = [int(x) for x in args.batch_sizes.split(",")]
    parts = set(args.only.split(","))

    import torch

    from selfalign.core.engines.hf import HFEngine

    print(f"model: {args.model}  torch threads: {torch.get_num_threads()}  {load_line()}", flush=True)
    results: dict = {"model": args.model}
    if parts & {"generate", "stopping", "hhh"}:
        engine = HFEngine(args.model)
        if "generate" in parts:
            bench_generate(engine, args, results)
        if "stopping" in parts:
            bench_stopping(engine, args, results)
        if "hhh" in parts:
            bench_hhh(engine, args, results)
        engine.close()
    if "train" in parts:
        bench_train(args, results)
    print(f"\nat the end: {load_line()}")
    results["load_end"] = load_line()
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
