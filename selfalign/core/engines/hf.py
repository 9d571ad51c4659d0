"""The `hf` engine: transformers on CPU or GPU, in-process. The default.

Generation is batched: requests are tokenized, sorted by length (so a batch holds prompts of
similar length and little padding), left-padded and sampled with `model.generate`. Scoring
feeds each (context + continuation) through the model's own forward, left-padded so that every
continuation ends at the last position, and asks for logits only over the last k positions
(`logits_to_keep`), k being the longest continuation in the batch. With gemma's 262k-token
vocabulary the output layer costs more than the rest of the network per position, so this is
what makes scoring cheap; `benchmarks/bench_engine.py` measures it against full logits.
"""

from __future__ import annotations

import copy
import hashlib
from collections.abc import Iterator, Sequence

from selfalign.core.chat import Request, first_stop, truncate_at_stop
from selfalign.core.compat import kv_cache_name
from selfalign.core.engines.base import Completion, Engine, Sampling, score_token_rows


def _batch_seed(seed: int, key: str) -> int:
    return int(hashlib.sha256(f"{seed}|{key}".encode()).hexdigest()[:8], 16)


MAX_CONTEXT = 32768


def context_window(model) -> int:
    """The model's own context length (`max_position_embeddings`), capped at 32k tokens. Inputs longer
    than this lose tokens from the left; a fixed smaller cap would silently cut long system prompts
    (the HHH prompt is ~4.4k tokens on gemma) and, with them, the shared prefix the KV cache reuses."""
    cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    n = getattr(cfg, "max_position_embeddings", None)
    return min(int(n), MAX_CONTEXT) if isinstance(n, int) and n > 0 else 4096


class HFEngine(Engine):
    name = "hf"

    def __init__(
        self,
        model_ref: str,
        device: str = "auto",
        dtype: str = "auto",
        batch_size: int | None = None,
        score_batch_tokens: int = 8192,
        score_head_positions: int = 512,
        min_cached_prefix: int = 48,
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
        self.model = model
        self.tokenizer = tokenizer
        self.device = next(model.parameters()).device
        self.batch_size = batch_size or (64 if self.device.type == "cuda" else 16)
        self.score_batch_tokens = score_batch_tokens
        self.score_head_positions = score_head_positions
        self.min_cached_prefix = min_cached_prefix
        self._head_fn = False  # not checked yet; see _head()
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
        import torch
        from transformers import LogitsProcessorList

        from selfalign.core.engines.sampling import TemperatureTopP

        prompts = [self.render(r) for r in requests]
        stops = [tuple(self.stops_for(r, sampling)) for r in requests]
        encoded = [self._encode(p)[-self.max_length:] for p in prompts]
        # Same stops in a batch (a stop ends generation for the rows that asked for it), then by length.
        order = sorted(range(len(requests)), key=lambda i: (stops[i], -len(encoded[i])))
        batches: list[list[int]] = []
        for i in order:
            if batches and len(batches[-1]) < self.batch_size and stops[batches[-1][0]] == stops[i]:
                batches[-1].append(i)
            else:
                batches.append([i])
        eos_ids = self.model.generation_config.eos_token_id
        eos_ids = set(eos_ids if isinstance(eos_ids, list) else [eos_ids]) | {self.tokenizer.eos_token_id}
        eos_ids.discard(None)
        prefix = self._shared_prefix([(e, 0) for e in encoded]) if len(encoded) > 1 else 0
        prefix_cache = self._prefix_cache(encoded[0][:prefix]) if prefix >= self.min_cached_prefix else None
        for batch in batches:
            kwargs = dict(
                max_new_tokens=sampling.max_new_tokens,
                pad_token_id=self.tokenizer.pad_token_id,
                repetition_penalty=sampling.repetition_penalty,
            )
            rows = [encoded[i] for i in batch for _ in range(sampling.n)]  # n samples: n rows each
            if prefix_cache is not None:
                # the rows share a long prefix (the Self-Align principles, an HHH prompt): reuse its
                # KV cache; each row is [prefix][pads][own tokens]
                ids, mask = self._pad_after_prefix(rows, prefix)
                past = copy.deepcopy(prefix_cache)
                past.batch_repeat_interleave(len(rows))
                kwargs[kv_cache_name()] = past
            else:
                ids, mask = self._left_pad(rows)
            batch_stops = list(stops[batch[0]])
            if sampling.temperature > 0:
                # our warper does temperature and top-p; transformers' own would sort the whole vocabulary
                warper = LogitsProcessorList([TemperatureTopP(sampling.temperature, sampling.top_p)])
                kwargs.update(do_sample=True, temperature=1.0, top_p=1.0, top_k=0, logits_processor=warper)
            else:
                kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
            if batch_stops:
                kwargs.update(stop_strings=batch_stops, tokenizer=self.tokenizer)
            torch.manual_seed(_batch_seed(sampling.seed, prompts[batch[0]]))
            with torch.inference_mode():
                out = self.model.generate(input_ids=ids, attention_mask=mask, **kwargs)
            new = out[:, ids.shape[1]:].tolist()
            results = []
            for b, i in enumerate(batch):
                comps = []
                for j in range(sampling.n):
                    toks = new[b * sampling.n + j]
                    ended = next((k for k, t in enumerate(toks) if t in eos_ids), None)
                    if ended is not None:
                        toks = toks[:ended]
                    text = self.tokenizer.decode(toks, skip_special_tokens=True)
                    hit = first_stop(text, stops[i])
                    text, stopped = truncate_at_stop(text, stops[i])
                    reason = "stop" if (ended is not None or stopped) else "length"
                    comps.append(Completion(text, reason, len(toks), len(encoded[i]), stop_string=hit))
                results.append((i, comps))
            yield results

    def _prefix_cache(self, tokens: list[int]):
        """The KV cache of `tokens`, kept for the next call too: an eval scores its items chunk by
        chunk (to write rows as it goes), and a 4k-token system prompt costs ~30 s to recompute on
        CPU. Callers deep-copy it before use, so the kept one is never extended."""
        import torch

        key = tuple(tokens)
        if self._kept_prefix is not None and self._kept_prefix[0] == key:
            return self._kept_prefix[1]
        with torch.inference_mode():
            cache = self.model(input_ids=torch.tensor([tokens], device=self.device), use_cache=True)[kv_cache_name()]
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
        prefix = self._shared_prefix(rows)
        if prefix >= self.min_cached_prefix:
            scores = self._score_with_prefix(rows, prefix)
        else:
            scores = self._score_rows_batched(rows)
        out, at = [], 0
        for _, continuations in items:
            out.append(scores[at: at + len(continuations)])
            at += len(continuations)
        return out

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
        cfg = self.model.config.get_text_config() if hasattr(self.model.config, "get_text_config") else self.model.config
        cap = getattr(cfg, "final_logit_softcapping", None)
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
        head = self._head()
        for at in range(0, len(targets), self.score_head_positions):
            sl = slice(at, at + self.score_head_positions)
            logits = head(h[sl])
            lp[sl] = logits.gather(-1, tgt[sl, None]).squeeze(-1) - torch.logsumexp(logits, dim=-1)
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
        return [float((logits[b, p: p + len(t)].gather(-1, torch.tensor(t, device=logits.device)[:, None]).squeeze(-1) - lse[b, p: p + len(t)]).sum())
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
            past = copy.deepcopy(cache)
            past.batch_repeat_interleave(len(batch))
            out = self._forward(ids.to(self.device), mask.to(self.device), pos.to(self.device), past)
            members = [r for u in batch for r in uniq[u]]
            picks = [(b, len(suffix[r]) - rows[r][1], rows[r][0][-rows[r][1]:]) for b, u in enumerate(batch) for r in uniq[u]]
            for r, value in zip(members, self._sums(out, picks), strict=True):
                scores[r] = value
        return scores

    def forget_prefix(self) -> None:
        """Drop the kept prefix cache (frees its memory; the next shared prefix is computed afresh)."""
        self._kept_prefix = None

    def close(self) -> None:
        self.forget_prefix()
        self.model = None
