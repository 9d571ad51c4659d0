"""The vllm engine, tested without vLLM: a fake `vllm` module in
`sys.modules` implements the small API surface the engine uses (LLM.generate / get_tokenizer,
SamplingParams, LoRARequest) on top of the real tiny model, through the hf engine.
tests/test_vllm_real.py runs the engine on real vLLM (its CPU build) where it is installed."""

from __future__ import annotations

import json
import sys
import types
from dataclasses import dataclass

import pytest

from selfalign.core.engines import make_engine
from selfalign.core.engines.base import Sampling
from selfalign.core.errors import SelfAlignError

# -- the fake vllm ------------------------------------------------------------------------------


@dataclass
class FakeLogprob:
    logprob: float


@dataclass
class FakeCompletionOutput:
    text: str
    token_ids: list[int]
    finish_reason: str


@dataclass
class FakeRequestOutput:
    prompt_token_ids: list[int]
    outputs: list[FakeCompletionOutput]
    prompt_logprobs: list | None = None


class FakeSamplingParams:
    """Only the keywords of vllm.SamplingParams the engine may use; anything else is a TypeError."""

    def __init__(self, n=1, temperature=1.0, top_p=1.0, max_tokens=16, stop=None, seed=None,
                 repetition_penalty=1.0, prompt_logprobs=None, logprobs=None):
        self.__dict__.update(locals())
        del self.__dict__["self"]


@dataclass
class FakeLoRARequest:
    lora_name: str
    lora_int_id: int
    lora_path: str


class FakeLLM:
    """vllm.LLM on the tiny model: generation through an HFEngine, prompt logprobs by a forward."""

    hf = None  # the HFEngine behind every fake, set by the fixture
    last = None

    def __init__(self, model, tokenizer=None, **kwargs):
        self.model, self.tokenizer, self.kwargs, self.calls = model, tokenizer, kwargs, []
        FakeLLM.last = self

    def get_tokenizer(self):
        return self.hf.tokenizer

    def generate(self, prompts, sampling_params, use_tqdm=True, lora_request=None):
        params = sampling_params if isinstance(sampling_params, list) else [sampling_params] * len(prompts)
        assert len(params) == len(prompts)
        self.calls.append({"prompts": prompts, "params": params, "lora_request": lora_request})
        return [self._one(p["prompt_token_ids"], sp) for p, sp in zip(prompts, params, strict=True)]

    def _one(self, ids, sp):
        import torch

        if sp.prompt_logprobs is not None:
            with torch.inference_mode():
                logits = self.hf.model(input_ids=torch.tensor([ids])).logits[0].float()
            lps = torch.log_softmax(logits, dim=-1)
            prompt_lps = [None] + [{ids[p]: FakeLogprob(float(lps[p - 1, ids[p]]))} for p in range(1, len(ids))]
            return FakeRequestOutput(ids, [FakeCompletionOutput("", [5], "length")], prompt_lps)
        text = self.hf.tokenizer.decode(ids, skip_special_tokens=True)
        sampling = Sampling(n=sp.n, temperature=sp.temperature, top_p=sp.top_p, max_new_tokens=sp.max_tokens,
                            stop=list(sp.stop or []), seed=sp.seed, repetition_penalty=sp.repetition_penalty)
        comps = self.hf.generate([text], sampling)[0]
        tok = self.hf.tokenizer

        def token_ids(c):  # as many as the hf engine generated (a random model's bytes may not re-encode alike)
            return (tok(c.text, add_special_tokens=False)["input_ids"][: c.completion_tokens]
                    + [tok.eos_token_id] * c.discarded_tokens)

        return FakeRequestOutput(ids, [FakeCompletionOutput(c.text, token_ids(c), c.finish_reason) for c in comps])


@pytest.fixture(scope="module")
def hf(tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SELFALIGN_CACHE", str(tmp_path_factory.mktemp("cache")))
        from selfalign.core.engines.hf import HFEngine

        yield HFEngine("tiny:llama")


@pytest.fixture
def fake_vllm(hf, monkeypatch):
    mod = types.ModuleType("vllm")
    mod.LLM, mod.SamplingParams = FakeLLM, FakeSamplingParams
    lora, lora_request = types.ModuleType("vllm.lora"), types.ModuleType("vllm.lora.request")
    lora_request.LoRARequest = FakeLoRARequest
    mod.lora, lora.request = lora, lora_request
    for name, m in (("vllm", mod), ("vllm.lora", lora), ("vllm.lora.request", lora_request)):
        monkeypatch.setitem(sys.modules, name, m)
    # the GPU build unless a test says otherwise (even where the real vLLM's platform module is loaded)
    monkeypatch.setitem(sys.modules, "vllm.platforms", None)
    monkeypatch.setattr(FakeLLM, "hf", hf)
    return mod


REQUESTS = [
    "The capital of France is",
    [{"role": "user", "content": "Say hello."}],
    "A",
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Count to three, please."}],
    "Once upon a time, in a land far away,",
]

# -- tests --------------------------------------------------------------------------------------


def test_missing_vllm_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "vllm", None)  # `import vllm` raises ImportError
    with pytest.raises(SelfAlignError) as err:
        make_engine("vllm", "tiny:llama")
    assert "selfalign[vllm]" in str(err.value)
    assert "vllm package" in err.value.message


def test_llm_built_from_resolved_model(fake_vllm, hf):
    from selfalign.core.models import resolve

    eng = make_engine("vllm", "tiny:llama", gpu_memory_utilization=0.5, max_model_len=512)
    llm = FakeLLM.last
    folder = resolve("tiny:llama").path
    assert (llm.model, llm.tokenizer) == (folder, folder)
    assert llm.kwargs["enable_prefix_caching"] is True
    assert llm.kwargs["gpu_memory_utilization"] == 0.5 and llm.kwargs["max_model_len"] == 512
    assert llm.kwargs["dtype"] == "bfloat16" and "enable_lora" not in llm.kwargs
    assert eng.name == "vllm" and eng.lora is None and eng.max_model_len == 512


def fake_platform(monkeypatch, cpu: bool):
    platforms = types.ModuleType("vllm.platforms")
    platforms.current_platform = types.SimpleNamespace(is_cpu=lambda: cpu)
    monkeypatch.setitem(sys.modules, "vllm.platforms", platforms)


def clear_cpu_env(monkeypatch):
    """Unset vLLM's CPU variables for this test, and restore them (or their absence) after it."""
    for var in ("VLLM_CPU_NUM_OF_RESERVED_CPU", "VLLM_CPU_OMP_THREADS_BIND", "VLLM_CPU_KVCACHE_SPACE"):
        monkeypatch.setenv(var, "")
        monkeypatch.delenv(var)


def test_cpu_build_defaults(fake_vllm, hf, monkeypatch):
    """On vLLM's CPU build: float32 as the hf engine on a CPU, a fixed KV cache instead of a fraction
    of RAM, and no core held back from the model's threads; whatever the caller sets wins."""
    import os

    from selfalign.core.engines.vllm import CPU_KV_CACHE_MAX

    fake_platform(monkeypatch, cpu=True)
    clear_cpu_env(monkeypatch)
    eng = make_engine("vllm", "tiny:llama")
    kw = FakeLLM.last.kwargs
    assert kw["dtype"] == "float32" and eng.dtype == "float32" and eng.on_cpu
    assert "gpu_memory_utilization" not in kw and 0 < kw["kv_cache_memory_bytes"] <= CPU_KV_CACHE_MAX
    assert os.environ["VLLM_CPU_NUM_OF_RESERVED_CPU"] == "0" and "VLLM_CPU_OMP_THREADS_BIND" not in os.environ

    clear_cpu_env(monkeypatch)
    monkeypatch.setenv("VLLM_CPU_OMP_THREADS_BIND", "0")
    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "1")
    make_engine("vllm", "tiny:llama", dtype="bfloat16", gpu_memory_utilization=None)
    kw = FakeLLM.last.kwargs
    assert kw["dtype"] == "bfloat16" and "kv_cache_memory_bytes" not in kw and "gpu_memory_utilization" not in kw
    assert "VLLM_CPU_NUM_OF_RESERVED_CPU" not in os.environ  # the user's binding is left as it is

    make_engine("vllm", "tiny:llama", gpu_memory_utilization=0.3)  # given: vLLM's CPU meaning, a fraction of RAM
    assert FakeLLM.last.kwargs["gpu_memory_utilization"] == 0.3 and "kv_cache_memory_bytes" not in FakeLLM.last.kwargs
    make_engine("vllm", "tiny:llama", kv_cache_memory_bytes=1 << 30)
    assert FakeLLM.last.kwargs["kv_cache_memory_bytes"] == 1 << 30


def test_gpu_build_defaults(fake_vllm, hf, monkeypatch):
    import os

    fake_platform(monkeypatch, cpu=False)
    clear_cpu_env(monkeypatch)
    eng = make_engine("vllm", "tiny:llama")
    kw = FakeLLM.last.kwargs
    assert kw["dtype"] == "bfloat16" and kw["gpu_memory_utilization"] == 0.85 and "kv_cache_memory_bytes" not in kw
    assert not eng.on_cpu and "VLLM_CPU_NUM_OF_RESERVED_CPU" not in os.environ


def test_ignore_eos_reaches_sampling_params(fake_vllm, hf):
    class Params(FakeSamplingParams):
        def __init__(self, ignore_eos=False, **kw):
            super().__init__(**kw)
            self.ignore_eos = ignore_eos

    fake_vllm.SamplingParams = Params
    eng = make_engine("vllm", "tiny:llama")
    eng.generate(["Hi"], Sampling(max_new_tokens=2))
    assert FakeLLM.last.calls[-1]["params"][0].ignore_eos is False
    eng.ignore_eos = True
    eng.generate(["Hi"], Sampling(max_new_tokens=2))
    assert FakeLLM.last.calls[-1]["params"][0].ignore_eos is True


def test_generate_maps_sampling_and_keeps_order(fake_vllm, hf):
    eng = make_engine("vllm", "tiny:llama", batch_size=2)
    sampling = Sampling(n=3, temperature=0.7, top_p=0.9, max_new_tokens=6, stop=["\n\n"], seed=11,
                        repetition_penalty=1.1)
    batches = list(eng.generate_iter(REQUESTS, sampling))
    calls = FakeLLM.last.calls
    assert [len(c["prompts"]) for c in calls] == [2, 2, 1]  # chunks of batch_size, in order
    assert [i for b in batches for i, _ in b] == list(range(len(REQUESTS)))

    params = [p for c in calls for p in c["params"]]
    prompts = [p for c in calls for p in c["prompts"]]
    for req, p, prompt in zip(REQUESTS, params, prompts, strict=True):
        assert (p.n, p.temperature, p.top_p, p.max_tokens, p.repetition_penalty) == (3, 0.7, 0.9, 6, 1.1)
        assert p.prompt_logprobs is None
        is_chat = not isinstance(req, str)
        assert ("\nHuman:" in p.stop) == is_chat and "\n\n" in p.stop
        assert prompt["prompt_token_ids"] == eng._encode(eng.render(req))  # token ids, as hf tokenizes
    seeds = [p.seed for p in params]
    assert all(isinstance(s, int) for s in seeds) and len(set(seeds)) == len(seeds)

    out = eng.generate(REQUESTS, sampling)
    assert [p.seed for c in calls[3:] for p in c["params"]] == seeds  # reproducible
    eng.generate(REQUESTS[2:], sampling)  # a request's seed does not depend on its place in the call
    assert [p.seed for c in calls[6:] for p in c["params"]] == seeds[2:]
    assert [len(cs) for cs in out] == [3] * len(REQUESTS)
    for req, cs in zip(REQUESTS, out, strict=True):
        for c in cs:
            assert c.prompt_tokens == len(eng._encode(eng.render(req)))
            assert c.finish_reason in ("stop", "length") and 0 < c.completion_tokens <= 6


def test_greedy_matches_hf(fake_vllm, hf):
    eng = make_engine("vllm", "tiny:llama")
    greedy = Sampling(temperature=0, max_new_tokens=8, top_p=0.5, seed=3)
    got = eng.generate(REQUESTS, greedy)
    p = FakeLLM.last.calls[-1]["params"][0]
    assert (p.temperature, p.top_p, p.n) == (0.0, 1.0, 1)
    for req, cs in zip(REQUESTS, got, strict=True):
        ref = hf.generate([req], greedy)[0][0]
        assert (cs[0].text, cs[0].finish_reason, cs[0].completion_tokens) == (
            ref.text, ref.finish_reason, ref.completion_tokens)


def test_score_many_matches_hf(fake_vllm, hf):
    eng = make_engine("vllm", "tiny:llama")
    items = [
        ("Question: is the sky blue?\nAnswer:", [" yes", " no", " it depends on the weather"]),
        ("Answer: ", ["yes", "no"]),  # trailing space moves onto the continuation
        ([{"role": "user", "content": "Pick a colour."}], [" Red.", " Blue, I think."]),
    ]
    got = eng.score_many(items)
    want = hf.score_many(items)
    assert [len(g) for g in got] == [3, 2, 2]
    for g_row, w_row in zip(got, want, strict=True):
        assert g_row == pytest.approx(w_row, abs=1e-4)
    p = FakeLLM.last.calls[-1]["params"][0]
    assert (p.max_tokens, p.prompt_logprobs) == (1, 1)
    assert eng.score("The capital of France is", [" Paris"]) == pytest.approx(
        hf.score("The capital of France is", [" Paris"]), abs=1e-4)


def test_peft_adapter_served_with_lora_request(fake_vllm, hf, tmp_path):
    from selfalign.core.models import resolve

    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": "tiny:llama", "r": 4}))
    eng = make_engine("vllm", str(adapter))
    llm = FakeLLM.last
    assert llm.model == resolve("tiny:llama").path and llm.tokenizer == llm.model
    assert llm.kwargs["enable_lora"] is True and llm.kwargs["max_lora_rank"] == 8
    eng.generate(["Hi"], Sampling(max_new_tokens=2))
    eng.score("Hi", [" there"])
    for call in llm.calls:
        assert call["lora_request"].lora_path == str(adapter)


# -- parallelism: passed through to vllm.LLM; seeds never come from a rank ----------------------------


class FakeDataParallelLLM(FakeLLM):
    """vLLM data parallelism the way its pitfall goes: the requests of a call are dealt round-robin to
    `data_parallel_size` ranks, and a rank samples a request that carries no seed of its own from the
    engine's seed plus a rank-local counter, so two ranks draw the same samples for their first request."""

    def generate(self, prompts, sampling_params, use_tqdm=True, lora_request=None):
        import copy

        params = sampling_params if isinstance(sampling_params, list) else [sampling_params] * len(prompts)
        self.calls.append({"prompts": prompts, "params": params, "lora_request": lora_request})
        ranks = self.kwargs.get("data_parallel_size") or 1
        out = [None] * len(prompts)
        for rank in range(ranks):
            for counter, k in enumerate(range(rank, len(prompts), ranks)):
                sp = params[k]
                if sp.seed is None:
                    sp = copy.copy(sp)
                    sp.seed = self.kwargs.get("seed", 0) + counter
                out[k] = self._one(prompts[k]["prompt_token_ids"], sp)
        return out


def test_parallelism_from_the_recipe_reaches_vllm_llm(fake_vllm, hf):
    from selfalign.core.recipe import EngineConfig

    options = EngineConfig(name="vllm", tensor_parallel_size=2, pipeline_parallel_size=2,
                           data_parallel_size=4).options()
    make_engine("vllm", "tiny:llama", **options)
    kw = FakeLLM.last.kwargs
    assert (kw["tensor_parallel_size"], kw["pipeline_parallel_size"], kw["data_parallel_size"]) == (2, 2, 4)
    make_engine("vllm", "tiny:llama", **EngineConfig(name="vllm").options())  # unset: vLLM's own defaults
    assert not {"tensor_parallel_size", "pipeline_parallel_size", "data_parallel_size"} & set(FakeLLM.last.kwargs)


def test_data_parallel_ranks_never_duplicate_rows(fake_vllm, hf, monkeypatch, tmp_path):
    """A `generate` stage on 2 data-parallel ranks writes exactly the rows of 1 rank: every request
    carries its own seed (from the sampling seed and its prompt), so no rank falls back to a
    rank-local counter, and two prompts' rows never come out as copies of each other."""
    from selfalign.core.store import read_jsonl
    from selfalign.stages import parse_recipe, run_recipe

    monkeypatch.setattr(fake_vllm, "LLM", FakeDataParallelLLM)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(["Hello", "Hello there", "Tell me a story", "Why?", "What is two plus two?", "Hi"]))

    def rows(dp: int) -> list[dict]:
        engine = {"name": "vllm", **({"data_parallel_size": dp} if dp > 1 else {})}
        recipe = parse_recipe({"name": f"dp{dp}", "model": "tiny:llama", "engine": engine, "stages": [
            {"stage": "generate", "prompts": str(prompts),
             "sampling": {"n": 2, "temperature": 1.0, "max_new_tokens": 6}}]})
        run_recipe(recipe, tmp_path / f"dp{dp}")
        assert all(p.seed is not None for c in FakeLLM.last.calls for p in c["params"])
        return read_jsonl(tmp_path / f"dp{dp}" / "01-generate" / "rows.jsonl")

    one, two = rows(1), rows(2)
    assert FakeLLM.last.kwargs["data_parallel_size"] == 2
    assert len(two) == 12 and len({r["id"] for r in two}) == 12
    key = lambda r: (r["prompt_id"], r["sample"])  # noqa: E731
    assert (sorted((key(r), r["id"], r["completion"]) for r in two)
            == sorted((key(r), r["id"], r["completion"]) for r in one))
    firsts = [r["completion"] for r in two if r["sample"] == 0]
    assert len(set(firsts)) == len(firsts)  # no two prompts' rows are the same draw
