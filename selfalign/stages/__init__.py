"""Stages: one module each, with a `Config` (a `StageConfig` subclass) and `run(ctx, config, folder)`.

A stage reads its inputs, writes rows or models into its own folder of the run, and returns a
summary dict that the pipeline stores in the stage's done-marker.
"""

from __future__ import annotations

from selfalign.stages import engrave, generate, self_align, self_instruct, verbose_clone
from selfalign.stages import eval as eval_stage

STAGES = {
    "generate": generate,
    "eval": eval_stage,
    # Self-Align (Dromedary)
    "self_instruct": self_instruct,
    "self_align": self_align,
    "engrave": engrave,
    "verbose_clone": verbose_clone,
}
