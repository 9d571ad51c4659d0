import pytest
import torch

from selfalign.core.chat import PLAIN_STOPS, render_plain, truncate_at_stop
from selfalign.core.engines import Sampling

GREEDY = Sampling(temperature=0, max_new_tokens=24)


def naive_score(engine, context, continuation):
    """Full-sequence logits and log-softmax: the slow, obviously-right reference."""
    tok, model = engine.tokenizer, engine.model
    n_ctx = len(tok(context)["input_ids"])
    ids = tok(context + continuation, return_tensors="pt")["input_ids"].to(model.device)
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


@pytest.mark.parametrize("engine_name", ["tiny_engine", "tiny_gemma_engine"])
def test_shared_prefix_is_computed_once_and_changes_nothing(engine_name, request):
    engine = request.getfixturevalue(engine_name)
    # a long shared prefix (longer than tiny gemma3's 64-token sliding window) then varied items
    system = "You are a careful assistant. " * 6
    items = [([{"role": "system", "content": system}, {"role": "user", "content": q}],
              [" Yes.", " No, not at all.", " Maybe"])
             for q in ("Is water wet?", "Can fish fly?", "Is the sky blue today, in your view?")]
    engine.min_cached_prefix = 10**9
    plain = engine.score_many(items)
    engine.min_cached_prefix = 48
    assert engine._shared_prefix(engine._score_rows(items)) > 64
    cached = engine.score_many(items)
    flat = lambda xs: [v for x in xs for v in x]  # noqa: E731
    assert flat(cached) == pytest.approx(flat(plain), abs=2e-3)
    for (ctx, conts), scores in zip(items, cached, strict=True):
        for cont, s in zip(conts, scores, strict=True):
            assert s == pytest.approx(naive_score(engine, engine.render(ctx), cont), abs=2e-3)


def test_shared_prefix_stops_before_scored_tokens():
    from selfalign.core.engines.hf import HFEngine

    rows = [([1, 5, 6, 7, 8], 2), ([1, 5, 6, 9], 1), ([1, 5, 6, 7, 8, 9], 1)]
    assert HFEngine._shared_prefix(rows) == 2  # row 0 is scored from position 3: prefix may hold 0..1
    assert HFEngine._shared_prefix([([1, 2, 3, 4], 1)]) == 2


def test_full_logits_fallback_gives_the_same_scores(tiny_gemma_engine):
    items = [("Some context here", [" a", " longer continuation"]), ("x", [" y"])]
    split = tiny_gemma_engine.score_many(items)
    saved = tiny_gemma_engine._head_fn
    tiny_gemma_engine._head_fn = None  # as for an architecture whose output layer the split cannot reproduce
    try:
        full = tiny_gemma_engine.score_many(items)
    finally:
        tiny_gemma_engine._head_fn = saved
    assert [v for x in full for v in x] == pytest.approx([v for x in split for v in x], abs=1e-3)


@pytest.mark.parametrize("engine_name", ["tiny_engine", "tiny_gemma_engine"])
def test_generation_reuses_a_shared_prefix_without_changing_greedy_output(engine_name, request):
    engine = request.getfixturevalue(engine_name)
    shared = "Principles: be kind, be honest, be careful. " * 3  # > 64 tokens: past tiny gemma3's sliding window
    reqs = [shared + q for q in ("Q: one?", "Q: two?", "Q: six?")]  # same length: no pads between prefix and question
    s = Sampling(temperature=0, max_new_tokens=12, n=2)
    engine.min_cached_prefix = 10**9
    plain = [[c.text for c in cs] for cs in engine.generate(reqs, s)]
    engine.min_cached_prefix = 48
    calls = []
    real = engine._prefix_cache
    engine._prefix_cache = lambda toks: calls.append(len(toks)) or real(toks)
    try:
        cached = [[c.text for c in cs] for cs in engine.generate(reqs, s)]
    finally:
        engine._prefix_cache = real
    assert calls and calls[0] > 64 and len(calls) == 1  # computed once for all batches
    assert cached == plain
    sampled = engine.generate(reqs, Sampling(temperature=1.0, max_new_tokens=6, n=3))
    assert [len(cs) for cs in sampled] == [3, 3, 3]


def test_single_token_choices_share_one_forward(tiny_engine, monkeypatch):
    forwards = []
    real = tiny_engine._forward
    monkeypatch.setattr(tiny_engine, "_forward",
                        lambda ids, *a, **k: forwards.append(ids.shape[0]) or real(ids, *a, **k))
    # 1 byte token each
    items = [("Which is better? Answer:", ["A", "B"]), ("Another question entirely. Answer:", ["A", "B"])]
    got = tiny_engine.score_many(items)
    assert sum(forwards) == 2  # two distinct contexts, not four rows
    for (ctx, conts), scores in zip(items, got, strict=True):
        for cont, s in zip(conts, scores, strict=True):
            assert s == pytest.approx(naive_score(tiny_engine, ctx, cont), abs=1e-3)


def test_context_window_and_the_kept_prefix_cache(tiny_engine):
    from selfalign.core.engines.hf import context_window

    cfg = tiny_engine.model.config
    assert tiny_engine.max_length == context_window(tiny_engine.model) == min(cfg.max_position_embeddings, 32768)
    system = "You are a careful assistant. " * 12
    items = [([{"role": "system", "content": system}, {"role": "user", "content": f"q{i}"}], [" yes", " no"])
             for i in range(3)]
    first = tiny_engine.score_many(items)
    key, cache = tiny_engine._kept_prefix
    assert len(key) >= tiny_engine.min_cached_prefix
    assert tiny_engine._prefix_cache(list(key)) is cache  # the next chunk reuses it, not recomputes it
    assert tiny_engine.score_many(items) == first  # and using it again changes nothing
    tiny_engine.forget_prefix()
    again = tiny_engine.score_many(items)
    assert [x for r in again for x in r] == pytest.approx([x for r in first for x in r], abs=1e-5)


@pytest.mark.parametrize("cap", [None, 5.0])
def test_target_logprobs_in_a_reused_buffer_equal_log_softmax(tiny_gemma_engine, cap):
    """The CPU fast path (the log-sum-exp a vocabulary block at a time, in a kept buffer) against
    log_softmax of the plain output layer, softcapped or not, with a vocabulary that does not divide
    into blocks, for a call that reuses a larger buffer."""
    engine = tiny_gemma_engine
    engine.score_head_block = 37
    assert engine.model.get_output_embeddings().out_features % 37
    cfg = engine.model.config.get_text_config()
    saved = cfg.final_logit_softcapping
    cfg.final_logit_softcapping = cap
    head = engine.model.get_output_embeddings()
    try:
        gen = torch.Generator().manual_seed(0)
        for n in (7, 3):  # the second call reads the first rows of the first call's buffer
            hidden = torch.randn(n, head.in_features, generator=gen)
            targets = torch.randint(0, head.out_features, (n,), generator=gen)
            logits = head(hidden).float()
            if cap:
                logits = torch.tanh(logits / cap) * cap
            want = torch.log_softmax(logits, -1).gather(-1, targets[:, None]).squeeze(-1)
            got = engine._target_logprobs(hidden, targets)
            assert engine._logits_buffer is not None and engine._logits_buffer.numel() >= 7 * 37
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    finally:
        cfg.final_logit_softcapping = saved
        del engine.score_head_block
        engine.forget_prefix()


@pytest.mark.parametrize("engine_name", ["tiny_engine", "tiny_gemma_engine"])
@pytest.mark.parametrize("few_shot", ["", "Q: Is a kilo of lead heavier than a kilo of feathers?\nA: No.\n\n"])
def test_items_packed_into_shared_forwards_score_as_alone(engine_name, few_shot, request, monkeypatch):
    """Items of different context lengths scored in packs (contexts right-padded, every item's
    continuations on its own context's cache rows) give each continuation the score it gets alone;
    an item longer than tiny gemma's 64-token window goes in a pack of its own."""
    engine = request.getfixturevalue(engine_name)
    long_ctx = "Q: " + "Tell me a long story about rivers and mountains and the sea. " * 5 + "\nA:"
    items = [(f"{few_shot}Q: What colour is the sky?\nA:", [" Blue.", " Green, mostly, on a clear day.", " Red"]),
             (f"{few_shot}Q: Name a large animal that lives in the ocean and eats krill.\nA:", [" A whale.", " A cat"]),
             (f"{few_shot}Q: 2+2?\nA:", [" 4", " 5", " four"]),
             (f"{few_shot}{long_ctx}", [" Once upon a time.", " No."])]
    packs = []
    real = engine._score_pack
    monkeypatch.setattr(engine, "_score_pack", lambda pack, *a: (packs.append(len(pack)), real(pack, *a))[1])
    got = engine.score_many(items)
    for (ctx, conts), scores in zip(items, got, strict=True):
        for cont, s in zip(conts, scores, strict=True):
            assert s == pytest.approx(naive_score(engine, ctx, cont), abs=1e-3)
    assert sum(packs) == len(items)
    if engine_name == "tiny_engine" or not few_shot:  # (tiny gemma's tokens are short: with the
        assert max(packs) >= 2  # few-shot block no two items fit its window together)
    if engine_name == "tiny_gemma_engine":
        assert 1 in packs  # the long item, alone


@pytest.mark.parametrize("cap", [None, 5.0])
def test_decode_logits_in_vocabulary_blocks_equal_the_plain_head(tiny_gemma_engine, monkeypatch, cap):
    """The decoding head laid out block by block (weight block @ hiddenᵀ into a kept buffer) gives
    the plain head's logits, softcapped or not, for one row, several rows, a vocabulary that does
    not divide into blocks, and a call that reuses a larger buffer."""
    engine = tiny_gemma_engine
    cfg = engine.model.config.get_text_config()
    monkeypatch.setattr(cfg, "final_logit_softcapping", cap)
    head = engine.model.get_output_embeddings()
    monkeypatch.setattr(engine, "decode_head_block", 37)
    monkeypatch.setattr(engine, "_head_fn", False)  # one row takes the plain head, built with this cap
    assert head.out_features % 37
    engine._decode_buffers = None
    gen = torch.Generator().manual_seed(1)
    for rows in (5, 1, 3):
        hidden = torch.randn(rows, head.in_features, generator=gen)
        want = head(hidden).float()
        if cap:
            want = torch.tanh(want / cap) * cap
        got = engine._decode_logits(hidden)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert engine._decode_buffers is not None and engine._decode_buffers[0].shape[0] == 5
    engine.forget_prefix()
    assert engine._decode_buffers is None


@pytest.mark.parametrize("bias", [False, True])
def test_laid_out_linears_match_nn_linear_and_leave_training_alone(bias):
    from selfalign.core.engines.cpu_matmul import MAX_ROWS, lay_out_linears, plain_linears

    torch.manual_seed(0)
    plain = torch.nn.Linear(24, 40, bias=bias)
    laid = torch.nn.Linear(24, 40, bias=bias)
    laid.load_state_dict(plain.state_dict())
    model = torch.nn.Sequential(laid, torch.nn.GELU())
    assert lay_out_linears(model) == 1 and lay_out_linears(model) == 1  # idempotent
    for shape in [(1, 24), (2, 24), (3, 5, 24), (MAX_ROWS + 1, 24), (4, 0, 24)]:
        x = torch.randn(*shape)
        with torch.inference_mode():
            torch.testing.assert_close(laid(x), plain(x), atol=1e-5, rtol=1e-5)
    # a recorded graph runs nn.Linear itself: gradients equal the plain layer's
    x = torch.randn(6, 24)
    laid(x).sum().backward()
    plain(x).sum().backward()
    torch.testing.assert_close(laid.weight.grad, plain.weight.grad)
    # the laid-out product really ran under inference: its result is the transposed view
    with torch.inference_mode():
        assert not laid(torch.randn(8, 24)).is_contiguous()
        with plain_linears():
            assert laid(torch.randn(8, 24)).is_contiguous()


def test_the_engine_lays_out_its_body_but_not_its_head(tiny_engine):
    head = tiny_engine.model.get_output_embeddings()
    laid = [m for m in tiny_engine.model.modules() if getattr(m, "_selfalign_laid_out", False)]
    assert laid and head not in laid


def test_continuations_split_into_batches_with_bounded_padding():
    from selfalign.core.engines.hf import HFEngine

    split = HFEngine._split_by_width
    lengths = [2, 3, 3, 8, 9, 30, 31, 200]
    runs = split(lengths, slack=1.25, extra=0)
    assert [b for run in runs for b in run] == list(range(len(lengths)))  # every row once, in order
    for run in runs:
        real = sum(lengths[b] for b in run)
        assert len(run) * max(lengths[b] for b in run) <= 1.25 * real or len(run) == 1
    assert [200] in [[lengths[b] for b in run] for run in runs]  # the long one goes alone
    # the boundary: 4 rows of 10 and one of 13 pad to 65 tokens for 53 real (65 <= 1.25 * 53 = 66.25)
    assert split([10, 10, 10, 10, 13], slack=1.25, extra=0) == [[0, 1, 2, 3, 4]]
    assert split([10, 10, 10, 10, 14], slack=1.25, extra=0) == [[0, 1, 2, 3], [4]]
    assert split([1] * 5, extra=64) == [[0, 1, 2, 3, 4]]


def test_bfloat16_scores_agree_with_the_plain_path_in_bfloat16(tiny_gemma_bf16_engine, tiny_gemma_engine):
    """The opt-in bfloat16 engine scores within 1e-3 (relative) of a full-logits forward in the same dtype;
    against float32 it is only close (bfloat16 keeps 8 bits of mantissa), which is why it is opt-in."""
    context = "Human: hi\n\nAssistant:"
    conts = [" hello there, how are you today?", " no", " the cat sat on the mat and it was good"]
    got = tiny_gemma_bf16_engine.score(context, conts)
    for g, c in zip(got, conts, strict=True):
        assert g == pytest.approx(naive_score(tiny_gemma_bf16_engine, context, c), rel=1e-3)
        assert g == pytest.approx(naive_score(tiny_gemma_engine, context, c), rel=1e-2)
