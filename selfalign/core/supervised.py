"""Supervised fine-tuning examples: the prompt/completion pair a demonstration becomes, the rows a
stage trains on, and the one call that writes the examples beside the model, trains on them and
marks the stage done. Principle engraving, verbose cloning and ALMoST's SFT all train this way;
only where their demonstrations come from differs."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from selfalign.core.chat import render_plain
from selfalign.core.errors import SelfAlignError
from selfalign.core.progress import console
from selfalign.core.store import RowStore, read_jsonl
from selfalign.core.training import sft_train, write_examples


def training_example(system: str, prompt: str, answer: str, eos: str) -> dict:
    """The plain transcript `<system>\\n\\nHuman: <prompt>\\n\\nAssistant:` and the answer after it
    (a leading space, the tokenizer's end-of-text appended): the loss falls on the completion only."""
    text = render_plain([{"role": "system", "content": system}, {"role": "user", "content": prompt}])
    return {"prompt": text, "completion": " " + answer.strip() + eos}


def kept_rows(rows: list[dict], usable: Callable[[dict], bool], unusable: str) -> tuple[list[dict], dict]:
    """The rows an earlier stage did not reject (`kept: false`) that `usable` accepts, and counts of
    the rest: `{"not kept": n, unusable: m}`."""
    out, skipped = [], {"not kept": 0, unusable: 0}
    for row in rows:
        if row.get("kept", True) is False:
            skipped["not kept"] += 1
        elif not usable(row):
            skipped[unusable] += 1
        else:
            out.append(row)
    return out, skipped


def training_rows(ctx, data: str, select: Callable[[list[dict]], tuple[list[dict], dict]], cap: int | None,
                  none_left: str) -> tuple[Path, list[dict], dict]:
    """(source file, rows to train on, counts of the skipped) of a stage's `data` (`@stage` or a JSONL
    file): `select` picks the rows, then at most `cap` (or the recipe's max_prompts) are kept. No row
    left is an error: `SOURCE: none_left`, with the counts and the `data` it read as the hint."""
    source = ctx.rows_file(data)
    rows, skipped = select(read_jsonl(source))
    if limit := ctx.max_prompts(cap):
        rows = rows[:limit]
    if not rows:
        raise SelfAlignError(f"{source}: {none_left}", f"skipped: {skipped}; data: is set to {data!r}")
    return source, rows, skipped


def train_on_examples(ctx, config, examples: list[dict], folder: str | Path, note: str, **summary) -> dict:
    """The end of a supervised stage: print `note`, write `examples.jsonl` (exactly what is trained on)
    into `folder`, fine-tune the stage's model on the examples' prompt/completion there with its
    `train:` settings and the recipe's seed, and mark the stage done with the trainer's summary, the
    base model and `summary` (the stage's own counts), which it returns."""
    base = ctx.model_for(config)
    store = RowStore(folder)  # the done-marker lives beside the examples and the model
    console.print(note)
    write_examples(folder, examples)
    ctx.free_accelerator()
    result = sft_train(base, [{"prompt": e["prompt"], "completion": e["completion"]} for e in examples], folder,
                       config.train, ctx.recipe.seed)
    summary = {**result, "base": base, **summary}
    store.mark_done(**summary)
    return summary
