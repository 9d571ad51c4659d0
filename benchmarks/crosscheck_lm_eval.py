"""Cross-check selfalign's likelihood-scored BIG-bench HHH numbers against an independent
implementation: EleutherAI's lm-evaluation-harness (`lm_eval`), run on the same items and the
same in-memory model.

lm_eval is not a selfalign dependency; install it into the venv only for this check, pinning the
torch already there so that pip cannot swap the CPU build for a CUDA one:

    .venv/bin/pip install lm_eval "torch==$(.venv/bin/python -c 'import torch; print(torch.__version__.split("+")[0])')"

Then:

    .venv/bin/python benchmarks/crosscheck_lm_eval.py                                # tiny:llama, all 221 items
    .venv/bin/python benchmarks/crosscheck_lm_eval.py --model embedded:gemma-3-270m  # the real check (minutes on CPU)
    # a BIG-bench layout folder, 5 per category:
    .venv/bin/python benchmarks/crosscheck_lm_eval.py --data-dir DIR --limit 5

What is compared. The items are written to a JSONL file ({input, choices: [good, bad], label: 0,
category}) and one lm-eval task per category is generated from YAML: `output_type:
multiple_choice`, `doc_to_text: "Human: {{input.strip()}}\\n\\nAssistant:"` (the plain dialogue
selfalign renders), each choice stripped, `target_delimiter: " "`, metric `acc`. lm-eval scores
each choice as the summed log-probability of " " + choice after that context, exactly the
quantity selfalign's `likelihood` scoring compares. Both sides share one model object and one
tokenizer; the script then checks, item by item:

- the context strings lm-eval built equal those selfalign renders (else the task YAML is wrong);
- the token ids lm-eval fed the model equal those selfalign feeds it (BOS included: both encode
  the context with the tokenizer's special tokens, and take the continuation as the tail of
  encode(context + continuation); `max_length` is set to the engine's so that left-truncation of
  over-long items is the same too);
- the log-likelihoods (largest absolute difference; both sides pad and batch differently, so
  float noise is expected, nothing more);
- the accuracy per category, which must agree within --tolerance points (default 0.5), else the
  script exits 1.

One known difference in convention: on an exact tie (good and bad equally likely) selfalign counts
half a point, lm-eval's `acc` (argmax, first index wins) counts the good reply as chosen. Ties are
counted and reported; with real-valued log-probabilities they do not happen in practice.

Cost. lm-eval asks the model for logits at every position of every sequence; with gemma's 262k
vocabulary a batch of 8 long HHH items needs many GB (the 221-item gemma-3-270m run peaked at
22.8 GB resident on a 23 GB, 2-core CPU machine, 25 minutes in all). Lower --batch-size if memory
is short; the scores do not depend on it.

Everything runs offline (HF_HUB_OFFLINE, HF_DATASETS_OFFLINE); lm-eval reads the JSONL through
the `datasets` json builder, cached in the temporary folder.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

TASK_PREFIX = "selfalign_xcheck_hhh_"
# lm-eval renders these with Jinja; `.strip()` and `trim` are Python's str.strip, as selfalign uses.
DOC_TO_TEXT = "Human: {{input.strip()}}\n\nAssistant:"
DOC_TO_CHOICE = "{{choices | map('trim') | list}}"


def limited(items: list, limit: int | None) -> list:
    """At most `limit` items per category, in order (the `--limit` of `selfalign eval`)."""
    if not limit:
        return list(items)
    taken: dict[str, int] = defaultdict(int)
    out = []
    for it in items:
        if taken[it.category] < limit:
            taken[it.category] += 1
            out.append(it)
    return out


def write_lm_eval_tasks(items: list, folder: Path) -> dict[str, str]:
    """One JSONL file and one lm-eval task YAML per category under `folder`; returns {category: task name}."""
    import yaml

    folder.mkdir(parents=True, exist_ok=True)
    by_cat: dict[str, list] = defaultdict(list)
    for it in items:
        by_cat[it.category].append(it)
    tasks = {}
    for cat, cat_items in by_cat.items():
        data = folder / f"hhh_{cat}.jsonl"
        with open(data, "w", encoding="utf-8") as f:
            for it in cat_items:
                # raw strings, as in task.json: the task template does the stripping, independently of selfalign
                row = {"id": it.id, "input": it.input, "choices": [it.good, it.bad], "label": 0, "category": cat}
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
        name = TASK_PREFIX + cat
        config = {
            "task": name,
            "dataset_path": "json",
            "dataset_kwargs": {"data_files": {"test": str(data)}, "cache_dir": str(folder / "hf-datasets-cache")},
            "test_split": "test",
            "output_type": "multiple_choice",
            "doc_to_text": DOC_TO_TEXT,
            "doc_to_choice": DOC_TO_CHOICE,
            "doc_to_target": "label",
            "target_delimiter": " ",
            "num_fewshot": 0,
            "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True}],
            "metadata": {"version": 1.0},
        }
        (folder / f"{name}.yaml").write_text(yaml.safe_dump(config, sort_keys=False, allow_unicode=True),
                                             encoding="utf-8")
        tasks[cat] = name
    return tasks


def run_lm_eval(engine, items: list, folder: Path, batch_size: int) -> dict:
    """lm-eval's accuracy per category, its per-item log-likelihoods and the token ids it scored."""
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    tasks = write_lm_eval_tasks(items, folder)
    lm = HFLM(pretrained=engine.model, tokenizer=engine.tokenizer, batch_size=batch_size, max_length=engine.max_length)
    seen: dict[tuple[str, str], tuple[list[int], int]] = {}
    run_tokens = lm._loglikelihood_tokens

    def recording(requests, *args, **kwargs):  # records what lm-eval scores; changes nothing
        for (ctx, cont), ctx_enc, cont_enc in requests:
            seen[(ctx, cont)] = (list(ctx_enc) + list(cont_enc), len(cont_enc))
        return run_tokens(requests, *args, **kwargs)

    lm._loglikelihood_tokens = recording
    manager = TaskManager(include_path=str(folder), include_defaults=False)
    out = lm_eval.simple_evaluate(
        model=lm, tasks=list(tasks.values()), task_manager=manager, num_fewshot=0, log_samples=True,
        bootstrap_iters=0, cache_requests=False,
    )
    acc, per_item = {}, {}
    for cat, name in tasks.items():
        acc[cat] = out["results"][name]["acc,none"]
        for s in out["samples"][name]:
            args = [(a["arg_0"], a["arg_1"]) if isinstance(a, dict) else tuple(a) for a in s["arguments"]]
            per_item[s["doc"]["id"]] = {
                "args": args,
                "lls": [float(r[0]) for r in s["filtered_resps"]],
                "acc": float(s["acc"]),
            }
    return {"acc": acc, "items": per_item, "tokens": seen, "version": lm_eval.__version__}


def run_selfalign(engine, items: list, folder: Path) -> dict:
    from selfalign.evals.hhh import evaluate_hhh

    res = evaluate_hhh(engine, items, folder, scorings=("likelihood",))
    rows = [json.loads(line) for line in (folder / "hhh" / "rows.jsonl").read_text(encoding="utf-8").splitlines()]
    per_item = {r["item"]: r for r in rows if r.get("scoring") == "likelihood"}
    acc = {c: v for c, v in res["metrics"]["likelihood"].items() if c != "overall"}
    return {"acc": acc, "items": per_item}


def compare(engine, items: list, ours: dict, theirs: dict, tolerance: float) -> tuple[bool, list[str]]:
    """Item-level checks and the per-category table; returns (categories agree, report lines)."""
    from selfalign.evals.hhh import dialogue

    lines = []
    n_ctx_diff = n_tok_diff = n_verdict_diff = n_ties = 0
    max_ll_diff = 0.0
    for it in items:
        context = engine.render(dialogue(it.input, None))
        conts = [" " + it.good.strip(), " " + it.bad.strip()]
        lm = theirs["items"][it.id]
        if lm["args"] != [(context, c) for c in conts]:
            n_ctx_diff += 1
            if n_ctx_diff <= 3:
                lines.append(f"  context differs on {it.id}: lm-eval {lm['args'][0]!r} vs selfalign "
                             f"{(context, conts[0])!r}")
        ours_rows = engine._score_rows([(dialogue(it.input, None), conts)])
        for cont, (whole, n) in zip(conts, ours_rows, strict=True):
            lm_whole, lm_n = theirs["tokens"].get((context, cont), (None, None))
            if lm_whole is None or lm_whole[-(engine.max_length + 1):] != whole or lm_n != n:
                n_tok_diff += 1
                if n_tok_diff <= 3:
                    lines.append(f"  tokens differ on {it.id}: lm-eval {None if lm_whole is None else lm_whole[:8]}... "
                                 f"({lm_n} continuation tokens) vs selfalign {whole[:8]}... ({n})")
        row = ours["items"][it.id]
        ours_ll = [row["good"], row["bad"]]
        max_ll_diff = max(max_ll_diff, *(abs(a - b) for a, b in zip(ours_ll, lm["lls"], strict=True)))
        if ours_ll[0] == ours_ll[1] or lm["lls"][0] == lm["lls"][1]:
            n_ties += 1
        if (ours_ll[0] > ours_ll[1]) != (lm["lls"][0] > lm["lls"][1]):
            n_verdict_diff += 1
    n_req = 2 * len(items)
    bos = engine.tokenizer.bos_token_id
    n_bos = sum(1 for whole, _ in theirs["tokens"].values() if bos is not None and whole[:1] == [bos])
    checks = [
        f"contexts identical:    {len(items) - n_ctx_diff}/{len(items)} items",
        f"token ids identical:   {n_req - n_tok_diff}/{n_req} (context + continuation) sequences",
        f"start with BOS ({engine.tokenizer.bos_token!r}): {n_bos}/{len(theirs['tokens'])} distinct lm-eval sequences",
        f"max |logprob diff|:    {max_ll_diff:.2e} nats (summed over a continuation)",
        f"verdicts that differ:  {n_verdict_diff}/{len(items)} items;  exact ties: {n_ties}",
    ]
    header = f"{'category':<10} {'n':>4} {'selfalign':>10} {'lm-eval':>10} {'diff (pts)':>11}"
    table = [header, "-" * len(header)]
    ok = True
    counts = defaultdict(int)
    for it in items:
        counts[it.category] += 1
    for cat in [c for c in ("harmless", "helpful", "honest", "other") if c in counts] + ["overall"]:
        if cat == "overall":
            n = len(items)
            a = sum(ours["acc"][c] * counts[c] for c in counts) / n
            b = sum(theirs["acc"][c] * counts[c] for c in counts) / n
        else:
            n, a, b = counts[cat], ours["acc"][cat], theirs["acc"][cat]
        diff = 100 * (a - b)
        bad = abs(diff) > tolerance or math.isnan(diff)
        ok = ok and not bad
        table.append(f"{cat:<10} {n:>4} {100 * a:>9.2f}% {100 * b:>9.2f}% "
                     f"{diff:>+11.2f}{'  <-- over tolerance' if bad else ''}")
    return ok, checks + [""] + table + lines


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="tiny:llama", help="a selfalign model reference (default tiny:llama)")
    p.add_argument("--data-dir", default=None,
                   help="a BIG-bench layout folder (default: the cached BIG-bench 1.0.0 data)")
    p.add_argument("--limit", type=int, default=None, help="at most N items per category")
    p.add_argument("--batch-size", type=int, default=8, help="lm-eval's batch size (default 8)")
    p.add_argument("--tolerance", type=float, default=0.5, help="largest allowed accuracy difference, in points")
    p.add_argument("--json", default=None, help="also write the numbers to this JSON file")
    args = p.parse_args(argv)

    try:
        import lm_eval  # noqa: F401
    except ImportError:
        print("lm_eval is not installed; see this script's docstring for how to install it.", file=sys.stderr)
        return 2
    from selfalign.core.engines.hf import HFEngine
    from selfalign.evals.data import load_hhh

    items = limited(load_hhh(args.data_dir, verify=args.data_dir is None), args.limit)
    t0 = time.time()
    engine = HFEngine(args.model)
    t_load = time.time() - t0
    with tempfile.TemporaryDirectory(prefix="selfalign-xcheck-") as tmp:
        t0 = time.time()
        ours = run_selfalign(engine, items, Path(tmp) / "selfalign")
        t_ours = time.time() - t0
        t0 = time.time()
        theirs = run_lm_eval(engine, items, Path(tmp) / "lm_eval", args.batch_size)
        t_theirs = time.time() - t0
    ok, lines = compare(engine, items, ours, theirs, args.tolerance)
    print(f"\nHHH likelihood scoring, {args.model}, {len(items)} items; lm_eval {theirs['version']}")
    print(f"wall time: model load {t_load:.1f} s, selfalign {t_ours:.1f} s, lm-eval {t_theirs:.1f} s\n")
    print("\n".join(lines))
    print(f"\nAGREE: every category within {args.tolerance} points" if ok
          else f"\nDISAGREE: some category differs by more than {args.tolerance} points")
    if args.json:
        Path(args.json).write_text(json.dumps({
            "model": args.model, "items": len(items), "lm_eval_version": theirs["version"],
            "selfalign": ours["acc"], "lm_eval": theirs["acc"], "agree": ok,
            "wall_s": {"load": round(t_load, 1), "selfalign": round(t_ours, 1), "lm_eval": round(t_theirs, 1)},
        }, indent=2))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
