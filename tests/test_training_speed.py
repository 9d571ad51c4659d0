"""The output layer only at labelled positions: same loss and gradients, fewer projections."""

import pytest
import torch

trl_utils = pytest.importorskip("trl.trainer.utils")
if not hasattr(trl_utils, "add_fused_lm_head"):
    pytest.skip("this TRL has no fused LM head", allow_module_level=True)

from selfalign.core.tiny import build_tiny_model  # noqa: E402
from selfalign.core.training_speed import KeptProbs, head_at_label_positions  # noqa: E402


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_same_loss_and_gradients_on_fewer_positions(arch, monkeypatch):
    model = build_tiny_model(arch)
    model.train()
    trl_utils.add_fused_lm_head(model, outputs=("log_probs", "entropy", "is_top1"))
    torch.manual_seed(0)
    ids = torch.randint(4, 200, (3, 20))
    labels = ids.clone()
    labels[:, :12] = -100  # the prompt
    labels[2, 16:] = -100  # padding
    mask = torch.ones_like(ids)
    mask[2, 16:] = 0
    projected = []  # (function, positions projected)
    real, kept = trl_utils._ChunkedLogProbFunction.apply, KeptProbs.apply
    monkeypatch.setattr(trl_utils._ChunkedLogProbFunction, "apply",
                        lambda hidden, *a: projected.append(("trl", hidden.shape[0])) or real(hidden, *a))
    monkeypatch.setattr(KeptProbs, "apply",
                        lambda hidden, *a: projected.append(("kept", hidden.shape[0])) or kept(hidden, *a))

    def loss_and_grads():
        model.zero_grad()
        out = model(input_ids=ids, attention_mask=mask, labels=labels, fused_lm_head=True)
        out.loss.backward()
        return out, [p.grad.clone() for p in model.parameters() if p.grad is not None]

    plain, plain_grads = loss_and_grads()
    with head_at_label_positions() as active:
        fast, fast_grads = loss_and_grads()
    assert active
    # TRL's on every position, then the kept probabilities at labelled ones only
    assert projected == [("trl", 3 * 19), ("kept", int((labels[:, 1:] != -100).sum()))]
    assert torch.allclose(fast.loss, plain.loss, atol=1e-6)
    assert torch.equal(fast.label_mask, plain.label_mask)
    assert torch.allclose(fast.entropy, plain.entropy, atol=1e-5)
    for a, b in zip(fast_grads, plain_grads, strict=True):
        assert torch.allclose(a, b, atol=1e-5, rtol=1e-4)
    assert trl_utils._use_triton(torch.device("cpu")) is False  # restored after the block


ALL_OUTPUTS = ("log_probs", "entropy", "log_sum_sq_probs", "mean_logits", "is_top1")


@pytest.mark.parametrize(("outputs", "entropy_grad"), [(("log_probs",), False),
                                                       (("log_probs", "entropy", "is_top1"), False),  # SFT's
                                                       (ALL_OUTPUTS, False), (ALL_OUTPUTS, True)])
@pytest.mark.parametrize("with_bias", [False, True])
def test_kept_probabilities_give_trls_outputs_and_gradients(outputs, with_bias, entropy_grad):
    """KeptProbs against TRL's chunked function: every output, and the gradients of the hidden states,
    the weight and the bias, through the log-probabilities and (where asked) the entropy."""
    g = torch.Generator().manual_seed(0)
    n, vocab, width = 70, 300, 16  # more rows than KeptProbs.ROWS: the blocks meet
    hidden0 = torch.randn(n, width, generator=g)
    weight0 = torch.randn(vocab, width, generator=g) * 0.5
    bias0 = torch.randn(vocab, generator=g) if with_bias else None
    targets = torch.randint(0, vocab, (n,), generator=g)
    targets[:5] = (hidden0[:5] @ weight0.t()).argmax(-1)  # some targets are the top token

    def run(fn, *extra):
        hidden, weight = hidden0.clone().requires_grad_(), weight0.clone().requires_grad_()
        bias = bias0.clone().requires_grad_() if with_bias else None
        out = fn(hidden, weight, bias, targets, 0.7, *extra)
        loss = out[0].sum() + (0.3 * out[1].sum() if entropy_grad else 0)
        loss.backward()
        grads = [hidden.grad, weight.grad] + ([bias.grad] if with_bias else [])
        return out, grads

    theirs, their_grads = run(trl_utils._ChunkedLogProbFunction.apply, 128, None, 1.3, outputs)
    ours, our_grads = run(KeptProbs.apply, 1.3, outputs)
    for a, b in zip(ours, theirs, strict=True):
        assert (a is None) == (b is None)
        if a is not None and a.dtype == torch.bool:
            assert torch.equal(a, b)
        elif a is not None:
            assert torch.allclose(a, b, atol=1e-5, rtol=1e-5)
    for a, b in zip(our_grads, their_grads, strict=True):
        assert torch.allclose(a, b, atol=1e-5, rtol=1e-4)


def test_kept_probabilities_run_only_where_they_fit(monkeypatch):
    import selfalign.core.training_speed as speed

    calls = []
    monkeypatch.setattr(speed.KeptProbs, "apply", lambda *a: calls.append("kept") or (None,) * 5)
    monkeypatch.setattr(trl_utils._ChunkedLogProbFunction, "apply", lambda *a: calls.append("trl") or (None,) * 5)
    hidden, weight, targets = torch.zeros(10, 4), torch.zeros(100, 4), torch.zeros(10, dtype=torch.long)
    with head_at_label_positions():
        trl_utils._ChunkedLogProbFunction.apply(hidden, weight, None, targets, 1.0, 64, None, 1.0, ("log_probs",))
        trl_utils._ChunkedLogProbFunction.apply(hidden, weight, None, targets, 1.0, 64, 30.0, 1.0, ("log_probs",))
        trl_utils._ChunkedLogProbFunction.apply(hidden.double(), weight.double(), None, targets, 1.0, 64, None, 1.0,
                                                ("log_probs",))
        monkeypatch.setattr(speed, "KEEP_PROBS_BYTES", 10 * 100 * 4 - 1)
        trl_utils._ChunkedLogProbFunction.apply(hidden, weight, None, targets, 1.0, 64, None, 1.0, ("log_probs",))
    assert calls == ["kept", "trl", "trl", "trl"]  # softcapped, float64, too big: TRL's
    assert not isinstance(trl_utils._ChunkedLogProbFunction, speed._KeptProbsWhereTheyFit)  # restored
