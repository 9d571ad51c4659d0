"""The `hf` engine: transformers on CPU or GPU, in-process. The default.

Generation is batched: requests are tokenized, sorted by length (so a batch holds prompts of
similar length and little padding), left-padded and decoded by `decode.decode`, which drops each
row from the batch as soon as it is done and samples every row from its own seeded stream. Scoring
feeds each (context + continuation) through the model's own forward, left-padded so that every
continuation ends at the last position, and asks for logits only over the last k positions
(`logits_to_keep`), k being the longest continuation in the batch. With gemma's 262k-token
vocabulary the output layer costs more than the rest of the network per position, so this is
what makes scoring cheap; `benchmarks/bench_engine.py` measures it against full logits.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

from selfalign.core.chat import Request, first_stop, truncate_at_stop
from selfalign.core.compat import kv_cache_name, text_config
from selfalign.core.engines.base import Completion, Engine, Sampling, score_token_rows

MAX_CONTEXT = 32768


def fork_cache(cache):
    """A KV cache that starts as `cache` and grows on its own. transformers' cache layers replace
    their tensors when they grow or are repeated (`torch.cat`, `repeat_interleave`), never write
    into them, so a copy of the layer objects is enough: the shared prefix's tensors are not
    copied, as `copy.deepcopy` would."""
    forked = copy.copy(cache)
    forked.layers = [copy.copy(layer) for layer in cache.layers]
    return forked


class _LogprobQueue:
    """Hidden states at scored positions, queued until `chunk` of them are waiting, then put through
    the output layer together; summed log-probabilities per owner (a score row)."""

    def __init__(self, target_logprobs, chunk: int, owners: int, device):
        import torch

        self.target_logprobs, self.chunk, self.device = target_logprobs, chunk, device
        self.hidden, self.targets, self.owners, self.waiting = [], [], [], 0
        self.sums = torch.zeros(owners, dtype=torch.float64, device=device)

    def add(self, hidden, targets: list[int], owner: int) -> None:
        self.hidden.append(hidden)
        self.targets += targets
        self.owners += [owner] * len(targets)
        self.waiting += len(targets)
        if self.waiting >= self.chunk:
            self._flush()

    def _flush(self) -> None:
        import torch

        if not self.waiting:
            return
        h = torch.cat(self.hidden)
        tgt = torch.tensor(self.targets, device=self.device)
        own = torch.tensor(self.owners, device=self.device)
        for at in range(0, len(tgt), self.chunk):
            sl = slice(at, at + self.chunk)
            self.sums.index_add_(0, own[sl], self.target_logprobs(h[sl], tgt[sl]).double())
        self.hidden, self.targets, self.owners, self.waiting = [], [], [], 0

    def finish(self) -> list[float]:
        self._flush()
        return self.sums.tolist()


@dataclass
class _ItemPlan:
    """One scored item in `_score_items`: its own context (tokens after the shared prefix), the
    widest of its continuations' inputs, those inputs (rows sharing one input), and where its
    continuations start."""

    context: int
    width: int
    inputs: list[list[int]]
    shared: int

    @property
    def padded(self) -> int:
        """Tokens through the body when it goes alone: its context, and its inputs padded to `width`."""
        return self.context + len(self.inputs) * self.width


def context_window(model) -> int:
    """The model's own context length (`max_position_embeddings`), capped at 32k tokens. Inputs longer
    than this lose tokens from the left; a fixed smaller cap would silently cut long system prompts
    (the HHH prompt is ~4.4k tokens on gemma) and, with them, the shared prefix the KV cache reuses."""
    n = getattr(text_config(model), "max_position_embeddings", None)
    return min(int(n), MAX_CONTEXT) if isinstance(n, int) and n > 0 else 4096


class HFEngine(Engine):
    name = "hf"
    # asked once a decode step; True ends every row at that step (serve sets it: clients gone, shutdown)
    step_hook: Callable[[], bool] | None = None
    decode_head_block = 2048  # vocabulary rows per block in _decode_logits
    # draft tokens a step feeds once a batch is down to one row (prompt lookup, `decode.prompt_lookup`);
    # 0 turns it off
    lookup_tokens = 4
    score_head_block = 1024  # and in _target_logprobs

    def __init__(
        self,
        model_ref: str,
        device: str = "auto",
        dtype: str = "auto",
        batch_size: int | None = None,
        score_batch_tokens: int = 8192,
        score_head_positions: int = 512,
        min_cached_prefix: int = 48,
        min_item_context: int = 8,
        max_length: int | None = None,
        chat_format: str = "plain",
        trust_remote_code: bool = False,
        model=None,
        tokenizer=None,
    ):
        super().__init__(model_ref, chat_format)
        if model is None:
            from selfalign.core.models import load_model

            model, tokenizer = load_model(model_ref, device=device, dtype=dtype, trust_remote_code=trust_remote_code)
            if hasattr(model, "merge_and_unload"):
                # a LoRA adapter this engine only runs: fold it into the base weights once, so that no
                # forward pays for the adapter's extra matmuls (PEFT's merge, exact up to rounding)
                model = model.merge_and_unload()
        self.model = model
        self.tokenizer = tokenizer
        self.device = next(model.parameters()).device
        if self.device.type == "cpu":
            from selfalign.core.engines.cpu_matmul import lay_out_linears

            # the head keeps its own paths (_decode_logits, _target_logprobs)
            lay_out_linears(model, skip=(model.get_output_embeddings(),))
        self.batch_size = batch_size or (64 if self.device.type == "cuda" else 16)
        self.score_batch_tokens = score_batch_tokens
        self.score_head_positions = score_head_positions
        self.min_cached_prefix = min_cached_prefix
        self.min_item_context = min_item_context
        self._head_fn = False  # not checked yet; see _head()
        self._logits_buffer = None  # reused by _target_logprobs
        self._decode_buffers = None  # reused by _decode_logits
        self._kept_prefix: tuple | None = None  # (tokens, KV cache) of the last shared prefix
        self.max_length = max_length or context_window(model)
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token

    # -- helpers -------------------------------------------------------------------------------
    def _encode(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=True)["input_ids"]

    def _left_pad(self, seqs: list[list[int]]):
        import torch

        width = max(len(s) for s in seqs)
        pad = self.tokenizer.pad_token_id
        ids = torch.full((len(seqs), width), pad, dtype=torch.long)
        mask = torch.zeros((len(seqs), width), dtype=torch.long)
        for r, s in enumerate(seqs):
            if s:
                ids[r, width - len(s):] = torch.tensor(s, dtype=torch.long)
                mask[r, width - len(s):] = 1
        return ids.to(self.device), mask.to(self.device)

    # -- generation ----------------------------------------------------------------------------
    def generate_iter(
        self, requests: Sequence[Request], sampling: Sampling
    ) -> Iterator[list[tuple[int, list[Completion]]]]:
        from selfalign.core.engines.decode import DecodeProfile, Rows, StopWatch, decode, row_seed

        prompts = [self.render(r) for r in requests]
        stops = [tuple(self.stops_for(r, sampling)) for r in requests]
        encoded = [self._encode(p)[-self.max_length:] for p in prompts]
        # Similar lengths in a batch (little padding); every row carries its own stops and seed, and
        # leaves the batch when it is done, so a batch may mix stops.
        order = sorted(range(len(requests)), key=lambda i: -len(encoded[i]))
        batches = [order[at: at + self.batch_size] for at in range(0, len(order), self.batch_size)]
        eos_ids = self.model.generation_config.eos_token_id
        eos_ids = set(eos_ids if isinstance(eos_ids, list) else [eos_ids]) | {self.tokenizer.eos_token_id}
        eos_ids.discard(None)
        prefix = self._shared_prefix([(e, 0) for e in encoded]) if len(encoded) > 1 else 0
        prefix_cache = self._prefix_cache(encoded[0][:prefix]) if prefix >= self.min_cached_prefix else None
        watches = {s: StopWatch(self.tokenizer, s) for s in set(stops)}
        self.last_profile = DecodeProfile()
        for batch in batches:
            members = [(i, j) for i in batch for j in range(sampling.n)]  # n samples: n rows each
            seqs = [encoded[i] for i, _ in members]
            if prefix_cache is not None:
                # the rows share a long prefix (the Self-Align principles, an HHH prompt): reuse its
                # KV cache; each row is [prefix][pads][own tokens]
                ids, mask = self._pad_after_prefix(seqs, prefix)
                past = self._growing_cache(fork_cache(prefix_cache), ids.shape[1] - prefix + sampling.max_new_tokens)
                past.batch_repeat_interleave(len(seqs))
                cached = prefix
            else:
                ids, mask = self._left_pad(seqs)
                past = self._growing_cache(None, ids.shape[1] + sampling.max_new_tokens)
                cached = 0
            rows = Rows(ids, mask, [watches[stops[i]] for i, _ in members],
                        [row_seed(sampling.seed, prompts[i], j) for i, j in members], cached, past)
            new = decode(self._decode_step, rows, max_new_tokens=sampling.max_new_tokens,
                         temperature=sampling.temperature, top_p=sampling.top_p, eos_ids=eos_ids,
                         repetition_penalty=sampling.repetition_penalty, profile=self.last_profile,
                         should_stop=self.step_hook, lookup=self.lookup_tokens)
            results = {i: [] for i in batch}
            for (i, _), toks in zip(members, new, strict=True):
                results[i].append(self._completion(toks, eos_ids, stops[i], len(encoded[i])))
            yield [(i, results[i]) for i in batch]

    def _growing_cache(self, cache, room: int):
        """The decoding loop's KV cache: `cache` (or a new empty one) with layers that grow in place,
        `room` positions ahead (`kv_slab`), instead of copying every row's cache at every step. On a
        transformers whose caches have no layers, `cache` as it is (None when there was none: the model
        then makes its own). `cache` must be a fork (`fork_cache`): its layer list is replaced."""
        from transformers import DynamicCache

        from selfalign.core.engines.kv_slab import slab

        if cache is None:
            try:
                cache = DynamicCache(config=self.model.config)
            except TypeError:  # an older transformers: no config-built layers
                return None
        return slab(cache, room) if hasattr(cache, "layers") else cache

    def _completion(self, toks: list[int], eos_ids: set[int], stops: Sequence[str], prompt_tokens: int) -> Completion:
        """A row's tokens as a Completion: cut at EOS and at the earliest stop string; the tokens
        generated past the kept text (the stop string's, the EOS) are counted as discarded."""
        from selfalign.core.engines.decode import kept_token_count

        ended = next((k for k, t in enumerate(toks) if t in eos_ids), None)
        body = toks[:ended] if ended is not None else toks
        text = self.tokenizer.decode(body, skip_special_tokens=True)
        hit = first_stop(text, stops)
        text, stopped = truncate_at_stop(text, stops)
        kept = kept_token_count(self.tokenizer, body, text) if stopped else len(body)
        reason = "stop" if (ended is not None or stopped) else "length"
        return Completion(text, reason, kept, prompt_tokens, stop_string=hit, discarded_tokens=len(toks) - kept)

    def _decode_step(self, ids, mask, pos, past, last: int = 1):
        """One forward over new tokens: (seconds in the body, logits, grown cache). The output layer
        runs on the last position only (or on the last `last` of a single row: prompt lookup's
        drafts), and the logits are (rows, vocab) (or (last, vocab))."""
        import time

        import torch

        head = self._head()
        with torch.inference_mode():
            t0 = time.perf_counter()
            if head is not None:
                out = self.model.get_decoder()(input_ids=ids, attention_mask=mask, position_ids=pos,
                                               use_cache=True, **{kv_cache_name(): past})
                body_s = time.perf_counter() - t0
                hidden = out.last_hidden_state[:, -last:]
                logits = self._decode_logits(hidden.reshape(-1, hidden.shape[-1]))
            else:
                out = self.model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True,
                                 logits_to_keep=last, **{kv_cache_name(): past})
                body_s = time.perf_counter() - t0
                logits = out.logits[:, -last:].reshape(-1, out.logits.shape[-1]).float()
        return body_s, logits, out[kv_cache_name()]

    def _plain_head_weight(self):
        """The output layer's weight when it is a float32, bias-free `nn.Linear` on a CPU (the embedded
        model), the case the hand-laid head paths below are for; else None (the plain head)."""
        import torch

        linear = self.model.get_output_embeddings()
        weight = getattr(linear, "weight", None)
        if (self.device.type != "cpu" or not isinstance(linear, torch.nn.Linear) or linear.bias is not None
                or weight.dtype != torch.float32):
            return None
        return weight

    def _decode_logits(self, hidden):
        """The output layer at each row's last position while decoding (`hidden`: rows x width).

        On a CPU with a float32 bias-free head and 2+ rows, the logits are computed a vocabulary block
        at a time as weight_block @ hiddenᵀ and copied into a kept rows x vocab buffer: MKL runs
        the (block x width) @ (width x rows) product at a higher rate than rows x vocab directly
        (measured on 2 AMD EPYC cores, gemma's 262k x 640 head: 192 -> 114 ms at 16 rows, 298 ->
        184 ms at 32, 450 -> 329 ms at 64; `benchmarks/bench_throughput.py`), and every logit is
        the same dot product, bit for bit (tested). One row reads the weights once either way."""
        import torch

        weight = self._plain_head_weight()
        rows = hidden.shape[0]
        if weight is None or rows < 2 or hidden.dtype != torch.float32:
            return self._head()(hidden)
        vocab, block = weight.shape[0], self.decode_head_block
        bufs = self._decode_buffers
        if bufs is None or bufs[0].shape[0] < rows:
            bufs = self._decode_buffers = (torch.empty((rows, vocab)), torch.empty(block * rows))
        logits, tmp = bufs[0][:rows], bufs[1][: block * rows].view(block, rows)
        with torch.inference_mode():
            ht = hidden.t()
            for at in range(0, vocab, block):
                part = tmp[: min(block, vocab - at)]
                torch.mm(weight[at: at + block], ht, out=part)
                logits[:, at: at + block].copy_(part.t())
            if cap := self._softcap():
                logits.div_(cap).tanh_().mul_(cap)
        return logits

    def _prefix_cache(self, tokens: list[int]):
        """The KV cache of `tokens`, kept for the next call too: an eval scores its items chunk by
        chunk (to write rows as it goes), and a 4k-token system prompt costs ~30 s to recompute on
        CPU. Callers fork it (`fork_cache`) before use, so the kept one is never extended."""
        import torch

        key = tuple(tokens)
        if self._kept_prefix is not None and self._kept_prefix[0] == key:
            return self._kept_prefix[1]
        with torch.inference_mode():
            # the body only: the prefix's KV cache is all that is kept, and the output layer at every
            # position of a ~1.9k-token principle prompt is 0.6 TFLOP and a 2 GB logits tensor on gemma
            cache = self.model.get_decoder()(input_ids=torch.tensor([tokens], device=self.device), use_cache=True)[
                kv_cache_name()
            ]
        self._kept_prefix = (key, cache)
        return cache

    def _pad_after_prefix(self, seqs: list[list[int]], prefix: int):
        """[prefix][pads][rest]: every row ends at the last column, the prefix's cache slots stay
        where they were computed. (For sliding-window attention the pads take window slots: rows
        are sorted by length, so there are few.)"""
        import torch

        width = max(len(s) for s in seqs)
        ids = torch.full((len(seqs), width), self.tokenizer.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(seqs), width), dtype=torch.long)
        for r, s in enumerate(seqs):
            ids[r, :prefix] = torch.tensor(s[:prefix])
            ids[r, width - len(s) + prefix:] = torch.tensor(s[prefix:])
            mask[r, :prefix] = 1
            mask[r, width - len(s) + prefix:] = 1
        return ids.to(self.device), mask.to(self.device)

    # -- scoring -------------------------------------------------------------------------------
    def _score_rows(self, items: Sequence[tuple[Request, Sequence[str]]]) -> list[tuple[list[int], int]]:
        return score_token_rows(self, items, self.max_length + 1)

    def score_many(self, items: Sequence[tuple[Request, Sequence[str]]]) -> list[list[float]]:
        rows = self._score_rows(items)
        groups, at = [], 0
        for _, continuations in items:
            groups.append(list(range(at, at + len(continuations))))
            at += len(continuations)
        prefix = self._shared_prefix(rows)
        if self._head() is not None and any(self._item_shares_context(rows, g) for g in groups):
            # an item's continuations share its context: run the context once, then the replies
            scores = self._score_items(rows, groups, prefix if prefix >= self.min_cached_prefix else 0)
        elif prefix >= self.min_cached_prefix:
            scores = self._score_with_prefix(rows, prefix)
        else:
            scores = self._score_rows_batched(rows)
        return [scores[g[0]: g[-1] + 1] if g else [] for g in groups]

    def _item_shares_context(self, rows: list[tuple[list[int], int]], group: list[int]) -> bool:
        """Two or more continuations, not all one token (those share one forward anyway), after a
        shared context of at least `min_item_context` tokens."""
        if len(group) < 2 or all(rows[r][1] == 1 for r in group):
            return False
        return self._shared_prefix([rows[r] for r in group]) >= self.min_item_context

    def _score_items(self, rows: list[tuple[list[int], int]], groups: list[list[int]], prefix: int) -> list[float]:
        """Item by item in effect, several items per forward in practice. An item's context runs
        through the body once (after the `prefix` every row shares, whose cache is computed once for
        the whole call), then its continuations together on top of that cache. Items are packed:
        the contexts of a pack go through the body in one right-padded batch, then every
        continuation of the pack in one batch on top of its own item's context (the cache rows
        picked by item). One item at a time, the body's matmuls had ~10-100 rows and ran at a third
        of the machine's matmul rate (TruthfulQA's answers are ~8 tokens).

        Padding between an item's context and its continuations is masked, and a pack is only formed
        while every row fits in the model's sliding window (a padded slot counts against the window,
        so a longer row would see fewer real tokens than it does alone); an item too long for that
        goes alone, with no padding before its continuations. The hidden states at the scored
        positions are queued and the output layer runs on them in chunks of `score_head_positions`
        across items: gemma's head is 168M parameters, so running it on a few positions at a time
        would mostly read weights."""
        import torch

        queue = _LogprobQueue(self._target_logprobs, self.score_head_positions, len(rows), self.device)
        base = self._prefix_cache(rows[0][0][:prefix]) if prefix else None
        window = self._sliding_window()
        plans = []
        for group in groups:
            if not group:
                continue
            shared = max(prefix, self._shared_prefix([rows[r] for r in group]))
            inputs: dict[tuple, list[int]] = {}  # rows with the same input (single-token choices) share one batch row
            for r in group:
                whole, n = rows[r]
                inputs.setdefault(tuple(whole[shared:-1]) if n == 1 else (r,), []).append(r)
            widths = [len(rows[members[0]][0]) - 1 - shared for members in inputs.values()]
            plans.append(_ItemPlan(shared - prefix, max(widths), list(inputs.values()), shared))
        plans.sort(key=lambda p: (p.context, p.width))  # similar lengths together: little padding
        pack: list[_ItemPlan] = []
        with torch.inference_mode():
            for plan in plans:
                if pack and not self._fits(pack + [plan], prefix, window):
                    self._score_pack(pack, rows, prefix, base, queue)
                    pack = []
                pack.append(plan)
            if pack:
                self._score_pack(pack, rows, prefix, base, queue)
            return queue.finish()

    def _fits(self, pack: list[_ItemPlan], prefix: int, window: int | None) -> bool:
        """Whether these items can share a forward: no mix of items with and without a context of
        their own, every row within the sliding window, at most `score_batch_tokens / 2` new tokens
        through the body (the prefix's cache is copied per row, so rows cost memory), and, once the
        pack is past `score_batch_tokens / 8` tokens, at most a quarter more tokens through the body
        than its items would take alone. Short items (TruthfulQA, the capability tasks) gain most
        from packing and pad little; HHH's replies run from 2 to 300 tokens, and packed regardless
        its padding cost more than the bigger batches saved (251 s against 221 s unpacked)."""
        ctx, width = max(p.context for p in pack), max(p.width for p in pack)
        if len({p.context > 0 for p in pack}) > 1:
            return False
        if window is not None and prefix + ctx + width > window:
            return False
        rows = sum(len(p.inputs) for p in pack)
        padded = len(pack) * ctx + rows * width
        if padded > max(1.25 * sum(p.padded for p in pack), self.score_batch_tokens // 8):
            return False
        return rows * (ctx + width) <= self.score_batch_tokens // 2

    def _score_pack(self, pack: list[_ItemPlan], rows, prefix: int, base, queue: _LogprobQueue) -> None:
        import torch

        body, name, pad = self.model.get_decoder(), kv_cache_name(), self.tokenizer.pad_token_id
        ctx = max(p.context for p in pack)
        past = None
        if base is not None:
            past = fork_cache(base)
            past.batch_repeat_interleave(len(pack))
        if ctx:
            ids = torch.full((len(pack), ctx), pad, dtype=torch.long)
            mask = torch.zeros((len(pack), prefix + ctx), dtype=torch.long)
            mask[:, :prefix] = 1
            for g, p in enumerate(pack):
                ids[g, : p.context] = torch.tensor(rows[p.inputs[0][0]][0][prefix: p.shared])
                mask[g, prefix: prefix + p.context] = 1
            pos = torch.arange(prefix, prefix + ctx, device=self.device).expand(len(pack), -1)
            past = body(input_ids=ids.to(self.device), attention_mask=mask.to(self.device), position_ids=pos,
                        use_cache=True, **{name: past})[name]
        heads = [(g, members, rows[members[0]][0][pack[g].shared:-1]) for g, p in enumerate(pack)
                 for members in p.inputs]
        heads.sort(key=lambda h: len(h[2]))
        for part in self._split_by_width([len(h[2]) for h in heads]):
            self._score_continuations([heads[b] for b in part], pack, rows, prefix, ctx, past, queue)

    @staticmethod
    def _split_by_width(lengths: list[int], slack: float = 1.25, extra: int = 64) -> list[list[int]]:
        """Consecutive runs of `lengths` (sorted ascending) to run as one right-padded batch each: a
        run grows while its padded size stays within `slack` times its real tokens plus `extra`.
        TruthfulQA's answers to one question run from 2 to 30 tokens; padded to the longest of a
        pack, 38% of the tokens through the body were padding."""
        runs: list[list[int]] = []
        real = 0
        for b, n in enumerate(lengths):
            if runs and (len(runs[-1]) + 1) * n <= slack * (real + n) + extra:
                runs[-1].append(b)
                real += n
            else:
                runs.append([b])
                real = n
        return runs

    def _score_continuations(self, heads, pack: list[_ItemPlan], rows, prefix: int, ctx: int, past,
                             queue: _LogprobQueue) -> None:
        """One batch of continuations, each on its own item's context rows of `past` (the pack's
        cache; None when the items have no context and no prefix), right-padded to the longest."""
        import torch

        body, name, pad = self.model.get_decoder(), kv_cache_name(), self.tokenizer.pad_token_id
        width = max(len(suffix) for _, _, suffix in heads)
        ids = torch.full((len(heads), width), pad, dtype=torch.long)
        mask = torch.zeros((len(heads), prefix + ctx + width), dtype=torch.long)
        pos = torch.zeros((len(heads), width), dtype=torch.long)
        mask[:, :prefix] = 1
        for b, (g, _, suffix) in enumerate(heads):
            p = pack[g]
            ids[b, : len(suffix)] = torch.tensor(suffix, dtype=torch.long)
            mask[b, prefix: prefix + p.context] = 1
            mask[b, prefix + ctx: prefix + ctx + len(suffix)] = 1
            pos[b] = torch.arange(p.shared, p.shared + width)
        if past is not None:
            past = fork_cache(past)
            past.batch_select_indices(torch.tensor([g for g, _, _ in heads], device=self.device))
        hidden = body(input_ids=ids.to(self.device), attention_mask=mask.to(self.device),
                      position_ids=pos.to(self.device), use_cache=past is not None, **{name: past}).last_hidden_state
        for b, (g, members, _) in enumerate(heads):
            for r in members:
                whole, n = rows[r]
                first = len(whole) - 1 - pack[g].shared - n
                queue.add(hidden[b, first: first + n], whole[-n:], r)

    def _sliding_window(self) -> int | None:
        """The model's attention window, when any of its layers has one (gemma 3: 512)."""
        cfg = text_config(self.model)
        window = getattr(cfg, "sliding_window", None)
        types = getattr(cfg, "layer_types", None)
        if window and (types is None or any("sliding" in t for t in types)):
            return int(window)
        return None

    @staticmethod
    def _shared_prefix(rows: list[tuple[list[int], int]]) -> int:
        """Tokens every row starts with, stopping before the first position any row is scored at."""
        if not rows:
            return 0
        first = rows[0][0]
        n = min(len(w) - c - 1 for w, c in rows)
        for whole, _ in rows[1:]:
            i = 0
            while i < n and whole[i] == first[i]:
                i += 1
            n = i
        return n

    def _batches(self, order: list[int], width_of) -> list[list[int]]:
        """Consecutive rows of `order` while the padded batch stays under `score_batch_tokens`."""
        batches: list[list[int]] = []
        for r in order:
            if batches and max(map(width_of, batches[-1] + [r])) * (len(batches[-1]) + 1) <= self.score_batch_tokens:
                batches[-1].append(r)
            else:
                batches.append([r])
        return batches

    def _head(self):
        """The output layer as a function of the body's last hidden states, or None when this
        architecture does something the split does not reproduce (checked once on a short input)."""
        import torch

        if self._head_fn is not False:
            return self._head_fn
        cfg = text_config(self.model)
        cap = self._softcap()
        head, body = self.model.get_output_embeddings(), self.model.get_decoder()

        def head_fn(h):
            logits = head(h).float()
            return torch.tanh(logits / cap) * cap if cap else logits

        probe = torch.tensor([[self.tokenizer.bos_token_id or 0, 5, 6, 7]], device=self.device) % cfg.vocab_size
        with torch.inference_mode():
            full = self.model(input_ids=probe, use_cache=False).logits.float()
            split = head_fn(body(input_ids=probe, use_cache=False).last_hidden_state)
        self._head_fn = head_fn if torch.allclose(full, split, atol=1e-3, rtol=1e-3) else None
        return self._head_fn

    def _target_logprobs(self, hidden, targets):
        """log p(target) at each row of `hidden` (last hidden states), through the output layer.

        On a CPU with a float32 bias-free output layer (the embedded model) the log-sum-exp runs a
        vocabulary block at a time: weight_block @ hiddenᵀ into a small kept buffer, its maximum and
        sum of exponentials per position, merged across blocks at the end; the target's logit is
        its own dot product. No positions x vocab tensor is made (512 x 262k floats = 0.5 GB on
        gemma), and MKL runs the block-shaped product faster than hidden @ weightᵀ. Measured on 2
        cores, 512 positions of gemma's head: 1.35 s against 1.55 s for the whole logits in one
        kept buffer, which was itself 1.6 s against 2.1 s for fresh tensors; equal to 2e-6.
        Elsewhere, the plain head."""
        import torch

        head, weight = self._head(), self._plain_head_weight()
        if weight is None or hidden.dtype != torch.float32:
            logits = head(hidden)
            return logits.gather(-1, targets[:, None]).squeeze(-1) - torch.logsumexp(logits, dim=-1)
        n, vocab, block = hidden.shape[0], weight.shape[0], self.score_head_block
        cap = self._softcap()
        with torch.inference_mode():
            if self._logits_buffer is None or self._logits_buffer.numel() < block * n:
                self._logits_buffer = torch.empty(block * max(n, self.score_head_positions), dtype=torch.float32)
            tmp = self._logits_buffer[: block * n].view(block, n)
            blocks = (vocab + block - 1) // block
            maxes, sums = hidden.new_empty((blocks, n)), hidden.new_empty((blocks, n))
            ht = hidden.t()
            for b in range(blocks):
                part = tmp[: min(block, vocab - b * block)]
                torch.mm(weight[b * block: (b + 1) * block], ht, out=part)
                if cap:
                    part.div_(cap).tanh_().mul_(cap)
                top = part.amax(0)
                maxes[b] = top
                sums[b] = part.sub_(top).exp_().sum(0)
            top = maxes.amax(0)
            picked = (hidden * weight[targets]).sum(-1)
            if cap:
                picked = torch.tanh(picked / cap) * cap
            return picked - ((sums * (maxes - top).exp_()).sum(0).log_() + top)

    def _softcap(self) -> float | None:
        return getattr(text_config(self.model), "final_logit_softcapping", None)

    def _logprob_sums(self, hidden, picks: list[tuple[int, int, list[int]]]) -> list[float]:
        """For each (batch row, first position, target tokens): the summed log-probability of the
        targets read at positions first .. first+len-1, computing the output layer only there, in
        chunks of `score_head_positions` positions to bound memory."""
        import torch

        rows_idx, pos_idx, targets, owner = [], [], [], []
        for k, (b, first, target) in enumerate(picks):
            rows_idx += [b] * len(target)
            pos_idx += range(first, first + len(target))
            targets += target
            owner += [k] * len(target)
        h = hidden[torch.tensor(rows_idx), torch.tensor(pos_idx)]
        tgt = torch.tensor(targets, device=h.device)
        lp = torch.empty(len(targets), device=h.device)
        for at in range(0, len(targets), self.score_head_positions):
            sl = slice(at, at + self.score_head_positions)
            lp[sl] = self._target_logprobs(h[sl], tgt[sl])
        sums = torch.zeros(len(picks), device=h.device).index_add_(0, torch.tensor(owner, device=h.device), lp)
        return sums.tolist()

    def _forward(self, ids, mask, pos, past=None):
        """Last hidden states (the split path) or full logits over the needed tail (fallback)."""
        import torch

        with torch.inference_mode():
            if self._head() is not None:
                return self.model.get_decoder()(
                    input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=past is not None,
                    **{kv_cache_name(): past}
                ).last_hidden_state
            return self.model(input_ids=ids, attention_mask=mask, position_ids=pos,
                              use_cache=past is not None, **{kv_cache_name(): past}).logits

    def _sums(self, out, picks):
        import torch

        if self._head() is not None:
            with torch.inference_mode():
                return self._logprob_sums(out, picks)
        logits = out.float()
        lse = torch.logsumexp(logits, dim=-1)
        return [float((logits[b, p: p + len(t)].gather(-1, torch.tensor(t, device=logits.device)[:, None]).squeeze(-1)
                       - lse[b, p: p + len(t)]).sum())
                for b, p, t in picks]

    @staticmethod
    def _share_inputs(rows: list[tuple[list[int], int]]) -> list[list[int]]:
        """Rows grouped by identical input; only single-token continuations can share one (their
        log-probabilities are all read at the same last position)."""
        groups: dict[tuple, list[int]] = {}
        for r, (whole, n) in enumerate(rows):
            groups.setdefault(tuple(whole[:-1]) if n == 1 else (r,), []).append(r)
        return list(groups.values())

    def _score_rows_batched(self, rows: list[tuple[list[int], int]]) -> list[float]:
        """Left-padded batches of distinct inputs. Single-token continuations of the same context
        (" A" vs " B", " yes" vs " no") share one input row: one forward serves all of them."""
        uniq = self._share_inputs(rows)
        scores = [0.0] * len(rows)
        order = sorted(range(len(uniq)), key=lambda u: len(rows[uniq[u][0]][0]))
        for batch in self._batches(order, lambda u: len(rows[uniq[u][0]][0])):
            ids, mask = self._left_pad([rows[uniq[u][0]][0][:-1] for u in batch])
            pos = (mask.cumsum(-1) - 1).clamp(min=0)
            out = self._forward(ids, mask, pos)
            width = ids.shape[1]
            members = [r for u in batch for r in uniq[u]]
            picks = [(b, width - rows[r][1], rows[r][0][-rows[r][1]:]) for b, u in enumerate(batch) for r in uniq[u]]
            for r, value in zip(members, self._sums(out, picks), strict=True):
                scores[r] = value
        return scores

    def _score_with_prefix(self, rows: list[tuple[list[int], int]], prefix: int) -> list[float]:
        """Run the prefix all rows share once (a system prompt, few-shot examples, principles) and
        reuse its KV cache for every batch; suffixes are right-padded so cache slots stay contiguous."""
        import torch

        cache = self._prefix_cache(rows[0][0][:prefix])
        scores = [0.0] * len(rows)
        suffix = [w[prefix:-1] for w, _ in rows]
        uniq = self._share_inputs(rows)
        order = sorted(range(len(uniq)), key=lambda u: len(suffix[uniq[u][0]]))
        pad = self.tokenizer.pad_token_id
        for batch in self._batches(order, lambda u: len(suffix[uniq[u][0]])):
            heads = [uniq[u][0] for u in batch]
            width = max(len(suffix[r]) for r in heads)
            ids = torch.full((len(batch), width), pad, dtype=torch.long)
            mask = torch.zeros((len(batch), prefix + width), dtype=torch.long)
            mask[:, :prefix] = 1
            for b, r in enumerate(heads):
                ids[b, : len(suffix[r])] = torch.tensor(suffix[r])
                mask[b, prefix: prefix + len(suffix[r])] = 1
            pos = torch.arange(prefix, prefix + width).expand(len(batch), -1)
            past = fork_cache(cache)
            past.batch_repeat_interleave(len(batch))
            out = self._forward(ids.to(self.device), mask.to(self.device), pos.to(self.device), past)
            members = [r for u in batch for r in uniq[u]]
            picks = [(b, len(suffix[r]) - rows[r][1], rows[r][0][-rows[r][1]:]) for b, u in enumerate(batch)
                     for r in uniq[u]]
            for r, value in zip(members, self._sums(out, picks), strict=True):
                scores[r] = value
        return scores

    def forget_prefix(self) -> None:
        """Drop the kept prefix cache (frees its memory; the next shared prefix is computed afresh)
        and the scoring logits buffer."""
        self._kept_prefix = None
        self._logits_buffer = None
        self._decode_buffers = None

    def close(self) -> None:
        self.forget_prefix()
        self.model = None
