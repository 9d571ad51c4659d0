"""The hf engine's decoding loop: exact against `model.generate`, rows independent of their batch."""

import pytest
import torch

from selfalign.core.engines import Sampling
from selfalign.core.engines.decode import (
    StopWatch,
    kept_token_count,
    nucleus,
    pick_tokens,
    prompt_lookup,
    row_seed,
)
from selfalign.core.engines.sampling import TemperatureTopP

PROMPTS = ["one", "two two two", "three is a longer prompt", "four", "a fifth prompt, the longest one of them all",
           "six", "seven?", "eight eight"]


def test_greedy_picks_the_argmax():
    logits = torch.randn(5, 300)
    assert torch.equal(pick_tokens(logits, 0, 1.0, None), logits.argmax(-1))


@pytest.mark.parametrize("top_p", [0.3, 0.9, 1.0])
def test_inverse_cdf_sampling_draws_the_nucleus_in_proportion(top_p):
    """Evenly spaced uniforms must land on each kept token in proportion to its renormalised
    probability (within one draw), and never outside the set transformers' top-p keeps."""
    torch.manual_seed(0)
    logits = torch.randn(1, 500) * 2
    temperature, draws = 0.8, 20000
    u = (torch.arange(draws, dtype=torch.float64) + 0.5) / draws
    picked = pick_tokens(logits.expand(draws, -1), temperature, top_p, u)
    kept = ~torch.isinf(TemperatureTopP(temperature, top_p)(None, logits.clone()))[0]
    assert kept[picked].all()
    probs = torch.where(kept, (logits[0] / temperature).softmax(-1), torch.zeros(()))
    probs = probs / probs.sum()
    counts = torch.bincount(picked, minlength=500).double()
    assert torch.allclose(counts / draws, probs.double(), atol=1.5 / draws)


@pytest.mark.parametrize("top_p", [0.5, 1.0])
def test_rows_sampled_in_blocks_pick_what_each_row_picks_alone(top_p):
    """pick_tokens samples SAMPLE_ROWS rows at a time: over more rows than that, every row's token is
    the one it gets on its own (peaked and flat rows mixed, so the nucleus widens in some blocks only)."""
    from selfalign.core.engines import decode

    torch.manual_seed(1)
    rows = 2 * decode.SAMPLE_ROWS + 5
    logits = torch.randn(rows, 3000) * torch.linspace(0.1, 8, rows).unsqueeze(-1)
    u = torch.rand(rows, dtype=torch.float64)
    together = pick_tokens(logits, 0.9, top_p, u)
    alone = torch.cat([pick_tokens(logits[r:r + 1], 0.9, top_p, u[r:r + 1]) for r in range(rows)])
    assert together.shape == (rows,) and torch.equal(together, alone)


def test_nucleus_widens_until_the_mass_is_reached():
    flat = torch.full((1, 1000), 1e-3)
    probs, idx = nucleus(flat, 0.5, first_k=4)
    assert int((probs > 0).sum()) == 500 and len(set(idx[0, :500].tolist())) == 500


def test_row_seed_depends_on_seed_prompt_and_sample_only():
    assert row_seed(1, "p", 0) == row_seed(1, "p", 0)
    assert len({row_seed(1, "p", 0), row_seed(2, "p", 0), row_seed(1, "q", 0), row_seed(1, "p", 1)}) == 4


def test_kept_tokens_and_the_stop_watch(tiny_engine):
    tok = tiny_engine.tokenizer
    ids = tok("hello\n\nHuman: more", add_special_tokens=False)["input_ids"]
    assert kept_token_count(tok, ids, "hello") == len(tok("hello", add_special_tokens=False)["input_ids"])
    watch = StopWatch(tok, ["\n\nHuman:"])
    upto = len(tok("hello\n\nHuman:", add_special_tokens=False)["input_ids"])  # checked as each token arrives
    assert watch.hit(ids[:upto]) and not watch.hit(ids[: upto - 1])


@pytest.mark.parametrize("engine_name", ["tiny_engine", "tiny_gemma_engine", "tiny_gemma_bf16_engine"])
def test_greedy_equals_model_generate(engine_name, request):
    """The plain path: each prompt alone through `model.generate`, greedy, no early stop."""
    engine = request.getfixturevalue(engine_name)
    engine.model.generation_config.eos_token_id = None
    try:
        got = engine.generate(PROMPTS, Sampling(temperature=0, max_new_tokens=20))
        for prompt, comps in zip(PROMPTS, got, strict=True):
            ids = torch.tensor([engine._encode(prompt)])
            with torch.inference_mode():
                ref = engine.model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                            max_new_tokens=20,
                                            pad_token_id=engine.tokenizer.pad_token_id, temperature=None, top_p=None,
                                            top_k=None)
            assert comps[0].text == engine.tokenizer.decode(ref[0, ids.shape[1]:], skip_special_tokens=True)
            assert comps[0].completion_tokens == 20 and comps[0].discarded_tokens == 0
    finally:
        engine.model.generation_config.eos_token_id = engine.tokenizer.eos_token_id


def test_rows_stop_early_and_count_only_what_they_keep(tiny_engine):
    """With a stop that some rows meet early, the texts equal the full-length greedy texts cut at
    the stop; kept + discarded tokens are what was generated; finished rows left the batch."""
    full = tiny_engine.generate(PROMPTS, Sampling(temperature=0, max_new_tokens=24))
    texts = [c[0].text for c in full]
    stop = max("abcdefghijklmnopqrstuvwxyz", key=lambda ch: sum(ch in t[:12] for t in texts))
    stopped = tiny_engine.generate(PROMPTS, Sampling(temperature=0, max_new_tokens=24, stop=[stop]))
    early = 0
    for whole, comps in zip(texts, stopped, strict=True):
        c = comps[0]
        assert c.text == whole.split(stop)[0]
        if stop in whole:  # it stopped on the token that completed the stop string, which is not kept
            assert c.finish_reason == "stop" and c.discarded_tokens == 1 and c.completion_tokens < 24
            early += 1
        else:
            assert (c.completion_tokens, c.discarded_tokens) == (24, 0)
    assert early >= 1
    prof = tiny_engine.last_profile
    assert prof.row_steps < prof.steps * min(len(PROMPTS), tiny_engine.batch_size)


def test_sampled_rows_do_not_depend_on_the_batching(tiny_engine):
    """A set generated in one call at the default batch size equals the same set generated in two
    calls split elsewhere (what a killed and resumed run does)."""
    from selfalign.core.engines.hf import HFEngine

    engine = HFEngine("tiny:llama", model=tiny_engine.model, tokenizer=tiny_engine.tokenizer)  # default batch size
    prompts = [f"prompt {i} " + "x" * (i % 7) for i in range(21)]
    s = Sampling(n=2, temperature=1.0, top_p=0.9, max_new_tokens=12, seed=5, stop=["q"])
    whole = engine.generate(prompts, s)
    split = engine.generate(prompts[:5], s) + engine.generate(prompts[5:], s)
    assert [[c.text for c in cs] for cs in whole] == [[c.text for c in cs] for cs in split]
    assert all(cs[0].text != cs[1].text for cs in whole[:3])  # the n samples of a request differ


def test_prompt_lookup_drafts_what_followed_the_latest_match():
    h = [5, 6, 7, 8, 1, 5, 6, 9, 2, 5, 6]
    assert prompt_lookup(h, 3) == [9, 2, 5]  # the latest earlier "5 6", not the first
    assert prompt_lookup(h, 1) == [9]
    assert prompt_lookup([1, 2, 3, 4, 2, 3], 4) == [4, 2, 3]  # the longest n-gram that matches: "2 3"
    assert prompt_lookup([4, 9, 1, 4], 2) == [9, 1]  # down to one token
    assert prompt_lookup([1, 2, 3], 4) == [] and prompt_lookup([7], 4) == [] and prompt_lookup(h, 0) == []


@pytest.mark.parametrize("engine_name", ["tiny_engine", "tiny_gemma_engine"])
@pytest.mark.parametrize("temperature", [0.0, 0.3])  # sampled, peaked enough that some drafts are kept
def test_prompt_lookup_keeps_what_plain_steps_would_pick(engine_name, temperature, request):
    """A lone row with prompt lookup on writes what it writes with it off: the same tokens, stops and
    counts, greedy and sampled (same random numbers, drawn in the same order). Long enough to cross
    tiny gemma's 64-token sliding window; repetitive prompts, so that drafts are fed and kept."""
    engine = request.getfixturevalue(engine_name)
    prompts = ["la la la la la la la la", "one two three one two three one two", "a b c d a b c d a b"]
    runs, drafts = {}, {}
    long = Sampling(temperature=temperature, top_p=0.9, max_new_tokens=90, seed=3)
    try:
        for lookup in (0, 4):
            engine.lookup_tokens = lookup
            for name in ("long", "stop"):
                s = long
                if name == "stop":  # a character that some texts hold early: those rows stop there
                    texts = [t for t, *_ in runs[0, "long"]]
                    stop = max("abcdefghijklmnopqrstuvwxyz", key=lambda ch: sum(ch in t[5:30] for t in texts))
                    s = long.model_copy(update={"max_new_tokens": 40, "stop": [stop]})
                out = []
                for p in prompts:  # one row: lookup from the first step
                    out.append(engine.generate([p], s)[0][0])
                    fed, kept = drafts.get(lookup, (0, 0))
                    drafts[lookup] = fed + engine.last_profile.drafted, kept + engine.last_profile.draft_kept
                out += [c[0] for c in engine.generate(prompts, s)]  # a batch: lookup once one row is left
                runs[lookup, name] = [(c.text, c.finish_reason, c.completion_tokens, c.discarded_tokens) for c in out]
    finally:
        engine.lookup_tokens = type(engine).lookup_tokens
    assert drafts[0] == (0, 0) and drafts[4][1] > 0  # drafts were fed, and some kept
    assert runs[4, "long"] == runs[0, "long"]
    assert runs[4, "stop"] == runs[0, "stop"]
    assert any(reason == "stop" for _, reason, _, _ in runs[0, "stop"])
