"""The `vllm` engine: generation and scoring on a CUDA GPU with vLLM (optional extra).

Install it with `pip install 'selfalign[vllm]'`. Prompts are rendered and tokenized here exactly
as the `hf` engine does it and handed to vLLM as token ids, so both engines see the same tokens;
vLLM schedules and batches the requests itself (continuous batching). `generate_iter` only cuts
the work into chunks (256 requests, or `batch_size`) so that callers can write rows as they go.

Prefix caching: Self-Align puts the same long principle prompt (the principles and in-context
exemplars, thousands of tokens) in front of every request. With `enable_prefix_caching` (on by
default) vLLM hashes the KV-cache blocks of each prompt and reuses the blocks it has already
computed, so that shared prefix is prefilled once instead of once per request, and only each
request's own tail costs compute. Scoring asks for prompt log-probabilities, which vLLM computes
in full for such requests (they do not read the cache, though they may fill it).

A PEFT LoRA adapter is served on top of its base model (`enable_lora=True`) with a `LoRARequest`
on every call, so adapters need not be merged first.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from selfalign.core.chat import Request
from selfalign.core.engines.base import Completion, Engine, Sampling, score_token_rows
from selfalign.core.engines.decode import kept_token_count, row_seed
from selfalign.core.errors import SelfAlignError

LORA_RANKS = (8, 16, 32, 64, 128, 256, 320, 512)  # values vLLM accepts for max_lora_rank


def request_seed(seed: int, prompt: str) -> int:
    """A request's seed, from the sampling seed and the rendered prompt only (vLLM derives the n
    samples' streams from it): never from the request's place in a call or chunk, so a resumed run,
    another chunking or another data-parallel worker draws the same samples for the same prompt."""
    return row_seed(seed, prompt, 0) % (2**63)


class VLLMEngine(Engine):
    name = "vllm"

    def __init__(
        self,
        model_ref: str,
        dtype: str = "auto",
        gpu_memory_utilization: float = 0.85,
        max_model_len: int | None = None,
        enable_prefix_caching: bool = True,
        chat_format: str = "plain",
        trust_remote_code: bool = False,
        batch_size: int | None = None,
        **llm_kwargs: Any,
    ):
        super().__init__(model_ref, chat_format)
        try:
            import vllm
        except ImportError as exc:
            raise SelfAlignError(
                "the vllm engine needs the vllm package",
                hint="pip install 'selfalign[vllm]' on a machine with a CUDA GPU, or use --engine hf",
            ) from exc
        from selfalign.core.models import resolve

        resolved = resolve(model_ref)
        base = resolved.base if resolved.kind == "peft" else resolved
        tokenizer_path = base.path
        self.lora = None
        if resolved.kind == "peft":
            from vllm.lora.request import LoRARequest

            adapter = Path(resolved.path)
            if (adapter / "tokenizer_config.json").exists():
                tokenizer_path = resolved.path
            rank = int(json.loads((adapter / "adapter_config.json").read_text()).get("r", 16))
            llm_kwargs.setdefault("max_lora_rank", next((r for r in LORA_RANKS if r >= rank), LORA_RANKS[-1]))
            llm_kwargs["enable_lora"] = True
            self.lora = LoRARequest("selfalign-adapter", 1, resolved.path)
        llm_kwargs.setdefault("seed", 0)
        self.llm = vllm.LLM(
            model=base.path,
            tokenizer=tokenizer_path,
            # "auto" means bfloat16 on a GPU, as in the hf engine (vLLM's own "auto" picks float16
            # for float32 checkpoints such as the converted embedded model, which gemma dislikes)
            dtype="bfloat16" if dtype == "auto" else dtype,
            gpu_memory_utilization=gpu_memory_utilization,
            max_model_len=max_model_len,
            enable_prefix_caching=enable_prefix_caching,
            trust_remote_code=trust_remote_code,
            **llm_kwargs,
        )
        self._SamplingParams = vllm.SamplingParams
        self.tokenizer = self.llm.get_tokenizer()
        self.batch_size = batch_size or 256
        self.max_model_len = max_model_len or self._engine_max_len()

    def _engine_max_len(self) -> int | None:
        try:
            return int(self.llm.llm_engine.model_config.max_model_len)
        except (AttributeError, TypeError, ValueError):
            return None

    # -- helpers -------------------------------------------------------------------------------
    def _encode(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=True)["input_ids"])

    def _params(self, sampling: Sampling, stops: list[str], seed: int):
        greedy = sampling.temperature == 0
        return self._SamplingParams(
            n=sampling.n,
            temperature=0.0 if greedy else sampling.temperature,
            top_p=1.0 if greedy else sampling.top_p,
            max_tokens=sampling.max_new_tokens,
            stop=stops,
            seed=seed,
            repetition_penalty=sampling.repetition_penalty,
        )

    # -- generation ----------------------------------------------------------------------------
    def generate_iter(
        self, requests: Sequence[Request], sampling: Sampling
    ) -> Iterator[list[tuple[int, list[Completion]]]]:
        keep = max(1, self.max_model_len - sampling.max_new_tokens) if self.max_model_len else None
        for start in range(0, len(requests), self.batch_size):
            indices = range(start, min(start + self.batch_size, len(requests)))
            prompts, params = [], []
            for i in indices:
                text = self.render(requests[i])
                ids = self._encode(text)
                prompts.append({"prompt_token_ids": ids[-keep:] if keep else ids})
                params.append(self._params(sampling, self.stops_for(requests[i], sampling),
                                           request_seed(sampling.seed, text)))
            outputs = self.llm.generate(prompts, params, use_tqdm=False, lora_request=self.lora)
            batch = []
            for i, prompt, out in zip(indices, prompts, outputs, strict=True):
                n_prompt = len(prompt["prompt_token_ids"])
                comps = []
                for o in out.outputs:
                    # vLLM's token_ids include a stop string's tokens and the EOS, which the text drops
                    kept = (len(o.token_ids) if o.finish_reason == "length"
                            else kept_token_count(self.tokenizer, o.token_ids, o.text))
                    comps.append(
                        Completion(
                            o.text,
                            "length" if o.finish_reason == "length" else "stop",
                            kept,
                            n_prompt,
                            stop_string=o.stop_reason if isinstance(getattr(o, "stop_reason", None), str) else None,
                            discarded_tokens=len(o.token_ids) - kept,
                        )
                    )
                batch.append((i, comps))
            yield batch

    # -- scoring -------------------------------------------------------------------------------
    def _score_rows(self, items: Sequence[tuple[Request, Sequence[str]]]) -> list[tuple[list[int], int]]:
        # room for the one token vLLM must sample
        return score_token_rows(self, items, self.max_model_len - 1 if self.max_model_len else None)

    def score_many(self, items: Sequence[tuple[Request, Sequence[str]]]) -> list[list[float]]:
        rows = self._score_rows(items)
        # prompt_logprobs=1 rather than 0: every version returns the prompt token's own logprob
        # next to the top-k, and some early V1 releases treated 0 as "no prompt logprobs"
        params = self._SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=1)
        outputs = self.llm.generate(
            [{"prompt_token_ids": whole} for whole, _ in rows], params, use_tqdm=False, lora_request=self.lora
        )
        scores = []
        for (whole, n), out in zip(rows, outputs, strict=True):
            lps = out.prompt_logprobs  # [None, {token_id: Logprob}, ...], one per prompt position
            scores.append(float(sum(lps[p][whole[p]].logprob for p in range(len(whole) - n, len(whole)))))
        out_, pos = [], 0
        for _, continuations in items:
            out_.append(scores[pos : pos + len(continuations)])
            pos += len(continuations)
        return out_

    def close(self) -> None:
        self.llm = None
