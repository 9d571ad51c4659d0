"""Context distillation: the math, the teacher's stored targets and the trainer.

The student (the model *without* a context C) is trained to match the frozen teacher (the model
*with* C) token by token over a text X, minimising

    KL(p0(. | C, x<t) || p_theta(. | x<t))   averaged over the positions t of X.

**The teacher's targets are computed once and stored compactly.** With a 262k-token vocabulary a
full distribution is 1 MB a token in float32, so per token of X only the teacher's top-k
log-probabilities (float16 or float32) and their token ids (int32) are kept, plus the log of the
mass on every other token (the "rest"). They are written in safetensors shards, one per chunk of
examples, each complete the moment it appears (written to a temporary name, then renamed): a
killed teacher pass resumes by shard. The context's KV cache is computed once and reused for
every X; the output layer runs on a few hundred positions at a time, in float32 even for a bf16
model (bf16 logits would round the targets to ~0.1 nats).

**The loss** (`topk_kl`) is the KL between the two distributions coarsened to k + 1 outcomes: the
teacher's top-k tokens and one bucket for everything else,

    sum_{i in topk} p0_i (log p0_i - log q_i) + p0_rest (log p0_rest - log q_rest),

with q_rest = 1 - sum_{topk} q_i computed in log space, as a log-sum-exp over the student's other
tokens (never as 1 - sum, which rounds to 0 when the top-k hold nearly all the mass). Merging
outcomes can only lose information, so this is a lower bound on the exact KL that equals it when
k is the vocabulary size (tested on a tiny model).

**The trainer** is transformers' `Trainer` with a custom `compute_loss`: the student runs on X
alone, its last hidden states are gathered at the target positions and the output layer plus the
loss run in chunks under activation checkpointing, so the [positions x vocabulary] logits never
exist all at once. The mean is over target tokens of the whole accumulated batch. LoRA or full
fine-tuning; outputs as `selfalign.core.training.sft_train` writes them (`adapter/` with
`selfalign_base.json`, or `model/`; `trainer_state.json`), so a later stage loads the result as
`@stage`.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

from selfalign.core.compat import kv_cache_name, text_config
from selfalign.core.errors import SelfAlignError
from selfalign.core.progress import console, progress_bar
from selfalign.core.training import TrainSettings, common_prefix_length, fit, start_training

SEPARATOR = "\n\n"  # between the context and X, as `render_plain` puts it between a system prompt and a turn
MANIFEST = "manifest.json"
SHARD_GLOB = "shard-*.safetensors"


# -- the math (pure, unit-tested) ---------------------------------------------------------------------
def topk_targets(logits, k: int):
    """The teacher's top-k log-probabilities, their ids and the log of the remaining mass, per row.

    `logits` is [N, V]; returns (values [N, k] float32, ids [N, k] int32, rest [N] float32), with
    rest = -inf when k covers the whole vocabulary.
    """
    import torch

    logp = torch.log_softmax(logits.float(), dim=-1)
    values, ids = logp.topk(min(k, logp.shape[-1]), dim=-1)
    rest = logp.scatter(-1, ids, float("-inf")).logsumexp(-1)
    return values, ids.to(torch.int32), rest


def topk_kl(student_logits, values, ids, rest):
    """Per-row KL(p0 || q) over the teacher's top-k tokens plus one bucket for all the others.

    `student_logits` [N, V]; `values` [N, k] the teacher's top-k log-probs, `ids` [N, k] their
    token ids, `rest` [N] the log of the teacher's remaining mass. The teacher's k + 1 outcomes are
    renormalised (float16 storage rounds them). Differentiable in `student_logits`.
    """
    import torch

    logq = torch.log_softmax(student_logits.float(), dim=-1)
    ids = ids.long()
    lq_top = logq.gather(-1, ids)
    # log q_rest: a log-sum-exp over the tokens outside the teacher's top-k (masked with the most
    # negative finite float, not -inf, so the gradient stays finite when k covers the vocabulary)
    lq_rest = logq.scatter(-1, ids, torch.finfo(logq.dtype).min).logsumexp(-1)
    lt = torch.cat([values.float(), rest.float()[:, None]], dim=-1)
    lt = lt - lt.logsumexp(-1, keepdim=True)
    pt = lt.exp()
    lt = torch.where(pt > 0, lt, torch.zeros_like(lt))  # 0 log 0 = 0
    lq = torch.cat([lq_top, lq_rest[:, None]], dim=-1)
    return (pt * (lt - lq)).sum(-1)


def output_head(model, fp32: bool = False):
    """(body, head): the model's last hidden states as a function of its inputs, and the output layer
    (with gemma-2's logit soft-capping) as a function of those, or None when this architecture does
    something the split does not reproduce (checked once on a short input; the caller then uses
    full logits). `fp32` computes the head in float32 whatever the model's dtype."""
    import torch
    import torch.nn.functional as F

    cfg = text_config(model)
    cap = getattr(cfg, "final_logit_softcapping", None)
    head, body = model.get_output_embeddings(), model.get_decoder()
    if head is None or body is None:
        return None
    weight32 = {}

    def head_fn(h):
        if fp32 and head.weight.dtype != torch.float32:
            if "w" not in weight32:  # one float32 copy of the weights, made on first use
                weight32["w"] = head.weight.detach().float()
                weight32["b"] = None if getattr(head, "bias", None) is None else head.bias.detach().float()
            logits = F.linear(h.float(), weight32["w"], weight32["b"])
        else:
            logits = head(h).float()
        return torch.tanh(logits / cap) * cap if cap else logits

    was_training = model.training
    model.eval()
    probe = torch.tensor([[1, 5, 6, 7]], device=head.weight.device) % cfg.vocab_size
    try:
        with torch.no_grad():
            full = model(input_ids=probe, use_cache=False).logits.float()
            split = head_fn(body(input_ids=probe, use_cache=False).last_hidden_state)
    finally:
        model.train(was_training)
    tol = 1e-3 if head.weight.dtype == torch.float32 else 5e-2
    return (body, head_fn) if torch.allclose(full, split, atol=tol, rtol=tol) else None


# -- tokenization -------------------------------------------------------------------------------------
def special_prefix(tokenizer) -> list[int]:
    """The ids the tokenizer puts before any text (a BOS token, or nothing)."""
    with_special = tokenizer("a", add_special_tokens=True)["input_ids"]
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    for i in range(len(with_special) - len(plain) + 1):
        if with_special[i:i + len(plain)] == plain:
            return list(with_special[:i])
    return []


@dataclass
class Encoded:
    """One X: the student's input (prefix + X) and where its targets are.

    Target t is the prediction of x[first + t] (first = 0 when a BOS precedes X, else 1: without one
    nothing predicts X's first token); targets from `reply_from` on predict the reply."""

    x_ids: list[int]
    prefix: list[int]
    first: int
    reply_from: int
    cut: bool

    @property
    def input_ids(self) -> list[int]:
        return self.prefix + self.x_ids

    @property
    def n_targets(self) -> int:
        return len(self.x_ids) - self.first


def encode_x(tokenizer, text: str, reply_char: int, max_length: int, prefix: list[int]) -> Encoded:
    """Tokenize X on its own (the same ids after the context or not), cut from the right to fit."""
    x_ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
    room = max(max_length - len(prefix), 0)
    cut = len(x_ids) > room
    x_ids = x_ids[:room]
    first = 0 if prefix else 1
    head = tokenizer(text[:reply_char], add_special_tokens=False)["input_ids"] if reply_char > 0 else []
    reply_tok = common_prefix_length(list(head), x_ids)
    return Encoded(x_ids, list(prefix), first, max(reply_tok - first, 0), cut)


def context_ids(tokenizer, context: str, prefix: list[int]) -> list[int]:
    return list(prefix) + list(tokenizer(context.strip() + SEPARATOR, add_special_tokens=False)["input_ids"])


# -- the teacher pass ---------------------------------------------------------------------------------
def _shard_meta(path: Path) -> dict:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return f.metadata() or {}


def _write_shard(path: Path, tensors: dict, metadata: dict) -> None:
    """Write a shard under a temporary name and rename it: a shard on disk is always complete."""
    from safetensors.torch import save_file

    tmp = path.with_name(path.name + ".partial")
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata=metadata)
    os.replace(tmp, path)


def teacher_key(teacher: str, context: str, k: int, dtype: str, max_length: int) -> dict:
    return {"teacher": teacher, "context_sha256": hashlib.sha256(context.encode("utf-8")).hexdigest(), "k": k,
            "dtype": dtype, "max_length": max_length}


def prepare_teacher_dir(folder: Path, key: dict) -> set[str]:
    """The ids already in complete shards of `folder`; shards made with other settings are removed."""
    folder.mkdir(parents=True, exist_ok=True)
    for stale in folder.glob("*.partial"):
        stale.unlink()
    manifest = folder / MANIFEST
    if manifest.exists() and json.loads(manifest.read_text()) != key:
        shards = sorted(folder.glob(SHARD_GLOB))
        console.print(f"  [yellow]note:[/] {folder}: teacher settings changed; {len(shards)} old shards recomputed")
        for shard in shards:
            shard.unlink()
    manifest.write_text(json.dumps(key, indent=2))
    done: set[str] = set()
    for shard in sorted(folder.glob(SHARD_GLOB)):
        meta = _shard_meta(shard)
        done.update(json.loads(meta["ids"]) + json.loads(meta.get("empty", "[]")))
    return done


def teacher_pass(model, tokenizer, context: str, examples: list[dict], folder: Path, key: dict, *,
                 batch_tokens: int = 4096, head_positions: int = 256, shard_examples: int = 64) -> None:
    """Store the teacher's top-k targets for every example {"id", "text", "reply_char"} not yet stored.

    The model reads context + X; the context's KV cache is computed once. Examples are processed in
    chunks of `shard_examples`, each written as one shard when done."""
    import torch

    k, store_dtype = key["k"], getattr(torch, key["dtype"])
    done = prepare_teacher_dir(folder, key)
    pending = [e for e in examples if e["id"] not in done]
    if not pending:
        return
    device = next(model.parameters()).device
    prefix = special_prefix(tokenizer)
    ctx = context_ids(tokenizer, context, prefix)
    split = output_head(model, fp32=True)
    cached = ctx[:-1]
    with torch.inference_mode():
        cache = model(input_ids=torch.tensor([cached], device=device),
                      use_cache=True)[kv_cache_name()] if cached else None
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    next_index = 1 + max((int(p.stem.split("-")[1]) for p in folder.glob(SHARD_GLOB)), default=-1)

    def targets_for(batch: list[Encoded]) -> list[tuple]:
        """(values, ids, rest) per example of a batch: one forward of [last context token] + X[:-1]."""
        suffixes = [[ctx[-1]] + e.x_ids[:-1] for e in batch]
        width = max(len(s) for s in suffixes)
        ids = torch.full((len(batch), width), pad, dtype=torch.long)
        mask = torch.zeros((len(batch), len(cached) + width), dtype=torch.long)
        mask[:, :len(cached)] = 1
        for b, s in enumerate(suffixes):
            ids[b, :len(s)] = torch.tensor(s)
            mask[b, len(cached):len(cached) + len(s)] = 1
        pos = torch.arange(len(cached), len(cached) + width).expand(len(batch), -1)
        past = None
        if cache is not None:
            past = copy.deepcopy(cache)
            past.batch_repeat_interleave(len(batch))
        kw = dict(input_ids=ids.to(device), attention_mask=mask.to(device), position_ids=pos.to(device),
                  use_cache=past is not None, **{kv_cache_name(): past})
        with torch.inference_mode():
            out = split[0](**kw).last_hidden_state if split else model(**kw).logits
            rows = torch.cat([torch.full((e.n_targets,), b) for b, e in enumerate(batch)])
            cols = torch.cat([torch.arange(e.first, len(e.x_ids)) for e in batch])
            picked = out[rows.to(device), cols.to(device)]
            parts = []
            for at in range(0, len(picked), head_positions):
                chunk = picked[at:at + head_positions]
                logits = split[1](chunk) if split else chunk.float()
                parts.append(tuple(t.cpu() for t in topk_targets(logits, k)))
        values, tok_ids, rest = (torch.cat(x) for x in zip(*parts, strict=True))
        bounds = [0]
        for e in batch:
            bounds.append(bounds[-1] + e.n_targets)
        return [(values[a:b], tok_ids[a:b], rest[a:b]) for a, b in zip(bounds, bounds[1:], strict=False)]

    with progress_bar("teacher top-k", total=len(pending), already_done=len(examples) - len(pending)) as advance:
        for start in range(0, len(pending), shard_examples):
            chunk = pending[start:start + shard_examples]
            enc = [encode_x(tokenizer, e["text"], e.get("reply_char", 0), key["max_length"], prefix) for e in chunk]
            keep = [i for i, e in enumerate(enc) if e.n_targets > 0]
            results: dict[int, tuple] = {}
            order = sorted(keep, key=lambda i: len(enc[i].x_ids))
            batch: list[int] = []
            for i in order + [None]:
                if i is not None and (not batch or len(enc[i].x_ids) * (len(batch) + 1) <= batch_tokens):
                    batch.append(i)
                    continue
                if batch:
                    results.update(zip(batch, targets_for([enc[j] for j in batch]), strict=True))
                batch = [i] if i is not None else []
            tensors = _pack([enc[i] for i in keep], [results[i] for i in keep], store_dtype)
            # nothing to predict: recorded, not redone
            empty = [e["id"] for i, e in enumerate(chunk) if i not in set(keep)]
            meta = {"ids": json.dumps([chunk[i]["id"] for i in keep]), "empty": json.dumps(empty)}
            _write_shard(folder / f"shard-{next_index:05d}.safetensors", tensors, meta)
            next_index += 1
            advance(len(chunk), sum(len(e.x_ids) for e in enc))


def _pack(enc: list[Encoded], targets: list[tuple], dtype) -> dict:
    """Concatenate the examples of a shard: flat tensors plus offsets."""
    import torch

    def offsets(lengths):
        return torch.tensor([0] + list(lengths), dtype=torch.int64).cumsum(0)

    k = targets[0][0].shape[-1] if targets else 1
    return {
        "input_ids": torch.tensor([t for e in enc for t in e.input_ids], dtype=torch.int32),
        "seq_offsets": offsets(len(e.input_ids) for e in enc),
        "target_offsets": offsets(e.n_targets for e in enc),
        "target_start": torch.tensor([len(e.prefix) + e.first - 1 for e in enc], dtype=torch.int32),
        "reply_from": torch.tensor([e.reply_from for e in enc], dtype=torch.int32),
        "cut": torch.tensor([int(e.cut) for e in enc], dtype=torch.int32),
        "topk_logprobs": torch.cat([t[0] for t in targets]).to(dtype) if targets else torch.zeros((0, k), dtype=dtype),
        "topk_ids": torch.cat([t[1] for t in targets]) if targets else torch.zeros((0, k), dtype=torch.int32),
        "rest_logprob": torch.cat([t[2] for t in targets]).float() if targets else torch.zeros(0),
    }


class TeacherTargets:
    """The stored targets of a teacher folder as a map-style dataset (one item per X), read lazily
    from memory-mapped shards. Item: input_ids [L], target_start (the student position predicting
    the first target), reply_from, values/ids [T, k], rest [T]."""

    def __init__(self, folder: Path, ids: list[str] | None = None):
        from safetensors import safe_open

        self.folder = Path(folder)
        self.key = json.loads((self.folder / MANIFEST).read_text())
        self.index: list[tuple[int, int]] = []  # (shard, position in shard)
        self.ids: list[str] = []
        self.shards, self.small = [], []
        for s, path in enumerate(sorted(self.folder.glob(SHARD_GLOB))):
            handle = safe_open(str(path), framework="pt")
            meta = handle.metadata()
            self.shards.append(handle)
            self.small.append({name: handle.get_tensor(name) for name in
                               ("input_ids", "seq_offsets", "target_offsets", "target_start", "reply_from", "cut")})
            for j, rid in enumerate(json.loads(meta["ids"])):
                self.index.append((s, j))
                self.ids.append(rid)
        if ids is not None:
            wanted = set(ids)
            pairs = [(i, r) for i, r in zip(self.index, self.ids, strict=True) if r in wanted]
            self.index, self.ids = [p[0] for p in pairs], [p[1] for p in pairs]

    def subset(self, n: int) -> TeacherTargets:
        out = copy.copy(self)
        out.index, out.ids = self.index[:n], self.ids[:n]
        return out

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, i: int) -> dict:
        s, j = self.index[i]
        small, handle = self.small[s], self.shards[s]
        a, b = int(small["seq_offsets"][j]), int(small["seq_offsets"][j + 1])
        ta, tb = int(small["target_offsets"][j]), int(small["target_offsets"][j + 1])
        return {
            "input_ids": small["input_ids"][a:b].long(),
            "target_start": int(small["target_start"][j]),
            "reply_from": int(small["reply_from"][j]),
            "values": handle.get_slice("topk_logprobs")[ta:tb],
            "ids": handle.get_slice("topk_ids")[ta:tb],
            "rest": handle.get_slice("rest_logprob")[ta:tb],
        }

    def stats(self, reply_only: bool = False) -> dict:
        """Over the selected examples: target tokens, texts cut to fit, the teacher's mean top-k mass."""
        import torch

        tokens, cut, rest = 0, 0, []
        for s, j in self.index:
            small = self.small[s]
            ta, tb = int(small["target_offsets"][j]), int(small["target_offsets"][j + 1])
            ta = min(ta + int(small["reply_from"][j]), tb) if reply_only else ta
            tokens, cut = tokens + tb - ta, cut + int(small["cut"][j])
            rest.append(self.shards[s].get_slice("rest_logprob")[ta:tb])
        mass = float((1 - torch.cat(rest).exp()).mean()) if tokens else float("nan")
        return {"texts": len(self), "target_tokens": tokens, "cut_to_max_length": cut,
                "teacher_topk_mass": round(mass, 4)}


def collate_targets(features: list[dict], pad_id: int, reply_only: bool = False) -> dict:
    """Right-pad the inputs; flatten the targets with the (row, position) each is predicted at."""
    import torch

    width = max(len(f["input_ids"]) for f in features)
    input_ids = torch.full((len(features), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(features), width), dtype=torch.long)
    rows, cols, values, ids, rest = [], [], [], [], []
    for b, f in enumerate(features):
        n = len(f["input_ids"])
        input_ids[b, :n], mask[b, :n] = f["input_ids"], 1
        skip = min(f["reply_from"], len(f["rest"])) if reply_only else 0
        t = len(f["rest"]) - skip
        rows.append(torch.full((t,), b, dtype=torch.long))
        cols.append(torch.arange(t) + f["target_start"] + skip)
        values.append(f["values"][skip:])
        ids.append(f["ids"][skip:])
        rest.append(f["rest"][skip:])
    return {"input_ids": input_ids, "attention_mask": mask, "target_rows": torch.cat(rows),
            "target_cols": torch.cat(cols),
            "target_values": torch.cat(values), "target_ids": torch.cat(ids), "target_rest": torch.cat(rest)}


# -- the student --------------------------------------------------------------------------------------
def kl_sum(model, batch: dict, split, chunk: int = 256):
    """The summed truncated KL of a collated batch; the output layer runs `chunk` positions at a time,
    recomputed in the backward pass rather than kept (activation checkpointing)."""
    import torch
    from torch.utils.checkpoint import checkpoint

    rows, cols = batch["target_rows"], batch["target_cols"]
    if split is None:  # full logits: architectures whose head the split does not reproduce
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits
        return topk_kl(logits[rows, cols], batch["target_values"], batch["target_ids"], batch["target_rest"]).sum()
    body, head = split
    hidden = body(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                  use_cache=False).last_hidden_state
    picked = hidden[rows, cols]

    def part(h, values, ids, rest):
        return topk_kl(head(h), values, ids, rest).sum()

    total = picked.new_zeros((), dtype=torch.float32)
    for at in range(0, len(picked), chunk):
        sl = slice(at, at + chunk)
        args = (picked[sl], batch["target_values"][sl], batch["target_ids"][sl], batch["target_rest"][sl])
        total = total + (checkpoint(part, *args, use_reentrant=False) if torch.is_grad_enabled() else part(*args))
    return total


def mean_kl(model, dataset, pad_id: int, reply_only: bool = False, batch_size: int = 8) -> float:
    """The mean truncated KL per target token of `model` on `dataset` (no gradient)."""
    import torch

    if len(dataset) == 0:
        return float("nan")
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    split = output_head(model)
    total, count = 0.0, 0
    try:
        with torch.no_grad():
            for start in range(0, len(dataset), batch_size):
                batch = collate_targets([dataset[i] for i in range(start, min(start + batch_size, len(dataset)))],
                                        pad_id, reply_only)
                batch = {name: t.to(device) for name, t in batch.items()}
                total += float(kl_sum(model, batch, split))
                count += len(batch["target_rows"])
    finally:
        model.train(was_training)
    return total / max(count, 1)


def _trainer_class():
    import torch
    from transformers import Trainer

    class DistillTrainer(Trainer):
        """`Trainer` with the truncated-KL loss, averaged over the target tokens of the accumulated batch."""

        loss_is_scaled_for_ga = True  # compute_loss divides by the targets of all micro-batches of a step

        def __init__(self, *args, split=None, **kwargs):
            super().__init__(*args, **kwargs)
            self.split = split

        def get_batch_samples(self, epoch_iterator, num_batches, device):
            batches, _ = super().get_batch_samples(epoch_iterator, num_batches, device)
            return batches, sum(len(b["target_rows"]) for b in batches)

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            total = kl_sum(model, inputs, self.split)
            n = num_items_in_batch or len(inputs["target_rows"])
            loss = total / torch.as_tensor(max(n, 1), device=total.device, dtype=total.dtype)
            return (loss, {}) if return_outputs else loss

    return DistillTrainer


def distill_train(
    base: str,
    teacher_dir: Path,
    out_dir: Path,
    settings: TrainSettings,
    seed: int = 0,
    *,
    reply_only: bool = False,
    kl_eval_examples: int = 256,
    ids: list[str] | None = None,
) -> dict:
    """Fine-tune `base` (without the context) to match the teacher targets stored in `teacher_dir`.

    `ids` picks the stored examples to train on (default: all); `settings.max_length` is not read here
    (the stored texts were cut to it). Returns `{"model", "kl_before", "kl_after", "train_loss",
    "steps", ...}`; writes what `sft_train` writes into `out_dir`."""
    from transformers import TrainingArguments

    from selfalign.core.models import load_tokenizer, resolve

    started = time.time()
    data = TeacherTargets(teacher_dir, ids)
    if len(data) == 0:
        raise SelfAlignError(f"{teacher_dir}: no stored teacher targets to train on", "check the texts X (all empty?)")
    trainee = start_training(base, out_dir, settings, seed, started)
    model, tokenizer = trainee.model, trainee.tokenizer
    _check_same_tokenizer(tokenizer, load_tokenizer(resolve(data.key["teacher"])), base, data.key["teacher"])
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    probe = data[0]
    if int(probe["ids"].max()) >= model.get_output_embeddings().weight.shape[0]:
        raise SelfAlignError(f"the student {base} has a smaller vocabulary than the teacher {data.key['teacher']}",
                             "context distillation needs the same tokenizer and vocabulary")
    measured = data.subset(min(kl_eval_examples, len(data)))
    kl_before = mean_kl(model, measured, pad_id, reply_only)
    console.print(f"  KL(teacher with context || student without) before training: {kl_before:.4f} nats/token")

    model.train()
    fitted = fit(trainee, data, trainer_class=_trainer_class(), config_class=TrainingArguments,
                 config_args={"remove_unused_columns": False, "label_names": []},
                 trainer_args=lambda wrapped: {
                     "split": output_head(wrapped),
                     "data_collator": lambda feats: collate_targets(feats, pad_id, reply_only)},
                 peft_task="CAUSAL_LM", label="training",
                 describe=f"distilling into {base} ({settings.kind}) on {len(data)} texts")
    kl_after = mean_kl(fitted.trainer.model, measured, pad_id, reply_only)
    console.print(f"  ... after training: {kl_after:.4f} nats/token")
    return fitted.save(digits=5, kl_before=round(kl_before, 5), kl_after=round(kl_after, 5),
                       kl_examples=len(measured))


def _check_same_tokenizer(student_tok, teacher_tok, student: str, teacher: str) -> None:
    probe = "Human: Is 7 prime?\n\nAssistant: Yes, 7 is prime. Ünïcödé ✓"
    if student_tok(probe)["input_ids"] != teacher_tok(probe)["input_ids"]:
        raise SelfAlignError(f"the student {student} and the teacher {teacher} tokenize text differently",
                             "context distillation needs one tokenizer: distil a model into itself or a sibling")
