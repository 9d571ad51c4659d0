"""Supervised fine-tuning examples: the prompt/completion pair a demonstration becomes, and the one
call that writes them beside the model and trains on them. Principle engraving, verbose cloning
and ALMoST's SFT all train this way; only where their demonstrations come from differs."""

from __future__ import annotations

from pathlib import Path

from selfalign.core.chat import render_plain
from selfalign.core.training import lora_settings, sft_train, write_examples


def training_example(system: str, prompt: str, answer: str, eos: str) -> dict:
    """The plain transcript `<system>\\n\\nHuman: <prompt>\\n\\nAssistant:` and the answer after it
    (a leading space, the tokenizer's end-of-text appended): the loss falls on the completion only."""
    text = render_plain([{"role": "system", "content": system}, {"role": "user", "content": prompt}])
    return {"prompt": text, "completion": " " + answer.strip() + eos}


def train_on_examples(ctx, config, base: str, examples: list[dict], folder: Path, **settings) -> dict:
    """Write `examples.jsonl` (exactly what is trained on) into `folder`, then fine-tune `base` on the
    examples' prompt/completion there with the stage's training fields (lora, r, alpha, dropout, lr,
    epochs, max_length, batch_size, grad_accum, warmup_ratio, merge); `settings` adds `sft_train`'s others."""
    write_examples(folder, examples)
    ctx.free_accelerator()
    return sft_train(base, [{"prompt": e["prompt"], "completion": e["completion"]} for e in examples], folder,
                     lora=lora_settings(config), lr=config.lr, epochs=config.epochs, max_length=config.max_length,
                     batch_size=config.batch_size, grad_accum=config.grad_accum, warmup_ratio=config.warmup_ratio,
                     seed=ctx.recipe.seed, merge=config.merge, **settings)
