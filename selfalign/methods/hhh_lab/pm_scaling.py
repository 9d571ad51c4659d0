"""`pm_scaling`: preference-model accuracy against the number of training comparisons, one line per
objective (Askell et al. 2021).

The paper compares three ways of learning from the same comparisons (imitation of the better
sample, binary good/bad discrimination, ranked preference modelling) by their held-out accuracy as
the amount of data grows, and measures the sample efficiency of preference-model pre-training
(PMP) the same way: accuracy against the number of fine-tuning comparisons, with and without PMP.
This stage trains one model per (objective, n) on the first n comparisons of a seeded shuffle of
the data (so every larger set holds the smaller ones), scores a held-out set, and plots the curves:

    - stage: pm_scaling
      data: "@compare"                  # comparison rows: an earlier stage or a JSONL / StackExchange file
      heldout: hhh                      # the 221 BIG-bench HHH pairs; or a fraction (0.1); or a file/stage
      objectives: [ranked, binary, imitation]
      sizes: [256, 1024, 4096, 16384]
      init: "@pmp"                      # optional: ranked models also start from the PMP'd model (dashed lines)

The objectives (`selfalign.methods.hhh_lab.pm_objectives`): `ranked`, a scalar head with the Bradley–Terry loss
(TRL's `RewardTrainer`); `binary`, the same head trained with cross-entropy on single replies
labelled good/bad; `imitation`, the language model fine-tuned on the chosen reply only, judging a
pair by the replies' mean log-probability. A held-out pair counts as right when the chosen reply
scores higher (half on a tie). With `heldout: hhh`, a pair is an HHH item's query (the user turn)
with its good reply chosen and its bad reply rejected, the reading of `eval`'s `rm` scoring; the
accuracy is also kept per category.

With `init`, the objectives in `init_objectives` (default: ranked, the paper's PMP fine-tuning) are
trained a second time starting from `init` (a reward model: `@pmp`, a folder); those are the "with
PMP" curves, drawn dashed beside the plain ones (`without_init: false` skips the plain ones).

Defaults: training settings are the `reward_model` stage's (ALMoST's reward model: full
fine-tuning, lr 2e-5, weight decay 0.1, 1 epoch, 1024 tokens, cosine, 3% warmup), for every
objective; the sizes (powers of 4 from 256) are this project's choice, not the paper's grid.
Sizes larger than the data are cut to all of it. Unless the held-out set is a fraction
of the data, only the first max(sizes) pairs of `data` are read (a StackExchange dump is large).

Output: `rows.jsonl`, one row per (objective, n, init) written as soon as that model is scored;
a rerun skips every finished point and retrains only the unfinished one. Each model is trained in
`points/<objective>-<n>[-init]/` and deleted once scored unless `keep_models: true` (a large sweep
would fill the disk). `heldout.jsonl` holds the held-out pairs.

Simplifications: one seed per point (no error bars); the held-out split of `heldout: <fraction>`
is by whole prompts; imitation always starts from the stage's model (a reward model has no LM head).
"""

from __future__ import annotations

import json
import random
import shutil
import time
from collections import defaultdict
from pathlib import Path
from types import SimpleNamespace
from typing import Literal

from pydantic import Field, field_validator

from selfalign.core.errors import SelfAlignError
from selfalign.core.progress import console
from selfalign.core.reward_training import RewardTrainingStage
from selfalign.core.store import RowStore, row_id
from selfalign.methods.hhh_lab.pm_objectives import OBJECTIVES
from selfalign.methods.hhh_lab.pmp_data import load_corpus, source_path

Objective = Literal["ranked", "binary", "imitation"]


class Config(RewardTrainingStage):
    stage: str = "pm_scaling"
    data: str = Field(..., description="training comparisons: an earlier stage (@compare), a JSONL of prompt/chosen/"
                                       "rejected, or a StackExchange file")
    format: Literal["auto", "stackexchange", "pairs"] = Field("auto", description="layout of `data` (see `pmp`)")
    heldout: float | str = Field("hhh", description="hhh (BIG-bench HHH pairs), a fraction of the data's prompts, "
                                                    "or a file / earlier stage of held-out pairs")
    data_dir: str | None = Field(None, description="heldout hhh: folder with hhh_alignment/ (default: fetched once)")
    heldout_limit: int | None = Field(None, ge=1, description="at most N held-out pairs (hhh: N per category)")
    objectives: list[Objective] = Field(default_factory=lambda: list(OBJECTIVES), min_length=1,
                                        description="which objectives to train")
    sizes: list[int] = Field(default_factory=lambda: [256, 1024, 4096, 16384], min_length=1,
                             description="numbers of training comparisons (not published; powers of 4)")
    init: str | None = Field(None, description="a PMP'd reward model (@pmp or a folder) to fine-tune from as well")
    init_objectives: list[Literal["ranked", "binary"]] = Field(
        default_factory=lambda: ["ranked"], description="objectives also trained from `init` (scalar-head ones)")
    without_init: bool = Field(True, description="with init: also train every objective from the stage's model")
    keep_models: bool = Field(False, description="keep every trained model (default: deleted once scored)")

    @field_validator("heldout")
    @classmethod
    def _check_heldout(cls, value):
        if isinstance(value, float) and not 0 < value < 1:
            raise ValueError("a held-out fraction must be between 0 and 1")
        if isinstance(value, str) and not value.strip():
            raise ValueError("heldout: give hhh, a fraction, or a file / stage")
        return value

    @field_validator("sizes")
    @classmethod
    def _check_sizes(cls, value: list[int]) -> list[int]:
        if any(n < 1 for n in value):
            raise ValueError("sizes must be positive numbers of comparisons")
        return sorted(set(value))


def hhh_pairs(data_dir: str | None, limit: int | None) -> list[dict]:
    """BIG-bench HHH items as comparison pairs: the query as the user turn, good reply chosen."""

    from selfalign.evals import data
    from selfalign.evals.hhh import dialogue
    from selfalign.evals.stage import limited

    items = data.load_hhh(data_dir, verify=data.should_verify(data_dir))
    items = limited(items, limit, key=lambda it: it.category)
    return [{"prompt": dialogue(it.input, None), "chosen": it.good.strip(), "rejected": it.bad.strip(),
             "category": it.category, "item": it.id} for it in items]


def split_data(ctx, config: Config, pairs: list[dict]) -> tuple[list[dict], list[dict], str]:
    """(training pool, held-out pairs, a label of the held-out set)."""
    from selfalign.core.reward_training import split_by_prompt

    held = config.heldout
    if isinstance(held, float):
        train, heldout = split_by_prompt(pairs, held, ctx.recipe.seed)
        label = f"{held:g} of the data's prompts"
    elif held.strip().lower() == "hhh":
        train, heldout, label = pairs, hhh_pairs(config.data_dir, config.heldout_limit), "BIG-bench HHH"
    else:
        source = source_path(ctx, held)
        heldout, _ = load_corpus(source, "auto")
        train, label = pairs, str(source)
    if config.heldout_limit and held != "hhh":
        heldout = heldout[: config.heldout_limit]
    if not heldout:
        raise SelfAlignError(f"heldout: {held!r} gives no held-out pairs", "use hhh, a larger fraction, or a file")
    return train, heldout, label


def point_key(objective: str, n: int, init: str | None) -> str:
    return f"{objective}-{n}" + ("-init" if init else "")


def plan_points(config: Config, sizes: list[int]) -> list[tuple[str, int, str | None]]:
    """(objective, n, init) in the order they are trained: every objective at the smallest n first."""
    points = []
    for n in sizes:
        for objective in config.objectives:
            with_init = config.init is not None and objective in config.init_objectives
            if config.without_init or not with_init:
                points.append((objective, n, None))
            if with_init:
                points.append((objective, n, config.init))
    return points


def category_accuracy(pairs: list[dict], verdicts: list[float]) -> dict[str, float]:
    by_cat: dict[str, list[float]] = defaultdict(list)
    for p, v in zip(pairs, verdicts, strict=True):
        if p.get("category"):
            by_cat[p["category"]].append(v)
    return {c: round(sum(v) / len(v), 4) for c, v in by_cat.items()}


def run(ctx, config: Config, folder) -> dict:
    from selfalign.methods.hhh_lab.pm_objectives import pair_accuracy, train_pm

    folder = Path(folder)
    base = ctx.model_for(config)
    init_model = ctx.model_for(SimpleNamespace(model=config.init)) if config.init else None
    source = source_path(ctx, config.data)
    # with the held-out set from elsewhere, only the largest size's worth of the corpus is read (a dump can be huge)
    enough = None if isinstance(config.heldout, float) else max(config.sizes)
    pairs, stats = load_corpus(source, config.format, max_pairs=enough, seed=ctx.recipe.seed)
    if not pairs:
        raise SelfAlignError(f"data: {source} holds no usable comparison pairs ({stats})")
    train, heldout, held_label = split_data(ctx, config, pairs)
    pool = list(train)
    random.Random(ctx.recipe.seed).shuffle(pool)
    if cap := ctx.max_prompts(None):
        pool = pool[:cap]
    sizes = sorted({min(n, len(pool)) for n in config.sizes})
    if sizes != config.sizes:
        console.print(f"  note: {len(pool)} training pairs available; sizes {config.sizes} become {sizes}")
    store = RowStore(folder)
    (folder / "heldout.jsonl").write_text("".join(json.dumps(p, ensure_ascii=False) + "\n" for p in heldout),
                                          encoding="utf-8")
    shown = {**config.train.model_dump(), "seed": ctx.recipe.seed}
    points = plan_points(config, sizes)
    console.print(f"  {len(pool)} training pairs from {source}, {len(heldout)} held out ({held_label}); "
                  f"{len(points)} points")
    for objective, n, init in points:
        rid = row_id("pm_scaling", objective, n, init, ctx.recipe.seed, str(config.heldout), config.heldout_limit)
        if rid in store:
            continue
        t0 = time.time()
        start = init_model if init else base
        out = folder / "points" / point_key(objective, n, init)
        shutil.rmtree(out, ignore_errors=True)  # what a killed run left half-trained
        console.print(f"  [bold]{objective}[/], n = {n}" + (f", from {init}" if init else ""))
        ctx.free_accelerator()
        result = train_pm(objective, start, pool[:n], out, config.train, ctx.recipe.seed)
        acc = pair_accuracy(objective, result["model"], heldout, batch_size=max(8, config.train.batch_size),
                            max_length=config.train.max_length)
        row = {"id": rid, "objective": objective, "n": n, "init": init, "accuracy": acc["accuracy"],
               "ties": acc["ties"], "mean_margin": acc["mean_margin"], "heldout_pairs": len(heldout),
               "by_category": category_accuracy(heldout, acc["verdicts"]),
               **{k: result.get(k) for k in ("train_loss", "first_loss", "last_loss", "steps")},
               "train_wall_s": result.get("wall_s"), "wall_s": round(time.time() - t0, 1),
               "model": result["model"] if config.keep_models else None,
               "meta": {"stage": config.label, "model": start, "seed": ctx.recipe.seed, "settings": shown,
                        "heldout": held_label}}
        if not config.keep_models:
            shutil.rmtree(out, ignore_errors=True)
        store.append([row])
        console.print(f"    held-out accuracy {row['accuracy']:.3f} ({len(heldout)} pairs)")
    done = {r["id"]: r for r in store.rows()}
    accuracy = {}
    for objective, n, init in points:
        rid = row_id("pm_scaling", objective, n, init, ctx.recipe.seed, str(config.heldout), config.heldout_limit)
        accuracy[point_key(objective, n, init)] = round(done[rid]["accuracy"], 4)
    if not config.keep_models:
        shutil.rmtree(folder / "points", ignore_errors=True)
    summary = {"base": base, "init": init_model, "data": str(source), "heldout": held_label,
               "heldout_pairs": len(heldout), "train_pool": len(pool), "sizes": sizes,
               "objectives": list(config.objectives), "points": len(points), "accuracy": accuracy}
    store.mark_done(**summary)
    return summary


# -- report --------------------------------------------------------------------------------------------
def chart_scaling(rows: list[dict], title: str):
    """Held-out accuracy against training comparisons, a line per objective (dashed: from the PMP model)."""
    from selfalign.core.report_api import Chart, Series

    lines: dict[tuple[str, bool], list[tuple[int, float]]] = defaultdict(list)
    for r in rows:
        lines[(r["objective"], bool(r.get("init")))].append((r["n"], r["accuracy"]))
    series = [Series(objective + (" (with PMP)" if with_init else ""), [p[0] for p in sorted(pts)],
                     [p[1] for p in sorted(pts)], color=OBJECTIVES.index(objective), dashed=with_init)
              for (objective, with_init), pts in sorted(lines.items(),
                                                        key=lambda kv: (OBJECTIVES.index(kv[0][0]), kv[0][1]))]
    return Chart("line", series, f"preference-model accuracy against training comparisons: {title}",
                 xlabel="training comparisons (n)", ylabel="held-out accuracy", title=title, log_x=True,
                 xticks=sorted({r["n"] for r in rows}), hline=(0.5, "chance"))


def report_section(stage: dict):
    from selfalign.core.report_api import Section, Table, Text, read_rows, wall_time

    rows = [r for r in read_rows(Path(stage["folder"]) / "rows.jsonl")
            if r.get("objective") in OBJECTIVES and isinstance(r.get("n"), int)
            and isinstance(r.get("accuracy"), float)]
    if not rows:
        return None
    rows.sort(key=lambda r: (OBJECTIVES.index(r["objective"]), bool(r.get("init")), r["n"]))
    held = (rows[0].get("meta") or {}).get("heldout") or "held-out pairs"
    summary = stage.get("summary") or {}
    title = f"{stage['label']}: held out {held} ({rows[0].get('heldout_pairs')} pairs)"
    cats = sorted({c for r in rows for c in (r.get("by_category") or {})})
    numbers = ["n", "accuracy", *cats, "ties", "steps", "train loss", "wall"]
    table = [[r["objective"], r.get("init") or "—", r["n"], r["accuracy"],
              *((r.get("by_category") or {}).get(c) for c in cats), r.get("ties"), r.get("steps"), r.get("train_loss"),
              wall_time(r.get("wall_s"))] for r in rows]
    note = (f"Each point: a model trained on the first n comparisons of a seeded shuffle of "
            f"{summary.get('data') or 'the data'}, scored on the held-out pairs; a pair is right when the chosen "
            "reply scores higher (ties count half). Dashed: fine-tuned from the pre-trained (PMP) model.")
    return Section(f"pm-scaling-{stage['label']}", f"Preference models: accuracy vs data ({stage['label']})",
                   [Text([note], muted=True), chart_scaling(rows, title),
                    Table(["objective", "init", *numbers], table, numeric=numbers, style="metrics compact")])
