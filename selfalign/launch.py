"""The child side of a `launcher:` launch: `accelerate launch ... -m selfalign.launch RUN_DIR LABEL`.

Every process accelerate starts runs this: it reads the recipe the pipeline wrote for it
(`RUN_DIR/launch_recipe.json`, just before the launch), rebuilds the run context up to stage LABEL and runs
that stage. The training inside uses the process group accelerate set up; only the main process
writes the stage's files (`selfalign.core.ranks`). The pipeline that started it waits and reads the
stage's done-marker.
"""

from __future__ import annotations

import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    from selfalign.core.errors import SelfAlignError
    from selfalign.core.inputs import read_json_object
    from selfalign.core.launcher import LAUNCH_RECIPE
    from selfalign.core.pipeline import RunContext, stage_folder
    from selfalign.core.progress import console
    from selfalign.stages import STAGES, parse_recipe

    args = sys.argv[1:] if argv is None else argv
    if len(args) != 2:
        console.print("usage: python -m selfalign.launch RUN_DIR LABEL (the pipeline runs this "
                      "under accelerate launch)")
        return 2
    run_dir, label = Path(args[0]), args[1]
    try:
        source = run_dir / LAUNCH_RECIPE
        recipe = parse_recipe(read_json_object(source, "launch recipe"), str(source))
        ctx = RunContext(recipe=recipe, run_dir=run_dir)
        for i, config in enumerate(recipe.stages):
            folder = stage_folder(run_dir, i, config)
            ctx.stage_dirs[config.label] = folder
            if config.label == label:
                ctx.current = config
                STAGES[config.stage].run(ctx, config, folder)
                ctx.close()
                return 0
        raise SelfAlignError(f"{run_dir}/recipe.yaml has no stage named {label!r}")
    except SelfAlignError as exc:
        console.print(f"[red]error:[/] {exc}")
        return 2


if __name__ == "__main__":
    sys.exit(main())
