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

import hashlib
from collections.abc import Iterator, Sequence

from selfalign.chat import Request, truncate_at_stop
from selfalign.engines.base import Completion, Engine, Sampling, split_context


def _batch_seed(seed: int, key: str) -> int:
    return int(hashlib.sha256(f"{seed}|{key}".encode()).hexdigest()[:8], 16)


class HFEngine(Engine):
    name = "hf"

    def __init__(
        self,
        model_ref: str,
        device: str = "auto",
        dtype: str = "auto",
        batch_size: int | None = None,
        score_batch_tokens: int = 4096,
        score_head_positions: int = 512,
        max_length: int = 4096,
        chat_format: str = "plain",
        trust_remote_code: bool = False,
        model=None,
        tokenizer=None,
    ):
        super().__init__(model_ref, chat_format)
        if model is None:
            from selfalign.models import load_model

            model, tokenizer = load_model(model_ref, device=device, dtype=dtype, trust_remote_code=trust_remote_code)
        self.model = model
        self.tokenizer = tokenizer
        self.device = next(model.parameters()).device
        self.batch_size = batch_size or (32 if self.device.type == "cuda" else 8)
        self.score_batch_tokens = score_batch_tokens
        self.score_head_positions = score_head_positions
        self.max_length = max_length
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

        from selfalign.engines.sampling import TemperatureTopP

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
        for batch in batches:
            ids, mask = self._left_pad([encoded[i] for i in batch])
            batch_stops = list(stops[batch[0]])
            kwargs = dict(
                max_new_tokens=sampling.max_new_tokens,
                num_return_sequences=sampling.n,
                pad_token_id=self.tokenizer.pad_token_id,
                repetition_penalty=sampling.repetition_penalty,
            )
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
                    text, stopped = truncate_at_stop(text, stops[i])
                    reason = "stop" if (ended is not None or stopped) else "length"
                    comps.append(Completion(text, reason, len(toks), len(encoded[i])))
                results.append((i, comps))
            yield results

    # -- scoring -------------------------------------------------------------------------------
    def _score_rows(self, items: Sequence[tuple[Request, Sequence[str]]]) -> list[tuple[list[int], int]]:
        """Token rows (context + continuation, last token dropped) and each continuation's length."""
        rows = []
        for context, continuations in items:
            ctx_text = self.render(context)
            for cont in continuations:
                ctx, cont = split_context(ctx_text, cont)
                ctx_ids = self._encode(ctx)
                whole = self._encode(ctx + cont)
                if not ctx_ids:  # no BOS and no context: condition on EOS, as lm-eval does
                    ctx_ids = [self.tokenizer.eos_token_id]
                    whole = ctx_ids + whole
                n_cont = len(whole) - len(ctx_ids)
                if n_cont <= 0 or whole[: len(ctx_ids)] != ctx_ids:
                    # the tokenizer merged across the boundary: encode the two parts apart
                    cont_ids = self.tokenizer(cont, add_special_tokens=False)["input_ids"]
                    whole, n_cont = ctx_ids + cont_ids, len(cont_ids)
                whole = whole[-(self.max_length + 1):]
                rows.append((whole, n_cont))
        return rows

    def score_many(self, items: Sequence[tuple[Request, Sequence[str]]]) -> list[list[float]]:
        import torch

        rows = self._score_rows(items)
        scores = [0.0] * len(rows)
        order = sorted(range(len(rows)), key=lambda r: (len(rows[r][0]), rows[r][1]))
        batches: list[list[int]] = []
        for r in order:
            if batches:
                cur = batches[-1] + [r]
                width = max(len(rows[x][0]) for x in cur)
                head = max(rows[x][1] for x in cur)
                if width * len(cur) <= self.score_batch_tokens and head * len(cur) <= self.score_head_positions:
                    batches[-1].append(r)
                    continue
            batches.append([r])
        for batch in batches:
            inputs = [rows[r][0][:-1] for r in batch]
            k = max(rows[r][1] for r in batch)
            ids, mask = self._left_pad(inputs)
            pos = (mask.cumsum(-1) - 1).clamp(min=0)
            with torch.inference_mode():
                logits = self.model(
                    input_ids=ids, attention_mask=mask, position_ids=pos, logits_to_keep=k, use_cache=False
                ).logits.float()
            lse = torch.logsumexp(logits, dim=-1)  # [B, k]
            for b, r in enumerate(batch):
                whole, n = rows[r]
                target = torch.tensor(whole[-n:], device=logits.device)
                lp = logits[b, k - n:, :].gather(-1, target[:, None]).squeeze(-1) - lse[b, k - n:]
                scores[r] = float(lp.sum())
        out, pos_ = [], 0
        for _, continuations in items:
            out.append(scores[pos_: pos_ + len(continuations)])
            pos_ += len(continuations)
        return out

    def close(self) -> None:
        self.model = None
