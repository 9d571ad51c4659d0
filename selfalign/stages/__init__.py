"""Stages: one module each, with a `Config` (a `StageConfig` subclass) and `run(ctx, config, folder)`.

A stage reads its inputs, writes rows or models into its own folder of the run, and returns a
summary dict that the pipeline stores in the stage's done-marker.
"""

from __future__ import annotations

from selfalign.stages import (
    compare,
    context_distill,
    engrave,
    generate,
    mine_prompts,
    pm_scaling,
    pmp,
    prompt_gain,
    reward_model,
    rlsf,
    self_align,
    self_instruct,
    self_play,
    sft,
    verbose_clone,
)
from selfalign.stages import eval as eval_stage

STAGES = {
    "generate": generate,
    "eval": eval_stage,
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
