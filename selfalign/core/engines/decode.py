"""The `hf` engine's own decoding loop: a row leaves the batch the moment it is done.

`model.generate` runs a batch until its longest member finishes: a row that met its stop string
or EOS early keeps paying for the body and for gemma's 262k-vocabulary head (0.34 GFLOP a
position, more than the rest of the network) until the last row is done, and its extra tokens
were then counted as if kept. This loop instead

- computes the output layer only at each row's last position (the head as a function of the
  body's hidden states, `HFEngine._head`);
- drops finished rows from the batch, KV cache included (`DynamicCache.batch_select_indices`), so
  every step is spent on rows still writing;
- samples each row from its own random stream, seeded by (sampling seed, rendered prompt, sample
  index): a row's text does not depend on which other rows share its batch, so a run resumed at
  any batch size reproduces an uninterrupted one;
- draws the nucleus (top-p) from a `topk` that widens until the kept mass is reached, instead of
  sorting the whole vocabulary (`nucleus`), exactly the set transformers' `TopPLogitsWarper` keeps;
- once a single row is left (batch 1, or the last row of a batch), feeds draft tokens with each
  step (prompt lookup: what followed the latest earlier occurrence of the row's last tokens) and
  keeps those the row picks itself. One row's step reads every weight for one token's arithmetic,
  so on a CPU it is bound by memory bandwidth, and a step over 5 positions costs about what a step
  over 1 does; each kept draft is a step saved. The row picks each token from the same logits
  (to float rounding) with the same random number as a plain step would, so its text is the same
  (tested, greedy and sampled).

Greedy decoding picks the same tokens as `model.generate` (tested on tiny Llama and Gemma 3).
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from selfalign.core.engines.kv_slab import can_drop_last, drop_last


def row_seed(seed: int, prompt: str, sample: int) -> int:
    """The seed of one sample's random stream: a function of the sampling seed, the rendered prompt
    and the sample's index among the request's n, and of nothing about the batch it runs in."""
    return int(hashlib.sha256(f"{seed}|{sample}|{prompt}".encode()).hexdigest()[:15], 16)


def nucleus(probs: torch.Tensor, top_p: float, first_k: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """(probabilities, token ids) of each row's nucleus, most likely first, zero beyond it: the smallest
    set of most likely tokens whose mass reaches `top_p` (a token is kept when the mass strictly
    above it is < top_p, transformers' rule). `topk` widens by 4x until every row's mass is reached,
    so a peaked distribution costs a 64-wide top-k, not a sort of the whole vocabulary."""
    vocab = probs.shape[-1]
    k = min(first_k, vocab)
    while True:
        top, idx = probs.topk(k, dim=-1)
        cum = top.cumsum(dim=-1)
        if k == vocab or bool((cum[:, -1] >= top_p).all()):
            break
        k = min(k * 4, vocab)
    keep = (cum - top) < top_p
    keep[:, 0] = True
    return top * keep, idx


# rows sampled at a time: softmax, top-k and cumsum over 16 rows of a 262k vocabulary (16 MB) run
# ~1.6x faster than over 64 at once (62.5 -> 38.1 ms at batch 64 on 2 Xeon cores, medians of 30,
# alternated), as the block stays in cache. Every step of it is row-wise, so the tokens are the same,
# except where tied probabilities meet the nucleus's edge (top-k orders ties by its own rule, and k
# widens per block): never seen in float32 (the benchmark kept the same 5,799 tokens), but bfloat16
# logits tie often, and there 4 of 64 sampled rows differed. In bfloat16 a row depends on its batch
# anyway: greedy rows differ between batches of 64 and 16 (9 of 64), through the matmuls.
SAMPLE_ROWS = 16


def pick_tokens(logits: torch.Tensor, temperature: float, top_p: float, uniforms: torch.Tensor | None) -> torch.Tensor:
    """The next token of each row: argmax when `temperature` is 0, else the token where the row's
    uniform number falls in the cumulative distribution of softmax(logits / temperature), cut to
    its top-p nucleus and renormalised (inverse-CDF sampling: one random number a row and step,
    drawn from the row's own stream). Rows are sampled `SAMPLE_ROWS` at a time."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    if logits.shape[0] > SAMPLE_ROWS:
        return torch.cat([pick_tokens(logits[a:a + SAMPLE_ROWS], temperature, top_p, uniforms[a:a + SAMPLE_ROWS])
                          for a in range(0, logits.shape[0], SAMPLE_ROWS)])
    probs = (logits.float() / temperature).softmax(dim=-1)
    if top_p < 1.0:
        probs, idx = nucleus(probs, top_p)
    else:
        idx = None
    cdf = probs.double().cumsum(dim=-1)
    target = (uniforms.to(cdf) * cdf[:, -1]).unsqueeze(-1)
    # right=True: the first position whose cumulative mass exceeds the target, so a token of zero
    # probability (outside the nucleus, or underflowed) is never picked
    at = torch.searchsorted(cdf, target, right=True).clamp(max=probs.shape[-1] - 1)
    return (idx.gather(-1, at) if idx is not None else at).squeeze(-1)


def kept_token_count(tokenizer, tokens: Sequence[int], text: str) -> int:
    """How many of `tokens` the kept `text` uses: the shortest prefix that decodes to at least the
    text's length. A token that holds the end of the text and the start of a stop string counts as
    kept; the stop string's other tokens (and an end-of-text token) do not."""
    k = len(tokens)
    while k > 0 and len(tokenizer.decode(list(tokens[: k - 1]), skip_special_tokens=True)) >= len(text):
        k -= 1
    return k


class StopWatch:
    """Says when a row's generated text contains one of its stop strings, decoding only the tail
    that could hold a stop (a few tokens) rather than the whole text every step. The caller still
    cuts the full text at the earliest stop; this only decides when to stop generating."""

    def __init__(self, tokenizer, stops: Sequence[str]):
        self.tokenizer = tokenizer
        self.stops = [s for s in stops if s]
        self.window = max((len(s) for s in self.stops), default=0) + 2

    def hit(self, tokens: list[int]) -> bool:
        if not self.stops:
            return False
        tail = self.tokenizer.decode(tokens[-self.window:], skip_special_tokens=True)
        return any(s in tail for s in self.stops)


@dataclass
class DecodeProfile:
    """Seconds spent in each part of decoding, summed over steps (the benchmark prints them)."""

    body: float = 0.0
    head: float = 0.0
    sampling: float = 0.0
    cache: float = 0.0
    python: float = 0.0
    steps: int = 0
    row_steps: int = 0
    drafted: int = 0  # prompt lookup's draft tokens fed, and those kept
    draft_kept: int = 0

    def as_dict(self) -> dict:
        return {"body": self.body, "head": self.head, "sampling": self.sampling, "cache": self.cache,
                "python": self.python, "steps": self.steps, "row_steps": self.row_steps,
                "drafted": self.drafted, "draft_kept": self.draft_kept}


@dataclass
class Rows:
    """What one call decodes: a padded batch and, per row, its stops, seed and end-of-text ids."""

    ids: torch.Tensor  # (rows, width) prompt tokens, left-padded (or [prefix][pads][own])
    mask: torch.Tensor  # (rows, width) 1 at real tokens
    watches: list[StopWatch]
    seeds: list[int]
    cached: int = 0  # leading columns already in `past`
    past: object | None = None


def decode(
    step: Callable,
    rows: Rows,
    *,
    max_new_tokens: int,
    temperature: float,
    top_p: float,
    eos_ids: set[int],
    repetition_penalty: float = 1.0,
    profile: DecodeProfile | None = None,
    should_stop: Callable[[], bool] | None = None,
    lookup: int = 0,
) -> list[list[int]]:
    """Generate up to `max_new_tokens` tokens for every row; returns each row's tokens, EOS included
    if one ended it (the caller drops it). `step(ids, mask, pos, past) -> (body_s, logits, past)` runs
    the model on new tokens and returns the last position's logits (float) and the grown cache.
    `should_stop()`, called once a step, ends every row at that step when it returns True (a server
    whose clients left or which is shutting down); it also tells the caller a step was made.

    `lookup` > 0: once a single row is left, each step also feeds up to that many draft tokens
    (`prompt_lookup`) and keeps those the row would have picked itself (`step` is then called with
    `last=k` and returns the last k positions' logits; the cache must allow `drop_last`)."""
    prof = profile if profile is not None else DecodeProfile()
    n = rows.ids.shape[0]
    device = rows.ids.device
    mask = rows.mask
    pos_all = (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 1)
    inputs, pos = rows.ids[:, rows.cached:], pos_all[:, rows.cached:]
    gens = [torch.Generator().manual_seed(s) for s in rows.seeds] if temperature > 0 else None
    penalty = None
    if repetition_penalty != 1.0:
        from transformers import RepetitionPenaltyLogitsProcessor

        penalty = RepetitionPenaltyLogitsProcessor(repetition_penalty)
        seen = rows.ids
    out: list[list[int]] = [[] for _ in range(n)]
    alive = list(range(n))  # original row index of each batch row
    past = rows.past
    # drafts need a cache that can forget positions; a model-made cache (past None here) cannot
    lookup = lookup if penalty is None and can_drop_last(past) else 0
    prompt = None  # the lone row's prompt tokens, once a single row is left
    for _ in range(max_new_tokens):
        if lookup and len(alive) == 1:
            r = alive[0]
            if prompt is None:
                prompt = rows.ids[r][rows.mask[r].bool()].tolist()
            drafted = _drafted_step(step, rows.watches[r], gens[r] if gens else None, prompt, out[r], inputs, mask,
                                    pos, past, max_new_tokens=max_new_tokens, lookup=lookup, temperature=temperature,
                                    top_p=top_p, eos_ids=eos_ids, profile=prof)
            if drafted is None or (should_stop is not None and should_stop()):  # the row is done, or stopped
                break
            mask, pos, inputs, past = drafted
            continue
        t0 = time.perf_counter()
        body_s, logits, past = step(inputs, mask, pos, past)
        t1 = time.perf_counter()
        if penalty is not None:
            logits = penalty(seen, logits)
        uniforms = torch.stack([torch.rand((), generator=gens[r], dtype=torch.float64)
                                for r in alive]) if gens else None
        nxt = pick_tokens(logits, temperature, top_p, uniforms)
        t2 = time.perf_counter()
        done = []
        for b, (r, tok) in enumerate(zip(alive, nxt.tolist(), strict=True)):
            out[r].append(tok)
            if tok in eos_ids or rows.watches[r].hit(out[r]):
                done.append(b)
        prof.steps += 1
        prof.row_steps += len(alive)
        cut = should_stop is not None and should_stop()
        if cut or len(done) == len(alive) or len(out[alive[0]]) >= max_new_tokens:
            t3 = time.perf_counter()
            prof.body, prof.head, prof.sampling = (prof.body + body_s, prof.head + (t1 - t0 - body_s),
                                                   prof.sampling + t2 - t1)
            prof.python += t3 - t2
            break
        nxt = nxt.unsqueeze(-1)
        mask = torch.cat([mask, mask.new_ones((mask.shape[0], 1))], dim=-1)
        pos = pos[:, -1:] + 1
        if penalty is not None:
            seen = torch.cat([seen, nxt], dim=-1)
        t3 = time.perf_counter()
        if done:
            # the finished rows leave the batch: every later step runs on the others only
            gone = set(done)
            keep = [b for b in range(len(alive)) if b not in gone]
            sel = torch.tensor(keep, device=device)
            past.batch_select_indices(sel)
            mask, pos, nxt = mask[sel], pos[sel], nxt[sel]
            if penalty is not None:
                seen = seen[sel]
            alive = [alive[b] for b in keep]
        t4 = time.perf_counter()
        inputs = nxt
        prof.body += body_s
        prof.head += t1 - t0 - body_s
        prof.sampling += t2 - t1
        prof.cache += t4 - t3
        prof.python += t3 - t2
    return out


def prompt_lookup(history: list[int], k: int, ngram: int = 3) -> list[int]:
    """Up to `k` draft tokens for a row whose tokens so far are `history`: what followed the latest
    earlier occurrence of its last `ngram` tokens (or of fewer, down to one), as in prompt lookup
    decoding (Saxena 2023; transformers' `prompt_lookup_num_tokens`, vLLM's "ngram" speculator).
    A base model often repeats its prompt and itself, and every draft token kept is a step saved."""
    if k <= 0:
        return []
    size = len(history)
    for n in range(min(ngram, size - 1), 0, -1):
        tail = history[size - n:]
        first = tail[0]
        for at in range(size - n - 1, -1, -1):
            if history[at] == first and history[at: at + n] == tail:
                return history[at + n: at + n + k]
    return []


def _drafted_step(step, watch, gen, prompt, row_out, inputs, mask, pos, past, *, max_new_tokens, lookup,
                  temperature, top_p, eos_ids, profile):
    """One forward of a lone row (`prompt`'s tokens, then `row_out`) over its last token and up to
    `lookup` draft tokens; appends to `row_out` the tokens the row picks, position by position,
    while they equal the drafts (each pick is the one a plain step would make there: same logits,
    same random number, drawn in the same order), then the first that differs. The cache forgets
    the positions of drafts not kept. Returns the next (mask, pos, inputs, past), or None when the
    row is done."""
    t0 = time.perf_counter()
    draft = prompt_lookup(prompt + row_out, min(lookup, max_new_tokens - len(row_out) - 1))
    width = len(draft) + 1  # positions whose next token is picked: the last input's and each draft's
    feed, feed_mask, feed_pos = inputs, mask, pos
    if draft:
        feed = torch.cat([inputs, inputs.new_tensor([draft])], dim=-1)
        feed_mask = torch.cat([mask, mask.new_ones((1, len(draft)))], dim=-1)
        feed_pos = torch.cat([pos, pos[:, -1:] + torch.arange(1, width, device=pos.device)], dim=-1)
    t1 = time.perf_counter()
    body_s, logits, past = step(feed, feed_mask, feed_pos, past, last=width)
    t2 = time.perf_counter()
    done = False
    kept = 0
    for at in range(width):
        uniform = torch.rand((1,), generator=gen, dtype=torch.float64) if gen is not None else None
        tok = int(pick_tokens(logits[at: at + 1], temperature, top_p, uniform)[0])
        row_out.append(tok)
        kept += 1
        if tok in eos_ids or watch.hit(row_out) or len(row_out) >= max_new_tokens:
            done = True
            break
        if at == width - 1 or tok != draft[at]:
            break
    t3 = time.perf_counter()
    profile.steps += 1
    profile.row_steps += 1
    profile.drafted += len(draft)
    profile.draft_kept += kept - 1
    profile.body += body_s
    profile.head += t2 - t1 - body_s
    profile.sampling += t3 - t2
    if done:
        profile.python += t1 - t0
        return None
    drop_last(past, width - kept)  # the cache holds the fed tokens whose next token was kept
    mask = torch.cat([mask, mask.new_ones((1, kept))], dim=-1)
    pos = pos[:, -1:] + kept
    inputs = inputs.new_tensor([[row_out[-1]]])
    profile.python += t1 - t0 + time.perf_counter() - t3
    return mask, pos, inputs, past
