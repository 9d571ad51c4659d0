"""The output layer only at labelled positions: same loss and gradients, fewer projections."""

import pytest
import torch

trl_utils = pytest.importorskip("trl.trainer.utils")
if not hasattr(trl_utils, "add_fused_lm_head"):
    pytest.skip("this TRL has no fused LM head", allow_module_level=True)

from selfalign.core.tiny import build_tiny_model  # noqa: E402
from selfalign.core.training_speed import head_at_label_positions  # noqa: E402


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
    projected = []
    real = trl_utils._ChunkedLogProbFunction.apply
    monkeypatch.setattr(trl_utils._ChunkedLogProbFunction, "apply",
                        lambda hidden, *a: projected.append(hidden.shape[0]) or real(hidden, *a))

    def loss_and_grads():
        model.zero_grad()
        out = model(input_ids=ids, attention_mask=mask, labels=labels, fused_lm_head=True)
        out.loss.backward()
        return out, [p.grad.clone() for p in model.parameters() if p.grad is not None]

    plain, plain_grads = loss_and_grads()
    with head_at_label_positions() as active:
        fast, fast_grads = loss_and_grads()
    assert active
    assert projected == [3 * 19, int((labels[:, 1:] != -100).sum())]  # every position, then labelled ones only
    assert torch.allclose(fast.loss, plain.loss, atol=1e-6)
    assert torch.equal(fast.label_mask, plain.label_mask)
    assert torch.allclose(fast.entropy, plain.entropy, atol=1e-5)
    for a, b in zip(fast_grads, plain_grads, strict=True):
        assert torch.allclose(a, b, atol=1e-5, rtol=1e-4)
    assert trl_utils._use_triton(torch.device("cpu")) is False  # restored after the block
