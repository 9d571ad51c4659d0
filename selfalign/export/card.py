"""The model card (`README.md`) an export carries: what the model is, how it was made, with how
much human supervision, and how it scored, with 95% intervals where a score is a proportion."""

from __future__ import annotations

import json
import math
from pathlib import Path

import yaml

from selfalign.core.store import DONE_FILE


def wilson_interval(p: float, n: int, z: float = 1.96) -> tuple[float, float]:
    """The Wilson score interval of a proportion `p` observed on `n` items (95% for z = 1.96)."""
    if n <= 0:
        return (0.0, 1.0)
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return (max(0.0, centre - half), min(1.0, centre + half))


def eval_rows(run_dir: Path) -> list[dict]:
    """One row per (eval stage, eval, metric) overall score found in the run's eval results."""
    rows = []
    for results in sorted(run_dir.glob("[0-9][0-9]-*/results.json")):
        if not (results.parent / DONE_FILE).exists():
            continue
        data = json.loads(results.read_text())
        for name, ev in (data.get("evals") or {}).items():
            counts = ev.get("counts") or {}
            for metric, values in (ev.get("metrics") or {}).items():
                value = values.get("overall") if isinstance(values, dict) else values
                if not isinstance(value, int | float) or metric.endswith("margin"):
                    continue
                n = counts.get("overall") if isinstance(counts, dict) else None
                interval = wilson_interval(value, n) if n and 0 <= value <= 1 else None
                rows.append({"stage": results.parent.name.split("-", 1)[1], "eval": name, "metric": metric,
                             "value": value, "n": n, "interval": interval})
    return rows


def _eval_table(rows: list[dict]) -> str:
    if not rows:
        return "No evaluation ran in this run.\n"
    out = ["| stage | eval | metric | score | 95% interval | items |", "|---|---|---|---:|---|---:|"]
    for r in rows:
        iv = f"{r['interval'][0]:.3f}–{r['interval'][1]:.3f}" if r["interval"] else ""
        out.append(f"| {r['stage']} | {r['eval']} | {r['metric']} | {r['value']:.3f} | {iv} | {r['n'] or ''} |")
    return "\n".join(out) + "\n"


def _ledger(inputs: list[dict]) -> str:
    if not inputs:
        return "The run recorded no human-written inputs.\n"
    out = ["| human-written input | lines | words |", "|---|---:|---:|"]
    out += [f"| {i['source']} | {i['lines']} | {i['words']} |" for i in inputs]
    out.append(f"| **total** | {sum(i['lines'] for i in inputs)} | {sum(i['words'] for i in inputs)} |")
    return "\n".join(out) + "\n"


def model_card(ref: str, resolved, run_dir: Path | None, adapter_only: bool = False, gguf: str | None = None) -> str:
    """Markdown for the export's README.md."""
    base = resolved.base.ref if resolved.kind == "peft" else None
    run = json.loads((run_dir / "run.json").read_text()) if run_dir and (run_dir / "run.json").exists() else {}
    recipe_file = run_dir / "recipe.yaml" if run_dir else None
    recipe = yaml.safe_load(recipe_file.read_text()) if recipe_file and recipe_file.exists() else {}
    stages = [s.get("name") or s.get("stage") for s in recipe.get("stages", [])]
    parts = [
        "---\nlibrary_name: transformers\ntags: [selfalign, alignment]\n---\n",
        f"# {run.get('name') or Path(ref).name} (aligned with selfalign)\n",
        f"- base model: `{run.get('model') or base or ref}`",
        f"- exported model: `{ref}`" + (" (PEFT adapter)" if adapter_only else " (LoRA merged into the base)"
                                          if resolved.kind == "peft" else ""),
        (f"- recipe: `{recipe.get('name', '?')}`: {recipe.get('description', '')}" if recipe
         else "- recipe: none recorded"),
        f"- stages: {', '.join(stages)}" if stages else "",
        f"- GGUF: `model-{gguf}.gguf` and an Ollama `Modelfile`" if gguf else "",
        "",
        "## Prompt format\n",
        "The model was trained on a plain transcript; the tokenizer's chat template renders it, so "
        "`tokenizer.apply_chat_template(messages, add_generation_prompt=True)` gives the training format:\n",
        "```\n<system text>\n\nHuman: <user turn>\n\nAssistant: <reply>\n\nHuman: <user turn>\n\nAssistant:\n```\n",
        "Stop generating at `\\nHuman:` (set as `stop_strings` in generation_config.json; pass "
        "`tokenizer=` to `generate` for it to apply).\n",
        "## Supervision ledger\n",
        "Everything a human wrote that the run used (no preference labels, no stronger model):\n",
        _ledger(run.get("inputs") or []),
        "## Evaluation\n",
        _eval_table(eval_rows(run_dir)) if run_dir else "Exported from a model reference, not a run: no evaluations.\n",
    ]
    if recipe:
        parts += ["## Recipe\n", "```yaml\n" + yaml.safe_dump(recipe, sort_keys=False) + "```\n"]
    return "\n".join(p for p in parts if p is not None) + "\n"
