"""The stage registry: every stage a recipe can name. Stages live beside their paper in
`selfalign.methods` (and the eval stage in `selfalign.evals`); each is one module, with a `Config`
(a `StageConfig` subclass) and `run(ctx, config, folder)`.

A stage reads its inputs, writes rows or models into its own folder of the run, and returns a
summary dict that the pipeline stores in the stage's done-marker.
"""

from __future__ import annotations

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
