"""The stage registry: every stage a recipe can name. Stages live beside their paper in
`selfalign.methods` (and the eval stage in `selfalign.evals`); each is one module, with a `Config`
(a `StageConfig` subclass) and `run(ctx, config, folder)`.

A stage reads its inputs, writes rows or models into its own folder of the run, and returns a
summary dict that the pipeline stores in the stage's done-marker.

The shared machinery in `selfalign.core` never imports the stages (arrows point down only): its
recipe parser, pipeline and report take the registry as an argument. The four functions at the end
hand them this one, and are what the CLI and the tests call.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from selfalign.core import pipeline, recipe
from selfalign.core.recipe import Recipe
from selfalign.evals import stage as eval_stage
from selfalign.evals import winrate
from selfalign.methods import generate
from selfalign.methods.almost import compare, mine_prompts, reward_model, rlsf, self_play, sft
from selfalign.methods.hhh_lab import context_distill, pm_scaling, pmp, prompt_gain
from selfalign.methods.self_align import engrave, self_align, self_instruct, verbose_clone

STAGES = {
    "generate": generate,
    "eval": eval_stage,
    "winrate": winrate,
    # Self-Align (Dromedary)
    "self_instruct": self_instruct,
    "self_align": self_align,
    "engrave": engrave,
    "verbose_clone": verbose_clone,
    # ALMoST (synthetic feedback)
    "mine_prompts": mine_prompts,
    "compare": compare,
    "self_play": self_play,
    "sft": sft,
    "rlsf": rlsf,
    # shared by ALMoST and the HHH laboratory
    "reward_model": reward_model,
    # the HHH laboratory
    "context_distill": context_distill,
    "pmp": pmp,
    "pm_scaling": pm_scaling,
    "prompt_gain": prompt_gain,
}


def parse_recipe(data: Any, source: str = "<recipe>", overrides: dict[str, Any] | None = None) -> Recipe:
    """`core.recipe.parse_recipe` over the stages above."""
    return recipe.parse_recipe(data, source, overrides, stages=STAGES)


def load_recipe(ref: str | Path | None = None, overrides: dict[str, Any] | None = None) -> Recipe:
    """`core.recipe.load_recipe` over the stages above: a path or a shipped recipe's name."""
    return recipe.load_recipe(ref, overrides, stages=STAGES)


def run_recipe(parsed: Recipe, run_dir: Path | None = None, fresh: list[str] | tuple[str, ...] = ()) -> dict:
    """`core.pipeline.run_recipe` over the stages above."""
    return pipeline.run_recipe(parsed, run_dir, fresh, stages=STAGES)


def build_report(run_dir: str | Path, out: str | Path | None = None) -> Path:
    """`core.report.build_report`, with each stage drawing its own sections."""
    from selfalign.core import report  # matplotlib: loaded only when a report is drawn

    return report.build_report(run_dir, out, stages=STAGES)
