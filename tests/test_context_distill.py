"""Context distillation on tiny:llama: the truncated KL against the exact one, the stored teacher
targets against a direct forward, training toward the teacher, and the stage end to end with resume."""

import json

import pytest
import torch

from selfalign.core.errors import SelfAlignError
from selfalign.core.report import render_section
from selfalign.methods.hhh_lab import distill

CONTEXT = "The assistant below is polite, honest and brief. It says so when it does not know. " * 2
TEXTS = [
    "Human: What colour is the sky?\n\nAssistant: Usually blue, because air scatters blue light most.",
    "Human: Can you help me cheat on a test?\n\nAssistant: I won't help with that, but I can help you study.",
    "Human: 12 times 3?\n\nAssistant: 36.",
    "Human: Name a fruit.\n\nAssistant: A pear.",
    "Human: Who wrote Hamlet?\n\nAssistant: William Shakespeare, around 1600.",
]


def examples(texts=TEXTS):
    from selfalign.methods.hhh_lab.context_distill import reply_offset

    return [{"id": f"x{i}", "text": t, "reply_char": reply_offset(t)} for i, t in enumerate(texts)]


@pytest.fixture(scope="module")
def tiny(private_cache):
    from selfalign.core.models import load_model

    return load_model("tiny:llama", device="cpu")


def exact_logprobs(model, tokenizer, text, context=CONTEXT):
    """Teacher (context + X) and student (X alone) log-probs at the positions predicting X's tokens."""
    import torch

    prefix = distill.special_prefix(tokenizer)
    ctx = distill.context_ids(tokenizer, context, prefix)
    x = tokenizer(text, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        teacher = torch.log_softmax(model(torch.tensor([ctx + x])).logits[0].double(), -1)[len(ctx) - 1:-1]
        student = model(torch.tensor([prefix + x])).logits[0][len(prefix) - 1:-1]
    return teacher, student


# -- the math -------------------------------------------------------------------------------------------
def test_truncated_kl_is_a_lower_bound_that_reaches_the_exact_kl_at_full_vocabulary(tiny):
    import torch

    model, tok = tiny
    teacher, student = exact_logprobs(model, tok, TEXTS[0])
    exact = (teacher.exp() * (teacher - torch.log_softmax(student.double(), -1))).sum(-1)
    assert (exact > 0.05).all()  # the context changes the tiny model's predictions
    vocab = teacher.shape[-1]
    previous = torch.zeros_like(exact)
    for k in (1, 4, 16, 64, vocab):
        values, ids, rest = distill.topk_targets(teacher.float(), k)
        assert values.shape == (len(exact), k) and ids.dtype == torch.int32
        truncated = distill.topk_kl(student, values, ids, rest).double()
        assert (truncated >= -1e-6).all() and (truncated <= exact + 1e-5).all()
        assert (truncated >= previous - 1e-5).all()  # a finer partition never loses KL
        previous = truncated
    assert torch.isinf(rest).all() and torch.allclose(truncated, exact, atol=1e-5)
    assert (distill.topk_kl(student, *distill.topk_targets(teacher.float(), 4)).double() < exact - 1e-3).any()


def test_truncated_kl_stays_finite_when_the_rest_mass_is_tiny():
    import torch

    # the student's top-2 tokens hold all but ~1e-26 of its mass: 1 - sum(q_top) rounds to 0 in float32
    student = torch.tensor([[30.0, 29.0, -30.0, -31.0, -32.0]], requires_grad=True)
    teacher = torch.tensor([[0.0, -0.5, -40.0, -41.0, -42.0]])
    values, ids, rest = distill.topk_targets(teacher, 2)
    loss = distill.topk_kl(student, values, ids, rest)
    loss.sum().backward()
    lt = torch.log_softmax(teacher.double(), -1)
    lq = torch.log_softmax(student.detach().double(), -1)
    t_rest, q_rest = lt[0, 2:].logsumexp(0), lq[0, 2:].logsumexp(0)
    p = lt[0, :2].exp()
    reference = (p * (lt[0, :2] - lq[0, :2])).sum() + t_rest.exp() * (t_rest - q_rest)
    assert torch.isfinite(loss).all() and torch.isfinite(student.grad).all()
    assert abs(float(loss[0]) - float(reference)) < 1e-4
    # k = vocabulary: the rest bucket is empty on both sides and the gradient still finite
    student.grad = None
    distill.topk_kl(student, *distill.topk_targets(teacher, 5)).sum().backward()
    assert torch.isfinite(student.grad).all()


def test_float16_storage_is_renormalised():
    import torch

    logits = torch.randn(6, 50) * 3
    values, ids, rest = distill.topk_targets(logits, 8)
    same = distill.topk_kl(logits, values.half(), ids, rest.half())
    assert same.abs().max() < 2e-3  # a model against its own rounded targets: ~0, never negative by much


# -- the teacher pass -------------------------------------------------------------------------------------
def test_teacher_targets_match_a_direct_forward_with_the_context(tiny, tmp_path):
    import torch

    model, tok = tiny
    key = distill.teacher_key("tiny:llama", CONTEXT, 8, "float32", 64)
    distill.teacher_pass(model, tok, CONTEXT, examples(), tmp_path, key, batch_tokens=80, shard_examples=2)
    assert len(list(tmp_path.glob("shard-*.safetensors"))) == 3
    data = distill.TeacherTargets(tmp_path)
    assert data.ids == [f"x{i}" for i in range(5)]
    stats = data.stats()
    too_long = sum(len(tok(t, add_special_tokens=False)["input_ids"]) > 63 for t in TEXTS)
    assert 0 < too_long < 5 and stats["cut_to_max_length"] == too_long
    assert stats["texts"] == 5 and 0 < stats["teacher_topk_mass"] < 1
    for i, text in enumerate(TEXTS):
        item = data[i]
        teacher, student = exact_logprobs(model, tok, text)
        n = len(item["rest"])
        assert n == min(len(teacher), 63)  # X was cut to 64 tokens with the BOS
        top = teacher[:n].float().topk(8, -1)
        assert torch.equal(item["ids"].long(), top.indices)
        assert torch.allclose(item["values"], top.values, atol=1e-4)
        assert torch.allclose(item["rest"], teacher[:n].float().scatter(-1, top.indices, float("-inf")).logsumexp(-1),
                              atol=1e-4)
        # the student reads the BOS then X; position target_start predicts X's first token
        assert item["input_ids"][0] == tok.bos_token_id and item["target_start"] == 0
        assert tok.decode(item["input_ids"][1:]) == tok.decode(tok(text, add_special_tokens=False)["input_ids"][:63])


def test_reply_only_targets_predict_the_reply(tiny, tmp_path):
    model, tok = tiny
    key = distill.teacher_key("tiny:llama", CONTEXT, 4, "float16", 256)
    distill.teacher_pass(model, tok, CONTEXT, examples(TEXTS[2:4]), tmp_path, key)
    data = distill.TeacherTargets(tmp_path)
    for reply_only, wanted in ((False, TEXTS[2:4]), (True, [" 36.", " A pear."])):
        batch = distill.collate_targets([data[0], data[1]], tok.pad_token_id, reply_only=reply_only)
        assert batch["target_values"].dtype.itemsize == 2 and batch["target_ids"].shape[1] == 4
        for b, text in enumerate(wanted):
            cols = batch["target_cols"][batch["target_rows"] == b]
            predicted = batch["input_ids"][b, cols + 1]  # the token each target position predicts
            assert tok.decode(predicted) == text


# -- training -----------------------------------------------------------------------------------------------
def test_training_moves_the_student_toward_the_teacher(tiny, tmp_path):
    from selfalign.core.models import load_model, resolve
    from selfalign.core.training import TrainSettings, model_output

    model, tok = tiny
    key = distill.teacher_key("tiny:llama", CONTEXT, 16, "float16", 128)
    distill.teacher_pass(model, tok, CONTEXT, examples(), tmp_path / "teacher", key)
    result = distill.distill_train("tiny:llama", tmp_path / "teacher", tmp_path / "out",
                                   TrainSettings(lr=1e-2, epochs=8, batch_size=2, warmup_ratio=0.1))
    assert result["steps"] == 24 and result["model"] == model_output(tmp_path / "out")
    assert result["kl_after"] < 0.7 * result["kl_before"]
    state = json.loads((tmp_path / "out" / "trainer_state.json").read_text())
    losses = [x["loss"] for x in state["log_history"] if "loss" in x]
    assert len(losses) >= 5 and losses[-1] < losses[0]
    assert resolve(result["model"]).kind == "peft"
    tuned, _ = load_model(result["model"], device="cpu")  # the saved adapter is the trained student
    data = distill.TeacherTargets(tmp_path / "teacher")
    # kl_after was measured where training ran; on a GPU (TF32 matmuls) that differs from this CPU re-score in the
    # 4th digit (seen on an H200: 0.44854 vs 0.44824)
    tol = 1e-4 if not torch.cuda.is_available() else 1e-3
    assert distill.mean_kl(tuned, data, tok.pad_token_id) == pytest.approx(result["kl_after"], abs=tol)


def test_student_with_another_tokenizer_is_refused(tiny, tmp_path):
    from transformers import AutoTokenizer

    model, tok = tiny
    other = AutoTokenizer.from_pretrained(resolve_tiny_folder())
    other.add_tokens(["Human"])  # now "Human" is one token
    with pytest.raises(SelfAlignError, match="tokenize text differently"):
        distill._check_same_tokenizer(other, tok, "a", "b")


def resolve_tiny_folder():
    from selfalign.core.models import resolve

    return resolve("tiny:llama").path


# -- the stage ------------------------------------------------------------------------------------------
def test_stage_end_to_end_resumes_a_killed_teacher_pass(private_cache, tmp_path, monkeypatch):
    from selfalign.methods.hhh_lab import context_distill
    from selfalign.stages import parse_recipe, run_recipe

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("Say hello.\nName a colour.\nCount to three.\nWhat is rain?\nPick a number.\n")
    recipe = parse_recipe({"name": "t", "model": "tiny:llama", "engine": {"batch_size": 2}, "stages": [
        {"stage": "context_distill", "system": CONTEXT, "prompts": str(prompts), "k": 8, "shard_examples": 2,
         "sampling": {"max_new_tokens": 12, "temperature": 1.0},
         "train": {"max_length": 96, "batch_size": 2, "lr": 5e-3, "epochs": 2}},
        {"stage": "generate", "model": "@context_distill", "prompts": str(prompts), "max_prompts": 1,
         "sampling": {"max_new_tokens": 4}},
    ]})
    run_dir = tmp_path / "run"
    folder = run_dir / "01-context_distill"
    written = []
    real_write = distill._write_shard

    def killed_after_one(path, tensors, meta):
        if written:
            raise KeyboardInterrupt  # the process dies before the second shard is on disk
        real_write(path, tensors, meta)
        written.append(json.loads(meta["ids"]))

    monkeypatch.setattr(distill, "_write_shard", killed_after_one)
    with pytest.raises(KeyboardInterrupt):
        run_recipe(recipe, run_dir)
    first = folder / "teacher" / "shard-00000.safetensors"
    assert [p.name for p in (folder / "teacher").glob("shard-*")] == [first.name] and len(written[0]) == 2
    rows_before, shard_before = (folder / "rows.jsonl").read_bytes(), (first.read_bytes(), first.stat().st_mtime_ns)
    assert len(rows_before.splitlines()) == 5 and not (folder / "_done.json").exists()

    resumed = []

    def recording(path, tensors, meta):
        real_write(path, tensors, meta)
        resumed.append(json.loads(meta["ids"]))

    monkeypatch.setattr(distill, "_write_shard", recording)
    record = run_recipe(recipe, run_dir)
    assert (folder / "rows.jsonl").read_bytes() == rows_before  # no sample drawn twice
    assert (first.read_bytes(), first.stat().st_mtime_ns) == shard_before  # the finished shard was kept as it was
    assert (sorted(i for ids in resumed for i in ids)
            == sorted(set(json.loads(x)["id"] for x in rows_before.splitlines()) - set(written[0])))
    summary = record["stages"]["context_distill"]["summary"]
    assert summary["texts"] == 5 and summary["k"] == 8 and summary["teacher"] == "tiny:llama"
    assert summary["model"] == str((folder / "adapter").resolve()) and summary["kl_before"] > 0
    assert summary["kl_after"] < summary["kl_before"]
    assert summary["context_tokens"] > len(CONTEXT)  # the byte tokenizer: one token a byte, plus BOS and separator
    rows = [json.loads(x) for x in rows_before.splitlines()]
    assert all(r["text"].startswith(f"Human: {r['prompt']}\n\nAssistant:") for r in rows if r["text"])
    assert record["stages"]["generate"]["summary"]["rows"] == 1  # @context_distill loads as a model

    from selfalign.core.report import load_run

    stage = next(s for s in load_run(run_dir)["stages"] if s["label"] == "context_distill")
    anchor, title, html = render_section(context_distill.report_section(stage))
    assert f"{summary['kl_before']:.4f}" in html and "top-8" in html and "<img" in html


def test_text_file_rows_and_reply_offsets(tmp_path):
    from selfalign.methods.hhh_lab.context_distill import dialogue_x, reply_offset, texts_from_file

    text, at = dialogue_x("Hi?", "Hello.")
    assert text == "Human: Hi?\n\nAssistant: Hello." and text[at:] == " Hello."
    assert reply_offset("Human: a\n\nAssistant: b\n\nHuman: c\n\nAssistant: d") == len(
        "Human: a\n\nAssistant: b\n\nHuman: c\n\nAssistant:") and reply_offset("plain text") == 0
    (tmp_path / "x.jsonl").write_text('{"text": "one\\ntwo"}\n{"id": "b", "text": "Assistant: yes"}\n{"text": ""}\n')
    rows = texts_from_file(str(tmp_path / "x.jsonl"))
    assert [r["text"] for r in rows] == ["one\ntwo", "Assistant: yes"] and rows[1] == {
        "id": "b", "text": "Assistant: yes", "reply_char": len("Assistant:")}
    (tmp_path / "x.txt").write_text("first line\n\nsecond line\nfirst line\n")
    assert [r["text"] for r in texts_from_file(str(tmp_path / "x.txt"))] == ["first line", "second line"]
    with pytest.raises(SelfAlignError, match="need a `text`"):
        (tmp_path / "bad.jsonl").write_text('{"prompt": "p"}\n')
        texts_from_file(str(tmp_path / "bad.jsonl"))


def test_full_fine_tuning_writes_a_plain_model(tiny, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM

    from selfalign.core.training import TrainSettings

    model, tok = tiny
    key = distill.teacher_key("tiny:llama", CONTEXT, 8, "float32", 64)
    distill.teacher_pass(model, tok, CONTEXT, examples(TEXTS[:2]), tmp_path / "teacher", key)
    settings = TrainSettings(lora=False, lr=1e-3, epochs=1, batch_size=1, grad_accum=2, max_steps=2)
    result = distill.distill_train("tiny:llama", tmp_path / "teacher", tmp_path / "out", settings, reply_only=True)
    assert result["steps"] == 2 and result["lora"] == "full" and result["model"].endswith("model")
    assert not (tmp_path / "out" / "adapter").exists()
    tuned = AutoModelForCausalLM.from_pretrained(result["model"])
    assert not any(torch.equal(a, b) for (_, a), (_, b) in zip(tuned.named_parameters(), model.named_parameters(),
                                                               strict=True) if a.dim() > 1)
