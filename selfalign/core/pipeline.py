"""Run a recipe's stages in order over a run folder, resuming whatever is unfinished.

A run folder holds `recipe.yaml` (what was asked), `run.json` (what happened: per stage, the
wall time and the summary) and one sub-folder per stage, `NN-<name>/`. A stage whose folder has
its done-marker is skipped; a stage killed half-way is run again and continues from its rows.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from selfalign.core.engines import Engine, make_engine
from selfalign.core.errors import SelfAlignError
from selfalign.core.inputs import read_json_object
from selfalign.core.ledger import build_ledger
from selfalign.core.progress import console
from selfalign.core.recipe import Recipe, StageConfig
from selfalign.core.store import DONE_FILE


@dataclass
class RunContext:
    """What a stage gets besides its config: the recipe, the run folder and shared engines."""

    recipe: Recipe
    run_dir: Path
    engines: dict[tuple, Engine] = field(default_factory=dict)
    stage_dirs: dict[str, Path] = field(default_factory=dict)

    def model_for(self, config: StageConfig, ref: str | None = None) -> str:
        """The stage's model: its own `model`, else the recipe's. `@label` names the model an
        earlier training stage wrote (its done-marker's `model`), e.g. `model: "@engrave"`.
        `ref` resolves another model field of the stage the same way (a teacher, a judge, a
        reward model); None falls back to the stage's model."""
        ref = ref or config.model or self.recipe.model
        if not ref.startswith("@"):
            return ref
        folder = self.stage_dirs.get(ref[1:])
        done = folder / DONE_FILE if folder else None
        if done is None or not done.exists():
            raise SelfAlignError(f"model {ref!r}: no finished stage named {ref[1:]!r} before this one",
                                 "put the training stage earlier in the recipe")
        model = read_json_object(done, "done-marker").get("model")
        if not model:
            raise SelfAlignError(f"model {ref!r}: stage {ref[1:]!r} did not produce a model")
        return model

    def engine(self, model: str) -> Engine:
        """One engine per model for the whole run, so a model is loaded once."""
        key = (model, self.recipe.engine.name)
        if key not in self.engines:
            console.print(f"  loading [cyan]{model}[/] on the {self.recipe.engine.name} engine")
            self.engines[key] = make_engine(self.recipe.engine.name, model, **self.recipe.engine.options())
        return self.engines[key]

    def provenance(self, config: StageConfig, model: str, sampling, **extra) -> dict:
        """The `meta` block every generated row carries."""
        return {"stage": config.label, "model": model, "engine": self.recipe.engine.name,
                "sampling": sampling.model_dump(), **extra}

    def max_prompts(self, config_value: int | None) -> int | None:
        caps = [c for c in (config_value, self.recipe.max_prompts) if c]
        return min(caps) if caps else None

    def free_accelerator(self) -> None:
        """Before training: a vLLM engine holds most of the GPU's memory, so let it go (later
        stages load it again). The hf engine on CPU is kept: reloading costs more than it frees."""
        if self.recipe.engine.name == "vllm":
            self.close()
            try:
                import torch

                torch.cuda.empty_cache()
            except Exception:  # noqa: BLE001 - best effort
                pass

    def close(self) -> None:
        for engine in self.engines.values():
            engine.close()
        self.engines.clear()


def stage_folder(run_dir: Path, index: int, config: StageConfig) -> Path:
    return run_dir / f"{index + 1:02d}-{config.label}"


def _write_json(path: Path, payload: Any) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(payload, indent=2, default=str))
    tmp.replace(path)


def _prepare_run_dir(recipe: Recipe, run_dir: Path) -> dict:
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        snapshot = yaml.safe_dump(recipe.model_dump(mode="json", exclude_none=True), sort_keys=False)
        recipe_file = run_dir / "recipe.yaml"
        if recipe_file.exists() and recipe_file.read_text() != snapshot:
            console.print(
                f"[yellow]note:[/] {recipe_file} differs from this recipe; finished stages are kept as they are "
                "(delete a stage's folder to redo it)"
            )
            (run_dir / "recipe.previous.yaml").write_text(recipe_file.read_text())
        recipe_file.write_text(snapshot)
    except (NotADirectoryError, FileExistsError) as exc:
        raise SelfAlignError(f"cannot use {run_dir} as a run folder: a file is in the way ({exc.filename})",
                             "choose another --out") from exc
    except OSError as exc:
        raise SelfAlignError(f"cannot write to run folder {run_dir}: {exc.strerror}",
                             "choose a writable --out or free disk space") from exc
    run_json = run_dir / "run.json"
    return read_json_object(run_json, "run record") if run_json.exists() else {"name": recipe.name, "stages": {}}


def run_recipe(recipe: Recipe, run_dir: Path | None = None) -> dict:
    """Run every unfinished stage of `recipe`; return the run record (also in `run.json`)."""
    from selfalign.stages import STAGES

    run_dir = Path(run_dir or recipe.run_dir())
    record = _prepare_run_dir(recipe, run_dir)
    ledger = build_ledger(recipe)  # an unreadable input stops the run here, before any stage
    record.update(model=recipe.model, engine=recipe.engine.name, seed=recipe.seed, inputs=ledger["inputs"],
                  supervision={k: ledger[k] for k in ("words", "lines", "not_counted")},
                  started_at=record.get("started_at") or time.strftime("%Y-%m-%dT%H:%M:%S"))
    ctx = RunContext(recipe=recipe, run_dir=run_dir)
    try:
        for i, config in enumerate(recipe.stages):
            folder = stage_folder(run_dir, i, config)
            ctx.stage_dirs[config.label] = folder
            title = f"[{i + 1}/{len(recipe.stages)}] {config.label}"
            if (folder / DONE_FILE).exists():
                console.print(f"[dim]{title}: done earlier, skipped ({folder})[/]")
                continue
            console.rule(f"[bold]{title}")
            t0 = time.time()
            summary = STAGES[config.stage].run(ctx, config, folder) or {}
            entry = record["stages"].setdefault(config.label, {"wall_s": 0.0})
            entry.update(stage=config.stage, folder=folder.name, summary=summary)
            entry["wall_s"] = round(entry.get("wall_s", 0.0) + time.time() - t0, 2)
            _write_json(run_dir / "run.json", record)
            console.print(f"  done in {time.time() - t0:.1f} s: {summary}")
    finally:
        ctx.close()
    return record
