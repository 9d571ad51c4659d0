"""The capability battery: what alignment costs (or gains) on tasks that have nothing to do with it.

ALMoST (Kim et al. 2023, sec. 5) reports an "alignment tax" on capability benchmarks (MMLU); the
HHH laboratory (Askell et al. 2021, sec. 2.4) checks that prompting does not hurt other tasks. Here a
small battery of multiple-choice tasks from the same `bigbench==1.0.0` package as HHH and
TruthfulQA is scored before and after alignment, with the likelihood machinery of the HHH eval:
every choice is scored by its summed log-probability as the continuation of the question (zero-shot,
choices not listed in the prompt), the highest wins, and a per-character normalised score sits
beside it (see `evals.hhh` for why characters and why the summed score is the headline).

The tasks were chosen by measuring candidates on the embedded gemma-3-270m base model (zero-shot,
hf engine, fp32, the first 40 items of each: `python -m selfalign.evals.capability TASKDIR...`).
Of 17 small multiple-choice candidates, several sat at chance (anachronisms: 52.5% on a 2-way task);
a task was kept when the base model is clearly above chance on it (the Wilson lower bound of its
accuracy above chance), so that a loss is visible; when it has at most ~100 items, so that the
battery of ~210 items takes a few minutes on two cores; and when it tests a skill the others do not.
`CAPABILITY_WHY` gives, for each, its size, the measured base accuracy and why it is there.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from selfalign.core.engines.base import Engine
from selfalign.core.store import RowStore, row_id
from selfalign.evals.common import score_rows_resumably
from selfalign.evals.data import CAPABILITY_WHY, MCItem, load_capability, task_items  # noqa: F401 (re-exported)

# task folder under bigbench/benchmark_tasks/ -> why it is in the battery (base-model accuracy vs chance)
CAPABILITY_FILES = {name: f"{name}/task.json" for name in CAPABILITY_WHY}


def pick(scores: list[float], choices: tuple[str, ...], norm: bool) -> int:
    """Index of the best-scoring choice (summed, or per character of " " + choice)."""
    vals = [s / max(1, len(" " + c)) for s, c in zip(scores, choices, strict=True)] if norm else scores
    return max(range(len(vals)), key=vals.__getitem__)


def score_items(engine: Engine, items: list[MCItem]) -> list[dict]:
    requests = []
    for it in items:
        ctx = it.context.rstrip(" ")
        gap = "" if ctx.endswith("\n") else " "
        requests.append((ctx, [gap + c.strip() for c in it.choices]))
    scores = engine.score_many(requests)
    return [{"item": it.id, "task": it.task, "scores": s,
             "correct": float(pick(s, it.choices, False) == it.answer),
             "correct_norm": float(pick(s, it.choices, True) == it.answer)}
            for it, s in zip(items, scores, strict=True)]


def evaluate_capability(engine: Engine, items: list[MCItem], folder: str | Path, model_label: str = "") -> dict:
    """Score every item (rows to `folder/capability/rows.jsonl`, resumable); accuracy per task and
    overall (the mean over items), summed and per-character."""
    t0 = time.time()
    store = RowStore(Path(folder) / "capability")
    work = [(row_id("capability", model_label, it.id, it.context, it.choices), it) for it in items]
    rows = score_rows_resumably(store, work, lambda chunk: score_items(engine, chunk), "capability", chunk_size=48)
    store.mark_done()
    tasks = list(dict.fromkeys(it.task for it in items))
    acc, norm, counts = {}, {}, {}
    for task in tasks + ["overall"]:
        mine = [r for r in rows if task == "overall" or r["task"] == task]
        acc[task] = sum(r["correct"] for r in mine) / len(mine)
        norm[task] = sum(r["correct_norm"] for r in mine) / len(mine)
        counts[task] = len(mine)
    chance = {t: sum(1 / len(it.choices) for it in items if it.task == t) / counts[t] for t in tasks}
    return {"eval": "capability", "metrics": {"accuracy": acc, "accuracy_norm": norm}, "counts": counts,
            "chance": chance, "wall_s": round(time.time() - t0, 1)}


def main() -> None:  # pragma: no cover - the measurement behind CAPABILITY_WHY
    """python -m selfalign.evals.capability TASKDIR... : base-model accuracy on candidate tasks."""
    import sys

    from selfalign.core.engines.hf import HFEngine

    engine = HFEngine("embedded:gemma-3-270m", batch_size=16)
    for folder in sys.argv[1:]:
        path = Path(folder) / "task.json"
        task = Path(folder).name
        items = task_items(task, json.loads(path.read_text()), path)[:40]
        t0 = time.time()
        rows = score_items(engine, items)
        chance = sum(1 / len(it.choices) for it in items) / len(items)
        print(json.dumps({"task": folder, "n": len(items), "chance": round(chance, 3),
                          "acc": round(sum(r["correct"] for r in rows) / len(rows), 3),
                          "acc_norm": round(sum(r["correct_norm"] for r in rows) / len(rows), 3),
                          "s": round(time.time() - t0, 1)}), flush=True)


if __name__ == "__main__":
    main()
