import pytest
import torch

from selfalign.chat import PLAIN_STOPS, render_plain, truncate_at_stop
from selfalign.engines import Sampling

GREEDY = Sampling(temperature=0, max_new_tokens=24)


def naive_score(engine, context, continuation):
    """Full-sequence logits and log-softmax: the slow, obviously-right reference."""
    tok, model = engine.tokenizer, engine.model
    n_ctx = len(tok(context)["input_ids"])
    ids = tok(context + continuation, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        lp = torch.log_softmax(model(ids).logits[0].float(), -1)
    return sum(lp[i - 1, ids[0, i]].item() for i in range(n_ctx, ids.shape[1]))


@pytest.mark.parametrize("engine_name", ["tiny_engine", "tiny_gemma_engine"])
def test_score_matches_full_logits(engine_name, request):
    engine = request.getfixturevalue(engine_name)
    items = [("The answer is", [" yes", " no", " it depends on the weather"]), ("Q: 2+2?\nA:", [" 4", " five"])]
    got = engine.score_many(items)
    for (ctx, conts), scores in zip(items, got, strict=True):
        for cont, s in zip(conts, scores, strict=True):
            assert s == pytest.approx(naive_score(engine, ctx, cont), abs=1e-3)


def test_score_does_not_depend_on_batching(tiny_engine):
    items = [(f"Context number {i} " + "x" * i, [" a", " bb" * (i % 4 + 1)]) for i in range(9)]
    together = tiny_engine.score_many(items)
    alone = [tiny_engine.score(c, conts) for c, conts in items]
    flat = lambda xs: [v for x in xs for v in x]  # noqa: E731
    assert flat(together) == pytest.approx(flat(alone), abs=1e-3)


def test_score_chat_context_is_rendered(tiny_engine):
    chat = [{"role": "user", "content": "Hello?"}]
    assert tiny_engine.score(chat, [" Hi."]) == pytest.approx(
        tiny_engine.score(render_plain(chat), [" Hi."]), abs=1e-5
    )


def test_generate_n_per_request_in_order(tiny_engine):
    reqs = ["short", "a much longer prompt than the first one", [{"role": "user", "content": "hi"}]]
    out = tiny_engine.generate(reqs, Sampling(n=3, temperature=1.0, max_new_tokens=8))
    assert [len(c) for c in out] == [3, 3, 3]
    for comps in out:
        for c in comps:
            assert c.completion_tokens <= 8 and c.finish_reason in ("stop", "length")
    # the prompt lengths travel with the completions, so order is checkable
    assert out[0][0].prompt_tokens < out[1][0].prompt_tokens


def test_greedy_is_the_same_alone_and_in_a_batch(tiny_engine):
    reqs = ["one", "two two two", "three is a longer prompt", "four"]
    batched = [c[0].text for c in tiny_engine.generate(reqs, GREEDY)]
    alone = [tiny_engine.generate([r], GREEDY)[0][0].text for r in reqs]
    assert batched == alone


def test_seed_makes_sampling_repeatable(tiny_engine):
    s = Sampling(temperature=1.0, max_new_tokens=16, seed=7)
    a = tiny_engine.generate(["abc", "def"], s)
    b = tiny_engine.generate(["abc", "def"], s)
    c = tiny_engine.generate(["abc", "def"], s.model_copy(update={"seed": 8}))
    assert [x[0].text for x in a] == [x[0].text for x in b]
    assert [x[0].text for x in a] != [x[0].text for x in c]


def test_stop_string_cuts_the_completion(tiny_engine):
    full = tiny_engine.generate(["The story begins"], GREEDY)[0][0].text
    assert len(full) > 6
    stop = full[3:6]
    cut = tiny_engine.generate(["The story begins"], GREEDY.model_copy(update={"stop": [stop]}))[0][0]
    assert cut.text == full[: full.find(stop)]
    assert cut.finish_reason == "stop"


def test_chats_stop_at_the_users_next_turn(tiny_engine):
    s = Sampling(max_new_tokens=4)
    assert tiny_engine.stops_for([{"role": "user", "content": "x"}], s) == PLAIN_STOPS
    assert tiny_engine.stops_for("plain text", s) == []


def test_truncate_at_stop_takes_the_earliest():
    assert truncate_at_stop("abc\nHuman: x\nStop", ["Stop", "\nHuman:"]) == ("abc", True)
    assert truncate_at_stop("abc", ["z"]) == ("abc", False)


def test_render_plain_format():
    text = render_plain([
        {"role": "system", "content": "Be kind."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "Bye"},
    ])
    assert text == "Be kind.\n\nHuman: Hi\n\nAssistant: Hello!\n\nHuman: Bye\n\nAssistant:"
    with pytest.raises(ValueError):
        render_plain([{"role": "user", "content": "x"}, {"role": "system", "content": "late"}])
