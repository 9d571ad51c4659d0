"""`prompt_gain`: how much of a prompt's effect a context-distilled model keeps (Askell et al. 2021).

Context distillation is meant to make the model behave *without* the HHH prompt as it did *with*
it. This stage reads the results of three `eval` stages of the same run (the model without the
prompt, with it, and the distilled model without it) and, for every metric they share, reports

    gain  = prompted − plain
    kept  = distilled − plain
    kept fraction = kept / gain      (1: all of the prompt's effect kept; 0: none; < 0: worse than plain)

    - stage: prompt_gain
      plain: eval_plain
      prompted: eval_prompted
      distilled: eval_distilled

It trains and generates nothing; it writes `results.json` and a report section. The fraction is
left empty where the prompt made no difference (|gain| < `min_gain`), since a ratio of two noise
terms says nothing; on small evaluation sets read it with the item counts in mind.
"""

from __future__ import annotations

import json
from pathlib import Path

from pydantic import Field

from selfalign.core.errors import SelfAlignError
from selfalign.core.progress import console
from selfalign.core.recipe import StageConfig
from selfalign.core.store import RowStore


class Config(StageConfig):
    stage: str = "prompt_gain"
    plain: str = Field(..., description="the eval stage of the model without the prompt")
    prompted: str = Field(..., description="the eval stage of the same model with the prompt")
    distilled: str = Field(..., description="the eval stage of the distilled model without the prompt")
    min_gain: float = Field(1e-6, ge=0, description="gains smaller than this give no fraction")


def _metrics(ctx, label: str, field: str) -> dict[tuple[str, str, str], float]:
    folder = ctx.stage_dirs.get(label)
    path = folder / "results.json" if folder else None
    if path is None or not path.exists():
        earlier = ", ".join(ctx.stage_dirs) or "none"
        raise SelfAlignError(f"{field}: {label!r} is not an earlier eval stage with results (earlier: {earlier})",
                             "name the eval stages that ran before this one")
    res = json.loads(path.read_text())
    out = {}
    for name, ev in (res.get("evals") or {}).items():
        for group, values in (ev.get("metrics") or {}).items():
            for key, value in values.items():
                if isinstance(value, int | float) and not isinstance(value, bool) and not key.startswith("ci95"):
                    out[(name, group, key)] = float(value)
    return out


def kept_fractions(plain: dict, prompted: dict, distilled: dict, min_gain: float) -> list[dict]:
    rows = []
    for k in plain:
        if k in prompted and k in distilled:
            gain, kept = prompted[k] - plain[k], distilled[k] - plain[k]
            rows.append({"eval": k[0], "metric": k[1], "key": k[2], "plain": plain[k], "prompted": prompted[k],
                         "distilled": distilled[k], "gain": gain, "kept": kept,
                         "kept_fraction": kept / gain if abs(gain) >= min_gain else None})
    return rows


def run(ctx, config: Config, folder) -> dict:
    folder = Path(folder)
    rows = kept_fractions(_metrics(ctx, config.plain, "plain"), _metrics(ctx, config.prompted, "prompted"),
                          _metrics(ctx, config.distilled, "distilled"), config.min_gain)
    if not rows:
        raise SelfAlignError(f"stages {config.plain}, {config.prompted} and {config.distilled} share no metric",
                             "run the same evals (and scorings) in all three")
    store = RowStore(folder)
    (folder / "results.json").write_text(json.dumps(
        {"stages": config.model_dump(include={"plain", "prompted", "distilled"}), "rows": rows}, indent=2))
    overall = {f"{r['eval']}.{r['metric']}": r["kept_fraction"] for r in rows if r["key"] == "overall"}
    for name, frac in overall.items():
        console.print(f"  {name}: kept fraction {'—' if frac is None else f'{frac:.2f}'}")
    return store.mark_done(metrics=len(rows), kept_fraction_overall=overall)


def report_section(stage: dict):
    """The prompt's gain on each metric, and how much of it the distilled model kept without the prompt."""
    from selfalign.core.report_api import Bold, Section, Table, Text, read_json

    res = read_json(Path(stage["folder"]) / "results.json")
    if not isinstance(res, dict):
        return None
    names = res.get("stages") or {}
    numbers = [f"no prompt ({names.get('plain', '')})", f"prompt ({names.get('prompted', '')})",
               f"distilled ({names.get('distilled', '')})", "gain", "kept", "kept fraction"]
    rows = [[f"{r['eval']} {r['metric']}", r["key"],
             *(r[k] for k in ("plain", "prompted", "distilled", "gain", "kept")),
             Bold(r["kept_fraction"])] for r in res.get("rows") or []]
    note = ("gain = prompted − no prompt; kept = distilled − no prompt; kept fraction = kept / gain (1 = the distilled "
            "model, without the prompt, does as well as the prompted model; empty where the prompt changed nothing).")
    return Section(f"gain-{stage['label']}", "Context distillation: the prompt's gain kept",
                   [Text([note], muted=True),
                    Table(["metric", "category", *numbers], rows, numeric=numbers, style="metrics compact")])
