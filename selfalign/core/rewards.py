"""Scalar reward models, as TRL's RewardTrainer produces them.

A reward model is an `AutoModelForSequenceClassification` with `num_labels=1`: the score of a
text is the head's output at the last non-pad token (transformers' own pooling, the same reading
TRL trained with). `RewardModel` loads one from a `save_pretrained` folder, or from a PEFT adapter
folder (task type SEQ_CLS) on top of its base, which is loaded as a sequence classifier too (its
`score` head then comes from the adapter's `modules_to_save`).

The text a reward model reads is built by `reward_text`: the dialogue in the plain
"Human: ...\\n\\nAssistant:" format, a space, the reply, then EOS; it is tokenized the way TRL
does (with the tokenizer's special tokens) and truncated from the LEFT to `max_length` tokens, so
the reply and its end are what the model always sees.

Simplifications:
- the reply is stripped of surrounding whitespace (as `render_plain` strips every turn);
- the plain format is always used, whatever chat template the tokenizer may have;
- a leading BOS survives left truncation (models such as gemma break without it), so a truncated
  text is BOS + its last `max_length - 1` tokens;
- texts are right-padded in batches of `batch_size`, sorted by length; nothing is cached.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

from selfalign.core.chat import Request, render_plain
from selfalign.core.errors import SelfAlignError


def reward_text(prompt: Request, response: str, eos: str | None) -> str:
    """The text a reward model scores: plain-format dialogue + " " + reply + EOS."""
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
    return render_plain(messages) + " " + str(response).strip() + (eos or "")


def truncate_left(ids: list[int], max_length: int, bos_id: int | None = None) -> list[int]:
    """The last `max_length` tokens; a leading BOS is kept in front of them."""
    if len(ids) <= max_length:
        return list(ids)
    if bos_id is not None and ids and ids[0] == bos_id and max_length > 1:
        return [bos_id] + ids[len(ids) - (max_length - 1):]
    return ids[len(ids) - max_length:]


def encode_reward(tokenizer, prompt: Request, response: str, max_length: int) -> list[int]:
    """Token ids of `reward_text`, with the tokenizer's special tokens, truncated from the left."""
    ids = tokenizer(reward_text(prompt, response, tokenizer.eos_token), add_special_tokens=True)["input_ids"]
    return truncate_left(ids, max_length, tokenizer.bos_token_id)


def _load_seq_cls(ref: str, device: str, dtype: str):
    """(model, tokenizer) of a scalar-head sequence classifier, or of a SEQ_CLS PEFT adapter on its base."""
    import json

    from transformers import AutoModelForSequenceClassification
    from transformers.utils import logging as hf_logging

    from selfalign.core.models import _from_pretrained, load_tokenizer, pick_device, pick_dtype, resolve

    hf_logging.disable_progress_bar()
    resolved = resolve(ref)
    device = pick_device(device)
    base = resolved.base if resolved.kind == "peft" else resolved
    if resolved.kind == "peft":
        cfg = json.loads((Path(resolved.path) / "adapter_config.json").read_text())
        if cfg.get("task_type") != "SEQ_CLS":
            raise SelfAlignError(
                f"{resolved.path} is a PEFT adapter of task type {cfg.get('task_type')!r}, not a reward model",
                "a reward-model adapter is trained with task_type='SEQ_CLS' (as TRL's RewardTrainer does)",
            )
    elif base.is_local:
        cfg = json.loads((Path(base.path) / "config.json").read_text())
        archs = cfg.get("architectures") or []
        if archs and not any(a.endswith("ForSequenceClassification") for a in archs):
            raise SelfAlignError(
                f"{ref} is a {archs[0]}, not a reward model (a ForSequenceClassification with one label)",
                "train one with `RewardTrainer`, or pass its folder",
            )
    verbosity = hf_logging.get_verbosity()
    if resolved.kind == "peft":  # the base's head is "newly initialised", then replaced by the adapter's
        hf_logging.set_verbosity_error()
    try:
        model = _from_pretrained(
            AutoModelForSequenceClassification, base.path, base, num_labels=1, dtype=pick_dtype(dtype, device)
        )
    finally:
        hf_logging.set_verbosity(verbosity)
    if resolved.kind == "peft":
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, resolved.path)
    tok = load_tokenizer(resolved)
    text_cfg = model.config.get_text_config()
    if text_cfg.pad_token_id is None:  # needed to find the last non-pad token (TRL sets it the same way)
        text_cfg.pad_token_id = tok.pad_token_id
    model.to(device)
    model.eval()
    return model, tok


class RewardModel:
    """Scores (prompt, reply) pairs with a scalar-head reward model. See the module docstring."""

    def __init__(self, ref: str, device: str = "auto", dtype: str = "auto", batch_size: int = 8,
                 max_length: int = 1024, model=None, tokenizer=None):
        self.ref = ref
        if model is None:
            model, tokenizer = _load_seq_cls(ref, device, dtype)
        self.model, self.tokenizer = model, tokenizer
        self.device = next(model.parameters()).device
        self.batch_size = batch_size
        self.max_length = max_length

    def encode(self, prompt: Request, response: str) -> list[int]:
        return encode_reward(self.tokenizer, prompt, response, self.max_length)

    def score(self, prompts: Sequence[Request], responses: Sequence[str],
              progress: Callable[[int, int], None] | None = None) -> list[float]:
        """One reward per (prompt, response); `progress(rows, tokens)` is called after each batch."""
        import torch

        if len(prompts) != len(responses):
            raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
        rows = [self.encode(p, r) for p, r in zip(prompts, responses, strict=True)]
        order = sorted(range(len(rows)), key=lambda i: len(rows[i]))
        pad = self.model.config.get_text_config().pad_token_id
        scores = [0.0] * len(rows)
        for start in range(0, len(order), self.batch_size):
            batch = order[start: start + self.batch_size]
            width = max(len(rows[i]) for i in batch)
            ids = torch.full((len(batch), width), pad, dtype=torch.long)
            mask = torch.zeros((len(batch), width), dtype=torch.long)
            for b, i in enumerate(batch):
                ids[b, : len(rows[i])] = torch.tensor(rows[i], dtype=torch.long)
                mask[b, : len(rows[i])] = 1
            with torch.inference_mode():
                logits = self.model(input_ids=ids.to(self.device), attention_mask=mask.to(self.device)).logits
            for b, i in enumerate(batch):
                scores[i] = float(logits[b, 0].float())
            if progress:
                progress(len(batch), int(mask.sum()))
        return scores


def build_tiny_reward_model(folder: str | Path, seed: int = 0) -> Path:
    """Save a 2-layer random LlamaForSequenceClassification (num_labels=1) + the byte tokenizer (tests)."""
    import torch
    from transformers import LlamaForSequenceClassification

    from selfalign.core.tiny import build_byte_tokenizer, build_tiny_model

    folder = Path(folder)
    config = build_tiny_model("llama", seed=seed).config
    config.num_labels = 1
    config.pad_token_id = 0
    torch.manual_seed(seed)
    model = LlamaForSequenceClassification(config)
    with torch.no_grad():  # wide init, as in selfalign.core.tiny: rewards then differ clearly between texts
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0.0, 0.2)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    build_byte_tokenizer().save_pretrained(folder)
    return folder
