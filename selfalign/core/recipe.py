"""Recipes: YAML files that name the model, the engine and the stages of a run, in order.

    name: quickstart
    model: embedded:gemma-3-270m
    engine: {name: hf, batch_size: 8}
    stages:
      - stage: generate
        prompts: builtin:quickstart
        sampling: {temperature: 0.7, max_new_tokens: 96}

Every mapping is a typed pydantic model that rejects unknown keys. Errors name the file, the key
path (`stages[0].sampling.temprature`) and what was expected, in one line each.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar, Literal, get_args

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from selfalign.core.errors import SelfAlignError
from selfalign.core.inputs import SAFE_NAME, read_yaml
from selfalign.core.launcher import LauncherConfig
from selfalign.core.models import DEFAULT_MODEL


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")

    # Fields that came to count in the fingerprint after run folders existed, each with the value that
    # makes the rows an older selfalign made: left out of the fingerprint at that value, so an upgrade
    # does not redo a finished stage whose rows would come out the same (any other value counts).
    added_later: ClassVar[dict[str, Any]] = {}

    def departures_from_old(self) -> dict[str, Any]:
        """The `added_later` fields set away from the older behaviour, with their values: what keys a
        cache or a row apart from what an older selfalign made."""
        return {key: getattr(self, key) for key, old in self.added_later.items() if getattr(self, key) != old}

    @model_validator(mode="before")
    @classmethod
    def _partial_blocks_keep_defaults(cls, data: Any) -> Any:
        """`sampling: {max_new_tokens: 64}` or `train: {epochs: 3}` changes that one setting: the stage's
        other defaults (e.g. its paper temperature and top-p, its paper learning rate) stay, rather than
        falling back to the block's own."""
        if not isinstance(data, dict):
            return data
        data = dict(data)
        for name, field in cls.model_fields.items():
            given = data.get(name)
            if isinstance(given, dict) and field.default_factory is not None:
                default = field.default_factory()
                if isinstance(default, BaseModel):
                    data[name] = {**default.model_dump(exclude_unset=False), **given}
        return data


PARALLELISM = ("tensor_parallel_size", "pipeline_parallel_size", "data_parallel_size")


class EngineConfig(Strict):
    """Which engine runs the models, and its options (each engine ignores the others' options)."""

    name: Literal["hf", "openai", "vllm"] = Field(
        "hf", description="hf (transformers), vllm (GPU, or vLLM's CPU build) or openai (a server)"
    )
    device: str = Field("auto", description="hf: auto, cpu, cuda, cuda:1, ...")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="auto: bf16 on GPU, fp32 on CPU. bfloat16 on a CPU with AMX (Intel Xeon 4th gen and "
        "later) generates about 1.9x faster at batch 64 (benchmarks/bench_throughput.py --hf-dtype bfloat16), "
        "with log-probabilities ~0.1% off float32's and other samples. In bfloat16 a row's text can depend on the "
        "batch it ran in (greedy: 9 of 64 rows differed between batches of 64 and 16), so a resumed run is not "
        "bit-identical to an uninterrupted one; float32 rows are. Off by default")
    # another dtype makes other numbers (bfloat16 on a CPU: other samples, scores ~0.1% off), so it counts;
    # auto, what every run made before it counted, does not
    added_later: ClassVar[dict[str, Any]] = {"dtype": "auto"}
    batch_size: int | None = Field(None, ge=1,
                                   description="requests per generation batch (default: 8 on CPU, 32 on GPU)")
    chat_format: Literal["plain", "model"] = Field("plain",
                                                   description="plain Human:/Assistant: text, or the "
                                                               "model's chat template")
    trust_remote_code: bool = Field(False, description="allow a hub model's own code to run (off unless you trust it)")
    base_url: str | None = Field(None,
                                 description="openai: server URL, default $OPENAI_BASE_URL or http://127.0.0.1:8000/v1")
    api_key_env: str = Field("OPENAI_API_KEY", description="openai: environment variable holding the API key")
    max_concurrency: int = Field(8, ge=1, description="openai: requests in flight at once")
    gpu_memory_utilization: float | None = Field(
        None, gt=0, le=1, description="vllm: fraction of GPU memory to use (default 0.85); on vLLM's CPU build, "
        "the fraction of RAM (default: a fixed KV cache, a quarter of free RAM, at most 4 GiB)")
    # vLLM's own parallelism, passed to vllm.LLM as they are; they change where the work runs, not the rows
    # (each request's seed comes from the sampling seed and its prompt), so they are not in a stage's fingerprint
    tensor_parallel_size: int | None = Field(None, ge=1,
                                             description="vllm: GPUs each model is split across (tensor parallel)")
    pipeline_parallel_size: int | None = Field(None, ge=1,
                                               description="vllm: pipeline stages the layers are split into")
    data_parallel_size: int | None = Field(None, ge=1,
                                           description="vllm: model replicas serving the requests (data parallel)")

    @model_validator(mode="after")
    def _parallelism_needs_vllm(self) -> EngineConfig:
        given = [f for f in PARALLELISM if getattr(self, f) is not None]
        if given and self.name != "vllm":
            raise ValueError(f"{given[0]} is a vllm setting; the {self.name} engine runs each model in one process "
                             "(use engine: {name: vllm}, or `workers:` on a generation stage to spread it over Ray)")
        return self

    def options(self) -> dict[str, Any]:
        """Keyword arguments for `make_engine` for the chosen engine."""
        common = {"chat_format": self.chat_format, "batch_size": self.batch_size}
        if self.name == "hf":
            return {**common, "device": self.device, "dtype": self.dtype, "trust_remote_code": self.trust_remote_code}
        if self.name == "vllm":
            return {**common, "dtype": self.dtype, "trust_remote_code": self.trust_remote_code,
                    "gpu_memory_utilization": self.gpu_memory_utilization,
                    **{f: getattr(self, f) for f in PARALLELISM if getattr(self, f) is not None}}
        return {**common, "base_url": self.base_url, "api_key_env": self.api_key_env,
                "max_concurrency": self.max_concurrency}


class StageConfig(Strict):
    """Fields every stage has; each stage module subclasses this with its own settings."""

    stage: str
    name: str | None = Field(None, description="folder name of the stage in the run (default: the stage type)")
    model: str | None = Field(None, description="model reference for this stage (default: the recipe's model)")
    # generation stages only (checked at load); where the rows are made, not what they are: not fingerprinted
    workers: int | None = Field(None, ge=1, description="generation stages: Ray workers sharing the stage's rows "
                                "(pip install 'selfalign[ray]'); 1 or unset: this process")
    ray_address: str | None = Field(None, description="generation stages: a running Ray cluster to use ('auto', "
                                    "'ray://host:10001'); unset with workers > 1: a local one")

    @field_validator("name")
    @classmethod
    def _plain_name(cls, value: str | None) -> str | None:
        return _plain(value)

    @property
    def label(self) -> str:
        return self.name or self.stage

    def human_inputs(self) -> list[tuple[str, str]]:
        """(source, text) of every human-written input this stage uses: prompt files, system
        prompts, principles, exemplars. The run report counts their lines: the papers' point is
        how little of it there is."""
        return []


def _plain(value: str | None) -> str | None:
    """A name that becomes a folder: letters, digits, `_ . -` only, so it cannot climb out of the run."""
    if value is not None and (not SAFE_NAME.fullmatch(value) or ".." in value):
        raise ValueError("use letters, digits, '_', '.' and '-' only (no '/', no '..', at most 100)")
    return value


class Recipe(Strict):
    name: str = Field(..., description="run name; the default run folder is runs/<name>")
    description: str = ""
    model: str = Field(DEFAULT_MODEL, min_length=1,
                       description="the base model every stage uses unless it names its own")
    engine: EngineConfig = Field(default_factory=EngineConfig)
    seed: int = Field(0, description="seed for sampling and training")
    out: str | None = Field(None, description="run folder (default runs/<name>)")
    max_prompts: int | None = Field(None, ge=1, description="cap on prompts per stage, for quick runs")
    stages: list[StageConfig] = Field(..., min_length=1)
    launcher: LauncherConfig | None = Field(None, description="run training stages under `accelerate launch` "
                                            "(an accelerate config and a number of processes)")

    @field_validator("name")
    @classmethod
    def _plain_name(cls, value: str) -> str:
        return _plain(value)

    def run_dir(self) -> Path:
        return Path(self.out or f"runs/{self.name}")


# -- error formatting -----------------------------------------------------------------------------
def _model_class(annotation) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in get_args(annotation):
        if (cls := _model_class(arg)) is not None:
            return cls
    return None


def _class_at(cls: type[BaseModel], loc: tuple) -> type[BaseModel] | None:
    for part in loc:
        if isinstance(part, int):
            continue
        field = cls.model_fields.get(part)
        if field is None or (cls := _model_class(field.annotation)) is None:
            return None
    return cls


def _moved_under_train(parent: type[BaseModel] | None, key: Any) -> str | None:
    """`train.KEY` when `parent` has a `train:` block holding `key`: a recipe written before the
    training settings moved into one block (lr, epochs, lora, ... at the stage's top level)."""
    train = parent.model_fields.get("train") if parent else None
    block = _model_class(train.annotation) if train else None
    return f"train.{key}" if block is not None and key in block.model_fields else None


def _loc_str(loc: tuple) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def format_validation_error(source: str, exc: ValidationError, cls: type[BaseModel], prefix: tuple = ()) -> str:
    lines = []
    for err in exc.errors():
        loc = tuple(err["loc"])
        where = _loc_str(prefix + loc)
        if err["type"] == "extra_forbidden":
            parent = _class_at(cls, loc[:-1])
            if moved := _moved_under_train(parent, loc[-1]):
                lines.append(f"{source}: {where}: a training setting: move it under train: ({moved})")
                continue
            allowed = ", ".join(parent.model_fields) if parent else "?"
            lines.append(f"{source}: {where}: unknown key (expected one of: {allowed})")
        elif err["type"] == "missing":
            lines.append(f"{source}: {where}: required key is missing")
        else:
            msg = str(err["msg"]).removeprefix("Value error, ")
            lines.append(f"{source}: {where}: {msg} (got {err.get('input')!r})")
    return "\n".join(lines)


# -- loading --------------------------------------------------------------------------------------
def parse_recipe(data: Any, source: str = "<recipe>", overrides: dict[str, Any] | None = None, *,
                 stages: Mapping[str, Any]) -> Recipe:
    """Validate a recipe mapping; `overrides` (from the CLI) win over the file. `stages` maps a stage
    kind to its module (its `Config` validates the stage's keys): `selfalign.stages.STAGES`, handed
    in from above so that core never imports the stages."""
    if not isinstance(data, dict):
        raise SelfAlignError(f"{source}: a recipe must be a mapping of keys (name, model, stages, ...)")
    data = dict(data)
    for key, value in (overrides or {}).items():
        if value is None:
            continue
        if key == "engine":
            eng = data.get("engine") or {}
            data["engine"] = {**eng, "name": value} if isinstance(eng, dict) else {"name": value}
        else:
            data[key] = value
    raw_stages = data.pop("stages", None)
    if not isinstance(raw_stages, list) or not raw_stages:
        raise SelfAlignError(f"{source}: stages: a recipe needs a non-empty list of stages")
    configs: list[StageConfig] = []
    for i, raw in enumerate(raw_stages):
        if not isinstance(raw, dict) or "stage" not in raw:
            raise SelfAlignError(f"{source}: stages[{i}]: each stage needs a 'stage' key (one of: {', '.join(stages)})")
        kind = raw["stage"]
        if kind not in stages:
            raise SelfAlignError(f"{source}: stages[{i}].stage: unknown stage {kind!r} (expected one of: "
                                 f"{', '.join(stages)})")
        config_cls = stages[kind].Config
        try:
            configs.append(config_cls.model_validate(raw))
        except ValidationError as exc:
            raise SelfAlignError(format_validation_error(source, exc, config_cls, ("stages", i))) from None
    try:
        recipe = Recipe.model_validate({**data, "stages": configs})
    except ValidationError as exc:
        raise SelfAlignError(format_validation_error(source, exc, Recipe)) from None
    from selfalign.core.distributed import check_workers
    from selfalign.core.launcher import check_launcher

    check_workers(recipe, stages, source)
    check_launcher(recipe, source)
    labels = [s.label for s in recipe.stages]
    if dupes := sorted({x for x in labels if labels.count(x) > 1}):
        raise SelfAlignError(f"{source}: stages: two stages share the name {dupes[0]!r}; give one a distinct `name`")
    return recipe


def references(value: Any, path: str = "") -> list[tuple[str, str]]:
    """(field path, `@label`) of every reference to a stage's output among a config's values."""
    if isinstance(value, str):
        return [(path, value)] if value.startswith("@") else []
    if isinstance(value, dict):
        return [r for k, v in value.items() for r in references(v, f"{path}.{k}" if path else str(k))]
    if isinstance(value, list):
        return [r for i, v in enumerate(value) for r in references(v, f"{path}[{i}]")]
    return []


def check_references(recipe: Recipe, source: str = "<recipe>") -> None:
    """Every `@label` (in any field, defaults included, and the recipe's model) must name a stage that
    runs earlier in the same recipe: checked when a recipe is loaded and before a run starts, so a
    typo fails in a second rather than after hours of earlier stages."""
    order = {config.label: i for i, config in enumerate(recipe.stages)}
    for i, config in enumerate(recipe.stages):
        found = references(config.model_dump(mode="json"))
        if config.model is None and recipe.model.startswith("@"):
            found.append(("model", recipe.model))
        for field, ref in found:
            at = order.get(ref[1:])
            if at is None:
                raise SelfAlignError(f"{source}: stages[{i}].{field}: {ref} names no stage of this recipe "
                                     f"(stages: {', '.join(order)})", "name an earlier stage, or a file or model")
            if at >= i:
                raise SelfAlignError(f"{source}: stages[{i}].{field}: {ref} names a stage that runs "
                                     f"{'at the same time' if at == i else 'later'} ({ref[1:]!r} is stage {at + 1}, "
                                     f"{config.label!r} is stage {i + 1})", "stages run in order: move it earlier")


def builtin_recipes_dir() -> Path:
    """`selfalign/recipes/`: package data, so an installed wheel has them as a checkout does."""
    return Path(__file__).resolve().parent.parent / "recipes"


def find_recipe(ref: str | None) -> Path:
    """A path, or the name of a shipped recipe (`quickstart`, `self_align`, ...)."""
    ref = ref or "quickstart"
    path = Path(ref)
    if path.exists():
        return path
    shipped = builtin_recipes_dir() / (ref if ref.endswith(".yaml") else f"{ref}.yaml")
    if shipped.exists():
        return shipped
    names = sorted(p.stem for p in builtin_recipes_dir().glob("*.yaml"))
    raise SelfAlignError(f"recipe {ref!r} not found", f"pass a YAML path or one of: {', '.join(names)}")


def load_recipe(ref: str | Path | None = None, overrides: dict[str, Any] | None = None, *,
                stages: Mapping[str, Any]) -> Recipe:
    path = find_recipe(str(ref) if ref else None)
    data = read_yaml(path, "recipe")
    if data is None:
        raise SelfAlignError(f"{path}: the recipe file is empty")
    recipe = parse_recipe(data, str(path), overrides, stages=stages)
    check_references(recipe, str(path))
    return recipe
