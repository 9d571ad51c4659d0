"""Run a recipe's stages in order over a run folder, resuming whatever is unfinished.

A run folder holds `recipe.yaml` (what was asked), `run.json` (what happened: per stage, the
wall time and the summary) and one sub-folder per stage, `NN-<name>/`. Each stage has a
fingerprint (`selfalign.core.fingerprint`): its resolved settings, its model, the contents of the
files it reads and the fingerprints of the earlier stages it reads. A stage whose done-marker
records the same fingerprint is skipped; a stage killed half-way is run again and continues from
its rows. A finished stage whose fingerprint differs is never silently reused: the run stops before anything runs,
naming the changed fields and the way out (`--fresh LABEL` redoes that stage and every stage after it, or a
new `--out`).
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from selfalign.core.engines import Engine, make_engine
from selfalign.core.errors import SelfAlignError
from selfalign.core.fingerprint import changed_fields, fingerprint, stage_settings
from selfalign.core.inputs import read_json_object
from selfalign.core.launcher import launched, run_launched
from selfalign.core.ledger import build_ledger
from selfalign.core.progress import console
from selfalign.core.prompts import capped, load_prompts
from selfalign.core.recipe import Recipe, StageConfig, check_references
from selfalign.core.store import DONE_FILE, ROWS_FILE, read_done, read_jsonl, write_json_atomic

BOOKKEEPING = ("fingerprint", "settings", "finished_at", "wall_s")


def rebased(model: str, folder: Path) -> str:
    """A model path a stage's done-marker recorded, followed into the stage's folder as it is now:
    the run folder may have moved since (`/old/run/04-engrave/adapter` → `FOLDER/adapter`)."""
    path = Path(model)
    if not path.is_absolute() or path.exists() or folder.name not in path.parts:
        return model
    at = len(path.parts) - 1 - path.parts[::-1].index(folder.name)
    moved = folder.joinpath(*path.parts[at + 1:])
    return str(moved) if moved.exists() else model


@dataclass
class RunContext:
    """What a stage gets besides its config: the recipe, the run folder and shared engines."""

    recipe: Recipe
    run_dir: Path
    engines: dict[tuple, Engine] = field(default_factory=dict)
    stage_dirs: dict[str, Path] = field(default_factory=dict)
    current: StageConfig | None = None  # the stage running now (its `workers` spread its generation over Ray)

    def model_for(self, config: StageConfig, ref: str | None = None) -> str:
        """The stage's model: its own `model`, else the recipe's. `@label` names the model an
        earlier training stage wrote (its done-marker's `model`), e.g. `model: "@engrave"`.
        `ref` resolves another model field of the stage the same way (a teacher, a judge, a
        reward model); None falls back to the stage's model."""
        ref = ref or config.model or self.recipe.model
        if not ref.startswith("@"):
            return ref
        folder = self.stage_dirs.get(ref[1:])
        done = read_done(folder) if folder else None
        if done is None:
            raise SelfAlignError(f"model {ref!r}: no finished stage named {ref[1:]!r} before this one",
                                 "put the training stage earlier in the recipe")
        model = done.get("model")
        if not model:
            raise SelfAlignError(f"model {ref!r}: stage {ref[1:]!r} did not produce a model")
        return rebased(model, folder)

    def model_key(self, model: str) -> str:
        """How row ids name a model: a model this run trained by its place in the run folder
        (`run:04-engrave/adapter`), so that a run folder moved or copied elsewhere keeps its rows;
        any other model by its reference."""
        try:
            return "run:" + Path(model).resolve().relative_to(Path(self.run_dir).resolve()).as_posix()
        except (ValueError, OSError):
            return model

    def model(self, config: StageConfig, ref: str | None = None) -> str:
        """The model a field names (the stage's own by default); `@label` is what an earlier stage trained."""
        return self.model_for(config, ref)

    # -- the one resolver for earlier stages' outputs: `@label` on any field that takes one -----------------
    def _earlier(self) -> str:
        return ", ".join(self.stage_dirs) or "none"

    def rows_file(self, ref: str, field: str = "data") -> Path:
        """The rows a field names: `@label` (a bare label too, as older recipes wrote it) is an earlier
        stage's rows.jsonl; anything else a JSONL file, or a folder holding rows.jsonl."""
        label = ref[1:] if ref.startswith("@") else ref
        if label in self.stage_dirs:
            path = self.stage_dirs[label] / ROWS_FILE
            if not path.exists():
                raise SelfAlignError(f"{field}: stage {label!r} wrote no rows ({path} is missing)",
                                     "run that stage first")
            return path
        if ref.startswith("@"):
            raise SelfAlignError(f"{field}: {ref} names no earlier stage (earlier: {self._earlier()})",
                                 "put that stage earlier in the recipe or name a file")
        path = Path(ref).expanduser()
        if path.is_dir():
            path = path / ROWS_FILE
        if not path.is_file():
            raise SelfAlignError(f"{field}: {ref!r} is neither an earlier stage (earlier: "
                                 f"{self._earlier()}) nor a JSONL file")
        return path

    def rows(self, ref: str, field: str = "data") -> list[dict]:
        """The rows themselves (see `rows_file`)."""
        return read_jsonl(self.rows_file(ref, field))

    def prompts(self, ref: str, field: str = "prompts") -> list[tuple[str, str]]:
        """(id, prompt) pairs: `@label` reads an earlier stage's rows that have a `prompt` and were kept;
        anything else is a prompt file (`selfalign.core.prompts`)."""
        if ref.startswith("@"):
            rows = [r for r in self.rows(ref, field) if r.get("prompt") and r.get("kept", True)]
            return [(r["id"], r["prompt"]) for r in rows]
        return [(p.id, p.text) for p in load_prompts(ref) if p.text]

    def stage_prompts(self, config) -> list[tuple[str, str]]:
        """The prompts a stage answers: its `prompts` field, capped by its `max_prompts` and the recipe's
        (a seeded sample in order); none at all is an error naming the source."""
        prompts = capped(self.prompts(config.prompts), self.max_prompts(config.max_prompts), self.recipe.seed)
        if not prompts:
            raise SelfAlignError(f"{config.label}: no prompts to answer (from {config.prompts})")
        return prompts

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


def _prepare_run_dir(run_dir: Path) -> None:
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except (NotADirectoryError, FileExistsError) as exc:
        raise SelfAlignError(f"cannot use {run_dir} as a run folder: a file is in the way ({exc.filename})",
                             "choose another --out") from exc
    except OSError as exc:
        raise SelfAlignError(f"cannot write to run folder {run_dir}: {exc.strerror}",
                             "choose a writable --out or free disk space") from exc


def _write_recipe_snapshot(recipe: Recipe, run_dir: Path) -> None:
    snapshot = yaml.safe_dump(recipe.model_dump(mode="json", exclude_none=True, serialize_as_any=True), sort_keys=False)
    recipe_file = run_dir / "recipe.yaml"
    try:
        if recipe_file.exists() and recipe_file.read_text() != snapshot:
            console.print(f"[yellow]note:[/] {recipe_file} differs from this recipe; finished stages whose "
                          "settings did not change are kept (the old recipe is in recipe.previous.yaml)")
            (run_dir / "recipe.previous.yaml").write_text(recipe_file.read_text())
        recipe_file.write_text(snapshot)
    except OSError as exc:
        raise SelfAlignError(f"cannot write to run folder {run_dir}: {exc.strerror}",
                             "choose a writable --out or free disk space") from exc


def load_run_record(recipe: Recipe, run_dir: Path) -> dict:
    """`run.json`, or, when it is missing (a kill before its first write, a deleted file), the record
    rebuilt from the stage folders' done-markers, which hold each stage's summary and wall time. A
    corrupt run.json is a one-line error: deleting it rebuilds it."""
    path = run_dir / "run.json"
    if path.exists():
        try:
            return read_json_object(path, "run record")
        except SelfAlignError as exc:
            raise SelfAlignError(exc.message, "delete it and run again: it is rebuilt from the stage folders") from None
    stages = {}
    for i, config in enumerate(recipe.stages):
        folder = stage_folder(run_dir, i, config)
        try:
            done = read_done(folder)
        except SelfAlignError:
            done = None  # reported when the stage comes up
        if done is not None:
            stages[config.label] = {"wall_s": done.get("wall_s", 0.0), "stage": config.stage, "folder": folder.name,
                                    "summary": {k: v for k, v in done.items() if k not in BOOKKEEPING}}
    return {"name": recipe.name, "stages": stages}


def stage_fingerprints(recipe: Recipe) -> list[tuple[str, dict]]:
    """(fingerprint, settings) of every stage, in order; a stage's depends on the stages it reads."""
    out, earlier = [], {}
    for config in recipe.stages:
        settings = stage_settings(recipe, config, earlier)
        out.append((fingerprint(settings), settings))
        earlier[config.label] = out[-1][0]
    return out


def check_reuse(recipe: Recipe, run_dir: Path, prints: list[tuple[str, dict]], fresh: set[str]) -> int:
    """Before anything runs: every stage an earlier run finished must have been made with this
    recipe's settings, up to the first stage asked `fresh`. Returns that stage's
    index (the number of stages when none is)."""
    labels = [c.label for c in recipe.stages]
    if unknown := sorted(fresh - set(labels)):
        raise SelfAlignError(f"--fresh {unknown[0]}: the recipe has no stage named {unknown[0]!r}",
                             f"stages: {', '.join(labels)}")
    first_fresh = min((labels.index(x) for x in fresh), default=len(labels))
    for i, config in enumerate(recipe.stages[:first_fresh]):
        folder = stage_folder(run_dir, i, config)
        info = read_done(folder)
        if info is None or "fingerprint" not in info:
            continue  # not finished yet (it continues from its rows), or finished by a selfalign without fingerprints
        fp, settings = prints[i]
        if info["fingerprint"] != fp:
            raise SelfAlignError(
                f"stage {config.label!r}: {folder} was made with other settings, so it is not reused; changed: "
                f"{changed_fields(info.get('settings') or {}, settings)}",
                f"redo it and every stage after it with `--fresh {config.label}`, or choose a new --out")
    return first_fresh


def run_recipe(recipe: Recipe, run_dir: Path | None = None, fresh: list[str] | tuple[str, ...] = (), *,
               stages: Mapping[str, Any]) -> dict:
    """Run every unfinished stage of `recipe`; return the run record (also in `run.json`).
    `fresh` names stages to redo from scratch, with every stage after them (their folders are deleted).
    `stages` maps a stage kind to its module (`run(ctx, config, folder)`): `selfalign.stages.STAGES`."""

    run_dir = Path(run_dir or recipe.run_dir())
    check_references(recipe, recipe.name)
    _prepare_run_dir(run_dir)
    prints = stage_fingerprints(recipe)
    first_fresh = check_reuse(recipe, run_dir, prints, set(fresh))
    for i, config in enumerate(recipe.stages[first_fresh:], start=first_fresh):
        folder = stage_folder(run_dir, i, config)
        if folder.exists():
            console.print(f"[yellow]--fresh:[/] deleting {folder}")
            shutil.rmtree(folder)
    _write_recipe_snapshot(recipe, run_dir)
    record = load_run_record(recipe, run_dir)
    for label in [c.label for c in recipe.stages[first_fresh:]]:
        record["stages"].pop(label, None)
    ledger = build_ledger(recipe)  # an unreadable input stops the run here, before any stage
    record.update(model=recipe.model, engine=recipe.engine.name, seed=recipe.seed, inputs=ledger["inputs"],
                  supervision={k: ledger[k] for k in ("words", "lines", "not_counted")},
                  started_at=record.get("started_at") or time.strftime("%Y-%m-%dT%H:%M:%S"))
    ctx = RunContext(recipe=recipe, run_dir=run_dir)
    try:
        for i, (config, (fp, settings)) in enumerate(zip(recipe.stages, prints, strict=True)):
            folder = stage_folder(run_dir, i, config)
            ctx.stage_dirs[config.label] = folder
            title = f"[{i + 1}/{len(recipe.stages)}] {config.label}"
            if read_done(folder) is not None:
                console.print(f"[dim]{title}: done earlier, skipped ({folder})[/]")
                continue
            console.rule(f"[bold]{title}")
            t0 = time.time()
            ctx.current = config
            if launched(recipe, config):  # a training stage under `accelerate launch`, in a child process
                summary = run_launched(ctx, config, folder, fp)
            else:
                summary = stages[config.stage].run(ctx, config, folder) or {}
            entry = record["stages"].setdefault(config.label, {"wall_s": 0.0})
            entry.update(stage=config.stage, folder=folder.name, summary=summary)
            entry["wall_s"] = round(entry.get("wall_s", 0.0) + time.time() - t0, 2)
            # the stage's own marker (its summary, e.g. the `model` a training stage wrote) gains the fingerprint
            done = read_done(folder) or {"finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **summary}
            write_json_atomic(folder / DONE_FILE,
                              {**done, "fingerprint": fp, "settings": settings, "wall_s": entry["wall_s"]})
            write_json_atomic(run_dir / "run.json", record)
            console.print(f"  done in {time.time() - t0:.1f} s: {summary}")
        # written after each stage and once at the end (a rebuilt record when every stage was skipped), never
        # before a stage has finished: a run that stops on a bad input leaves run.json as it was
        write_json_atomic(run_dir / "run.json", record)
    finally:
        ctx.close()
    return record
