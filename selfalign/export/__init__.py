"""`selfalign export`: turn a run's trained model into files other tools load.

A run ends with a LoRA adapter (or a model folder) inside a stage folder, next to a
`selfalign_base.json` only selfalign reads. Export writes what the rest of the ecosystem expects:

- a plain Hugging Face folder: the adapter merged into its base (PEFT `merge_and_unload`) as
  safetensors, or with `adapter_only` the PEFT adapter as it is (its `adapter_config.json` then
  names the base's resolved folder);
- the tokenizer with the plain-transcript chat template (`selfalign.core.chat.plain_chat_template`),
  so `apply_chat_template` renders what training rendered;
- `generation_config.json` with the EOS token and the transcript's stop strings (`stop_strings`,
  which `generate(..., tokenizer=...)` honours);
- a model card `README.md` (`selfalign.export.card`);
- optionally one GGUF file (`selfalign.export.gguf_writer`) and an Ollama `Modelfile`.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from selfalign.core.chat import PLAIN_STOPS, attach_plain_template
from selfalign.core.errors import SelfAlignError
from selfalign.core.store import DONE_FILE


def is_run_folder(path: Path) -> bool:
    return (path / "run.json").exists() or (path / "recipe.yaml").exists()


def _is_causal_lm(model_path: Path) -> bool:
    """A chat model, not a reward model: a PEFT adapter for CAUSAL_LM or a *ForCausalLM folder."""
    adapter_cfg = model_path / "adapter_config.json"
    if adapter_cfg.exists():
        return json.loads(adapter_cfg.read_text()).get("task_type") == "CAUSAL_LM"
    cfg = model_path / "config.json"
    if cfg.exists():
        return any(a.endswith("ForCausalLM") for a in json.loads(cfg.read_text()).get("architectures") or [])
    return False


def trained_models(run_dir: Path) -> list[tuple[str, Path]]:
    """(stage label, model folder) of every finished stage that trained a chat model, in run order."""
    found = []
    for done in sorted(run_dir.glob(f"[0-9][0-9]-*/{DONE_FILE}")):
        model = json.loads(done.read_text()).get("model")
        if model and Path(model).exists() and _is_causal_lm(Path(model)):
            found.append((done.parent.name.split("-", 1)[1], Path(model)))
    return found


def run_model(run_dir: Path, stage: str | None = None) -> tuple[str, Path]:
    """The run's model to export or chat with: the last trained chat model, or stage `stage`'s."""
    found = trained_models(run_dir)
    if stage is not None:
        for label, path in found:
            if label == stage:
                return label, path
        names = ", ".join(label for label, _ in found) or "none"
        raise SelfAlignError(f"{run_dir}: no finished stage {stage!r} with a trained model",
                             f"stages with a model: {names}")
    if not found:
        raise SelfAlignError(f"{run_dir}: no finished stage has trained a model yet",
                             "run the recipe until a training stage (engrave, sft, ...) is done")
    return found[-1]


def resolve_model_arg(target: str, stage: str | None = None) -> tuple[str, Path | None]:
    """A RUN folder becomes its final (or `stage`'s) model path; anything else is a model reference."""
    path = Path(target).expanduser()
    if path.is_dir() and is_run_folder(path):
        return str(run_model(path, stage)[1]), path
    if stage is not None:
        raise SelfAlignError(f"--stage needs a run folder, and {target} is not one (no run.json)")
    return target, None


def source_gguf(resolved) -> Path | None:
    """The GGUF a model (or an adapter's base) was converted from, if selfalign converted it."""
    from selfalign.core.models import MARKER

    base = resolved.base if resolved.kind == "peft" else resolved
    marker = Path(base.path) / MARKER
    if marker.exists():
        src = json.loads(marker.read_text()).get("gguf")
        if src and Path(src).exists():
            return Path(src)
    return None


def write_generation_config(model, tokenizer, folder: Path) -> None:
    """EOS and pad ids plus the transcript stop strings; sampling stays the library default."""
    gen = model.generation_config
    gen.eos_token_id = tokenizer.eos_token_id
    gen.bos_token_id = tokenizer.bos_token_id
    gen.pad_token_id = tokenizer.pad_token_id
    gen.stop_strings = list(PLAIN_STOPS)
    gen.save_pretrained(folder)


def modelfile_text(gguf_name: str, system: str | None = None) -> str:
    """An Ollama Modelfile whose Go template renders the same Human/Assistant transcript."""
    template = (
        '{{- range $i, $m := .Messages }}{{ if $i }}\n\n{{ end }}'
        '{{- if eq $m.Role "system" }}{{ $m.Content }}'
        '{{- else if eq $m.Role "user" }}Human: {{ $m.Content }}'
        '{{- else if eq $m.Role "assistant" }}Assistant: {{ $m.Content }}{{ end }}'
        '{{- end }}\n\nAssistant:'
    )
    lines = [
        "# Ollama: `ollama create NAME -f Modelfile`, then `ollama run NAME`.",
        "# The template renders the plain Human:/Assistant: transcript the model was trained on.",
        f"FROM ./{gguf_name}",
        f'TEMPLATE """{template}"""',
        '# the model would otherwise go on to write the user\'s next turn itself',
        'PARAMETER stop "Human:"',
    ]
    if system:
        lines.append(f'SYSTEM """{system}"""')
    return "\n".join(lines) + "\n"


def export(target: str, to: str | Path, stage: str | None = None, adapter_only: bool = False,
           gguf: str | None = None) -> dict:
    """Export a run's model (or any model reference) into `to`; returns what was written."""
    from selfalign.core.models import load_model, resolve
    from selfalign.export.card import model_card
    from selfalign.export.gguf_writer import FORMATS, gguf_arch, write_gguf

    if gguf is not None and gguf not in FORMATS:
        raise SelfAlignError(f"unknown --gguf format {gguf!r}", f"use one of {', '.join(FORMATS)}")
    ref, run_dir = resolve_model_arg(target, stage)
    resolved = resolve(ref)
    if adapter_only and resolved.kind != "peft":
        raise SelfAlignError(f"--adapter-only: {ref} is not a PEFT adapter", "export without --adapter-only")
    out = Path(to).expanduser()
    if out.exists() and any(out.iterdir()) and not (out / "config.json").exists() and not (
            out / "adapter_config.json").exists():
        raise SelfAlignError(f"{out} exists and is not an earlier export", "choose an empty or new --to folder")
    model, tokenizer = load_model(resolved, device="cpu", dtype="float32")
    if resolved.kind == "peft":
        model_type = model.get_base_model().config.model_type
    else:
        model_type = model.config.model_type
    if gguf:
        gguf_arch(model_type)  # fail before writing anything
    attach_plain_template(tokenizer)
    out.mkdir(parents=True, exist_ok=True)
    written = {"folder": str(out)}
    if adapter_only:
        shutil.copytree(resolved.path, out, dirs_exist_ok=True)
        (out / "selfalign_base.json").unlink(missing_ok=True)
        cfg_path = out / "adapter_config.json"
        cfg = json.loads(cfg_path.read_text())
        cfg["base_model_name_or_path"] = resolved.base.path if resolved.base.kind != "hub" else resolved.base.ref
        cfg_path.write_text(json.dumps(cfg, indent=2))
        tokenizer.save_pretrained(out)
        merged = model.merge_and_unload() if gguf else None
    else:
        merged = model.merge_and_unload() if resolved.kind == "peft" else model
        merged.save_pretrained(out, safe_serialization=True)
        tokenizer.save_pretrained(out)
        write_generation_config(merged, tokenizer, out)
    if gguf:
        name = f"model-{gguf}.gguf"
        write_gguf(merged, tokenizer, out / name, gguf, name=out.name, chat_template=tokenizer.chat_template,
                   source_gguf=source_gguf(resolved))
        (out / "Modelfile").write_text(modelfile_text(name))
        written.update(gguf=str(out / name), modelfile=str(out / "Modelfile"))
    (out / "README.md").write_text(model_card(ref, resolved, run_dir, adapter_only=adapter_only, gguf=gguf))
    return written
