"""Training stages under `accelerate launch`: the recipe's `launcher:` block.

    launcher:
      config: ddp                     # a shipped accelerate config (selfalign/recipes/accelerate/), or a YAML path
      num_processes: 8                # one per GPU (on the CPU: processes, gloo)
      stages: [engrave]               # optional: the training stages to launch (default: every one in the recipe)
      save_steps: 50                  # a checkpoint every 50 optimizer steps, so a killed launch resumes

The pipeline runs such a stage as a child, `accelerate launch --config_file C --num_processes N -m
selfalign.launch RUN_DIR LABEL`, and waits for it. Every process runs the whole stage (so each takes
part in training; the Hugging Face / TRL trainer does the data sharding and the all-reduce); only the
main one writes the stage's files (`selfalign.core.ranks`). A generation inside such a stage
(verbose_clone's teacher, context_distill's samples) is made by the main process while the others
wait for its rows.

Resume: under a launch the trainers save a checkpoint (model, optimizer, scheduler, RNG states)
every `save_steps` steps into the stage folder (`checkpoint-N/`, the last one kept), and a new
launch of the same stage continues from the last one: the same global batch order, the same steps.
The checkpoints carry the stage's fingerprint (`_checkpoints.json`); checkpoints of other settings are
deleted rather than resumed, and they are deleted once the stage has finished.

`batch_size` stays per device: N processes train on N times the batch of one. Keep
`batch_size x grad_accum x num_processes` at the batch the recipe means (the tests compare one
process at batch 4 with two at batch 2). `num_processes` is part of a launched stage's fingerprint.

Which config suits which stage: `ddp` (a full copy per GPU) for LoRA stages and any model that fits
one GPU with its optimizer (engrave, sft, verbose_clone, context_distill with LoRA; reward_model,
pmp, pm_scaling of small PMs); `zero2` (optimizer and gradients sharded) for full fine-tuning of
7B-13B models; `fsdp` or `zero3` (parameters sharded too) for models whose weights alone do not
fit one GPU (30B-65B full fine-tuning, large PMs); `cpu_ddp` for trying the launch on a laptop.
rlsf (RLOO) under a launch: TRL's trainer generates on every process, which DDP supports.
Under `fsdp`, `zero2` and `zero3` every process calls the trainer's collective `save_model`, which
gathers the full weights (`selfalign.core.training.save_sharded`); merging an adapter there is refused.
That path is tested with a fake trainer only: no multi-GPU machine has run it.
Only DDP on the CPU (gloo) has run here (tests/test_distributed.py).
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

from selfalign.core.errors import SelfAlignError
from selfalign.core.store import read_done, write_json_atomic

# the stages that train (a launch runs these; the others always run in the pipeline's process)
TRAINING_STAGES = ("engrave", "sft", "verbose_clone", "reward_model", "pmp", "pm_scaling", "context_distill", "rlsf")
SHIPPED = ("cpu_ddp", "ddp", "fsdp", "zero2", "zero3")
CHECKPOINTS_FILE = "_checkpoints.json"
LAUNCH_RECIPE = "launch_recipe.json"  # in the run folder: the whole recipe, as the launched processes read it
SAVE_STEPS_ENV = "SELFALIGN_SAVE_STEPS"


def accelerate_configs_dir() -> Path:
    return Path(__file__).resolve().parent.parent / "recipes" / "accelerate"


def accelerate_config(ref: str) -> Path:
    """A shipped accelerate config by name (`ddp`, `fsdp`, ...) or a YAML path."""
    if ref in SHIPPED or ref.removesuffix(".yaml") in SHIPPED:
        return accelerate_configs_dir() / f"{ref.removesuffix('.yaml')}.yaml"
    path = Path(ref).expanduser()
    if not path.is_file():
        raise SelfAlignError(f"launcher.config: {ref!r} is neither a shipped accelerate config ({', '.join(SHIPPED)}) "
                             "nor a YAML file", "write one with `accelerate config --config_file FILE`")
    return path


class LauncherConfig(BaseModel):
    """How training stages are launched: an accelerate config and a number of processes."""

    model_config = ConfigDict(extra="forbid")

    config: str = Field(..., description=f"accelerate config: one of {', '.join(SHIPPED)} (shipped) or a YAML path")
    num_processes: int = Field(..., ge=1, description="processes to launch on this node (one per GPU)")
    stages: list[str] | None = Field(None, description="labels of the training stages to launch (default: all of them)")
    save_steps: int = Field(50, ge=1, description="a checkpoint every N optimizer steps, so a killed launch resumes")
    extra_args: list[str] = Field(default_factory=list, description="more `accelerate launch` options, e.g. "
                                  "['--num_machines', '2', '--machine_rank', '0', '--main_process_ip', '10.0.0.1']")


def check_launcher(recipe, source: str) -> None:
    """At load time: the config exists and `stages` names training stages of this recipe."""
    launcher = getattr(recipe, "launcher", None)
    if launcher is None:
        return
    try:
        accelerate_config(launcher.config)
    except SelfAlignError as exc:
        raise SelfAlignError(f"{source}: {exc.message}", exc.hint) from None
    kinds = {c.label: c.stage for c in recipe.stages}
    for i, label in enumerate(launcher.stages or []):
        if label not in kinds:
            raise SelfAlignError(f"{source}: launcher.stages[{i}]: no stage named {label!r} "
                                 f"(stages: {', '.join(kinds)})")
        if kinds[label] not in TRAINING_STAGES:
            raise SelfAlignError(f"{source}: launcher.stages[{i}]: {label!r} is a {kinds[label]} stage, which does not "
                                 f"train (launched stages: {', '.join(TRAINING_STAGES)})",
                                 "generation stages scale with `workers:` (Ray) or the vllm engine's parallelism")


def launched(recipe, config) -> bool:
    """Whether this stage runs under `accelerate launch`."""
    launcher = getattr(recipe, "launcher", None)
    if launcher is None or config.stage not in TRAINING_STAGES:
        return False
    return launcher.stages is None or config.label in launcher.stages


def launch_command(recipe, run_dir: Path, label: str) -> list[str]:
    """The exact command the pipeline runs for a launched stage."""
    launcher = recipe.launcher
    return [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
            str(accelerate_config(launcher.config)),
            "--num_processes", str(launcher.num_processes), *launcher.extra_args,
            "-m", "selfalign.launch", str(Path(run_dir).resolve()), label]


def launch_env(recipe) -> dict[str, str]:
    from selfalign.core.ranks import LAUNCHED

    return {**os.environ, LAUNCHED: "1", SAVE_STEPS_ENV: str(recipe.launcher.save_steps)}


def recipe_data(recipe) -> dict:
    """The recipe as a mapping `parse_recipe` reads back, every stage with its own fields (each stage dumped
    as its own class: the recipe's dump knows the stages only as `StageConfig`)."""
    return {**recipe.model_dump(mode="json", exclude={"stages"}, exclude_none=True),
            "stages": [c.model_dump(mode="json", exclude_none=True) for c in recipe.stages]}


def _checkpoints(folder: Path) -> list[Path]:
    return sorted(p for p in Path(folder).rglob("checkpoint-*") if p.is_dir())


def prepare_checkpoints(folder: Path, fingerprint: str) -> list[Path]:
    """Keep checkpoints made with this stage's settings (to resume from); delete others. Returns those kept."""
    from selfalign.core.progress import console

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    marker = folder / CHECKPOINTS_FILE
    found = _checkpoints(folder)
    made_with = read_done_like(marker).get("fingerprint")
    if found and made_with != fingerprint:
        console.print(f"  [yellow]note:[/] {len(found)} checkpoint(s) in {folder} were made with "
                      "other settings; deleted")
        for path in found:
            shutil.rmtree(path, ignore_errors=True)
        found = []
    write_json_atomic(marker, {"fingerprint": fingerprint})
    return found


def read_done_like(path: Path) -> dict:
    import json

    try:
        return json.loads(path.read_text()) if path.exists() else {}
    except (OSError, ValueError):
        return {}


def run_launched(ctx, config, folder: Path, fingerprint: str) -> dict:
    """Run one training stage under `accelerate launch` and wait; its summary is its done-marker's."""
    from selfalign.core.progress import console

    ctx.free_accelerator()  # the child needs the GPUs the parent's vLLM engine holds
    folder = Path(folder)
    resumed = prepare_checkpoints(folder, fingerprint)
    write_json_atomic(Path(ctx.run_dir) / LAUNCH_RECIPE, recipe_data(ctx.recipe))
    cmd = launch_command(ctx.recipe, ctx.run_dir, config.label)
    console.print(f"  {'resuming from ' + resumed[-1].name + ': ' if resumed else ''}{shlex.join(cmd)}")
    rc = subprocess.run(cmd, env=launch_env(ctx.recipe)).returncode
    if rc != 0:
        raise SelfAlignError(f"{config.label}: accelerate launch exited with {rc}",
                             "its output is above; run the same command again to resume from the last "
                             f"checkpoint in {folder}")
    done = read_done(folder)
    if done is None:
        raise SelfAlignError(f"{config.label}: the launched stage ended without finishing "
                             f"({folder} has no done-marker)")
    for path in _checkpoints(folder):  # the trained model is saved; checkpoints were only for resuming
        shutil.rmtree(path, ignore_errors=True)
    (folder / CHECKPOINTS_FILE).unlink(missing_ok=True)
    return {k: v for k, v in done.items() if k not in ("finished_at", "fingerprint", "settings", "wall_s")}
