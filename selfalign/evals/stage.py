"""`eval`: the shared evaluations as a stage, so a recipe can measure the base model first and the
aligned model last. Writes per-item rows (resumable) under the stage folder and `results.json`.

    - stage: eval
      name: eval_base
      evals: [hhh, truthfulqa]       # and/or behaviour, capability, preference (needs judge + comparisons)
      scoring: [likelihood, ab]      # HHH scorings; add rm with a judge
      system: null                   # or hhh, builtin:NAME, a .txt file, or the text itself
                                     # (behaviour: null means the engraved assistant prompt)
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, ClassVar, Literal

from pydantic import Field
from rich.table import Table

from selfalign.core.errors import SelfAlignError
from selfalign.core.progress import console
from selfalign.core.recipe import StageConfig
from selfalign.core.store import DONE_FILE, write_json_atomic
from selfalign.evals.common import resolve_system
from selfalign.evals.verdict import report_lead  # noqa: F401 - the report's "Did it work?" section

EVAL_NAMES = ("hhh", "truthfulqa", "preference", "behaviour", "capability")


class Config(StageConfig):
    stage: str = "eval"
    evals: list[Literal["hhh", "truthfulqa", "preference", "behaviour", "capability"]] = Field(
        default_factory=lambda: ["hhh", "truthfulqa"], min_length=1, description="which evaluations to run")
    scoring: list[Literal["likelihood", "ab", "rm"]] = Field(
        default_factory=lambda: ["likelihood", "ab"], description="HHH scorings (rm needs a judge)")
    system: str | None = Field(None, description="system prompt at inference: hhh, builtin:NAME, a .txt file or text")
    judge: str | None = Field(None, description="reward model (a folder, or @stage for one an earlier stage trained), "
                              "for HHH `rm` scoring and the preference eval")
    comparisons: str | None = Field(None, description="JSONL of prompt/chosen/rejected for the preference eval")
    data_dir: str | None = Field(None,
                                 description="folder with hhh_alignment/ and truthful_qa/ (default: fetched once)")
    limit: int | None = Field(None, ge=1, description="at most N HHH items per category, N TruthfulQA questions, "
                              "N behaviour prompts per kind and N items per capability task")
    heldout: str | None = Field(None, description="behaviour eval: held-out prompt YAML (default: the shipped set)")
    max_new_tokens: int = Field(128, ge=1, description="behaviour eval: token cap per answer (greedy decoding)")
    mc2: bool = Field(True, description="TruthfulQA: score every true answer for MC2; false scores only what MC1 "
                      "needs (the best answer and the false ones, about a third fewer answers) and reports no MC2")

    added_later: ClassVar[dict[str, Any]] = {"mc2": True}

    def human_inputs(self) -> list[tuple[str, str]]:
        system = resolve_system(self.system)
        return [(f"system:{self.system if len(self.system or '') < 40 else self.label}", system)] if system else []


def limited(items: list, limit: int | None, key=lambda it: "") -> list:
    if not limit:
        return items
    taken: dict[str, int] = {}
    out = []
    for it in items:
        k = key(it)
        if taken.get(k, 0) < limit:
            taken[k] = taken.get(k, 0) + 1
            out.append(it)
    return out


def run_evals(config: Config, model: str, folder: Path, get_engine, engine_key: dict | None = None,
              model_key: str | None = None) -> dict:
    """Run the config's evaluations; `get_engine()` is called only if a language model is needed.

    With `engine_key` (the engine settings that change scores), evals of a model from selfalign's
    model cache keep their rows in the shared eval cache (`evals.cache`) and are reused by later runs.
    `model_key` names the model in row ids (default: `model`; a run names its own models by their
    place in the run folder, `RunContext.model_key`)."""
    from selfalign.evals import data

    label = model_key or model
    system = resolve_system(config.system)
    judge = None
    if config.judge:
        from selfalign.core.rewards import RewardModel

        judge = RewardModel(config.judge)
    shared = {"system": system, "limit": config.limit, "data_dir": config.data_dir, "engine": engine_key}

    def cached(name: str, settings: dict, evaluate) -> dict:
        return run_cached(model, name, shared | settings, folder, evaluate,
                          enabled=engine_key is not None and judge is None)

    evals = {}
    if "hhh" in config.evals:
        from selfalign.evals.hhh import evaluate_hhh

        items = limited(data.load_hhh(config.data_dir, verify=data.should_verify(config.data_dir)), config.limit,
                        key=lambda it: it.category)
        lm_scorings = [s for s in config.scoring if s != "rm"]
        engine = get_engine() if lm_scorings else None
        evals["hhh"] = cached("hhh", {"scoring": config.scoring}, lambda where: evaluate_hhh(
            engine, items, where, tuple(config.scoring), system, judge, model_label=label))
    if "truthfulqa" in config.evals:
        from selfalign.evals.truthfulqa import evaluate_truthfulqa

        items = limited(data.load_truthfulqa(config.data_dir, verify=data.should_verify(config.data_dir)), config.limit)
        # keyed like the stage's fingerprint: the base cache made before `mc2` existed stays valid
        evals["truthfulqa"] = cached("truthfulqa", config.departures_from_old(), lambda where: evaluate_truthfulqa(
            get_engine(), items, where, system, model_label=label, mc2=config.mc2))
    if "behaviour" in config.evals:
        from selfalign.evals.behaviour import (
            DEFAULT_SYSTEM,
            behaviour_sampling,
            evaluate_behaviour,
            load_heldout,
        )

        items = limited(load_heldout(config.heldout), config.limit, key=lambda it: it.kind)
        sampling = behaviour_sampling(config.max_new_tokens)
        chat_system = resolve_system(config.system or DEFAULT_SYSTEM)
        evals["behaviour"] = cached("behaviour", {"system": chat_system, "items": [(i.id, i.prompt) for i in items],
                                                  "sampling": sampling.model_dump()}, lambda where: evaluate_behaviour(
            get_engine(), items, where, chat_system, sampling, model_label=label))
    if "capability" in config.evals:
        from selfalign.evals.capability import evaluate_capability, load_capability

        items = limited(load_capability(config.data_dir), config.limit, key=lambda it: it.task)
        evals["capability"] = cached("capability", {"tasks": sorted({it.task for it in items})},
                                     lambda where: evaluate_capability(
            get_engine(), items, where, model_label=label))
    if "preference" in config.evals:
        from selfalign.evals.preference import load_comparisons, preference_accuracy

        if judge is None or not config.comparisons:
            raise SelfAlignError("the preference eval needs a reward model (judge) and a comparisons file")
        t0 = time.time()
        evals["preference"] = preference_accuracy(judge, load_comparisons(config.comparisons))
        evals["preference"]["wall_s"] = round(time.time() - t0, 1)
    return evals


def run_cached(model: str, name: str, settings: dict, folder: Path, evaluate, enabled: bool = True) -> dict:
    """`evaluate(where)` with its rows in the shared eval cache when the model is an unchanged cached
    one (then copied into `folder`), else in `folder`. The result says whether the cache had it all."""
    from selfalign.core.store import RowStore
    from selfalign.evals.cache import copy_rows, eval_cache_folder

    where = eval_cache_folder(model, name, settings) if enabled else None
    if where is None:
        return evaluate(folder)
    hit = RowStore(where / name).is_done()
    if hit:
        console.print(f"  {name}: cache hit, the rows of an earlier run of this model ({where})")
    result = evaluate(where)
    copy_rows(where, folder, name)
    result["cache"] = {"hit": hit, "folder": str(where)}
    return result


def results_table(results: dict) -> Table:
    title = f"{results['model']}" + (f"  (system: {results['system_name']})" if results.get("system_name") else "")
    table = Table(title=title)
    for col in ("eval", "metric", "value", "n"):
        table.add_column(col, justify="right" if col in ("value", "n") else "left")
    for name, res in results["evals"].items():
        for group, values in res["metrics"].items():
            for key, value in values.items():
                n = res.get("counts", {}).get(key, "")
                shown = f"{value:.3f}" if isinstance(value, float) else str(value)
                table.add_row(name, f"{group} {key}" if group != name else key, shown, str(n))
    return table


def engine_key(engine) -> dict:
    """The engine settings that change scores (not the batch size)."""
    from selfalign.core.models import pick_device

    return {"name": engine.name, "device": pick_device(engine.device), "dtype": engine.dtype,
            "chat_format": engine.chat_format}


def run(ctx, config: Config, folder: Path) -> dict:
    model = ctx.model_for(config)
    if config.judge and config.judge.startswith("@"):  # e.g. judge: "@reward_model"
        config = config.model_copy(update={"judge": ctx.model_for(config, config.judge)})
    folder.mkdir(parents=True, exist_ok=True)
    evals = run_evals(config, model, folder, lambda: ctx.engine(model), engine_key=engine_key(ctx.recipe.engine),
                      model_key=ctx.model_key(model))
    results = {"model": model, "engine": ctx.recipe.engine.name, "system": resolve_system(config.system),
               "system_name": config.system, "judge": config.judge, "evals": evals}
    (folder / "results.json").write_text(json.dumps(results, indent=2))
    console.print(results_table(results))
    summary = {}
    for name, res in evals.items():
        for group, values in res["metrics"].items():
            key = "overall" if "overall" in values else next(iter(values))
            summary[f"{name}.{group}.{key}" if group != name else f"{name}.{key}"] = round(values[key], 4)
    write_json_atomic(folder / DONE_FILE, summary)
    return summary
