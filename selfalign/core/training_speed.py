"""Fine-tuning pays for the output layer only where the loss is.

Supervised fine-tuning here puts the loss on the answer only (`training.build_example` labels the
prompt -100), and a batch is padded to its longest example. On a vocabulary like gemma's (262k
tokens, 168M of the model's 268M parameters) the output layer is most of the forward and backward
cost of a position, so projecting the prompt and padding positions is most of the waste.

TRL's `SFTTrainer` already replaces the model's head with a fused, chunked log-probability head
(`trl.trainer.utils.add_fused_lm_head`) that can project only the positions whose label counts. It
does so only where Triton runs (CUDA, XPU), because on other accelerators (Neuron) a changing
number of positions recompiles the graph; elsewhere it projects every position and zeroes the
ignored ones. Eager PyTorch on a CPU recompiles nothing, so `head_at_label_positions` lets TRL take
its compact branch there too. The loss and its gradient are the same sums over the same positions
(tested against the default branch); only the wasted projections go.

On a CPU the block also swaps TRL's chunked log-probability function for `KeptProbs`, which keeps
the softmax of the scored positions from the forward for the backward instead of recomputing it tile
by tile: one product with the 262k x 640 output weight in three, and several passes over the
logits, saved a step. It holds N x vocab floats until the backward (1 GiB at most,
`KEEP_PROBS_BYTES`; beyond it, and wherever it does not apply, TRL's function runs). Its outputs and
gradients are TRL's to float rounding (tested against it).

It changes private TRL names for the duration of a `with` block, and does nothing when they are
absent (another TRL version): training then runs as it did, only slower.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch

# the scored positions' probabilities KeptProbs may hold from the forward to the backward
KEEP_PROBS_BYTES = 1 << 30


def _compact_on_every_device(device) -> bool:
    """TRL asks "Triton here?" to decide whether to project only the labelled positions; the answer
    that matters for that decision is "no recompilation to fear", true everywhere we train eagerly."""
    return True


@contextmanager
def head_at_label_positions() -> Iterator[bool]:
    """Within the block, TRL's fused LM head projects only positions with a label; yields whether it
    could (False: this TRL has no such switch, and training is unchanged)."""
    try:
        from trl.trainer import utils as trl_utils
    except ImportError:
        yield False
        return
    original = getattr(trl_utils, "_use_triton", None)
    chunked = getattr(trl_utils, "_ChunkedLogProbFunction", None)
    if original is None or chunked is None or not hasattr(trl_utils, "add_fused_lm_head"):
        yield False
        return
    trl_utils._use_triton = _compact_on_every_device
    trl_utils._ChunkedLogProbFunction = _KeptProbsWhereTheyFit(chunked)
    try:
        yield True
    finally:
        trl_utils._use_triton = original
        trl_utils._ChunkedLogProbFunction = chunked


class _KeptProbsWhereTheyFit:
    """Stands in for TRL's `ChunkedLogProbFunction` (same `apply` arguments): `KeptProbs` for float32
    inputs on a CPU, without softcapping or autocast, whose probabilities fit `KEEP_PROBS_BYTES`;
    TRL's function otherwise."""

    def __init__(self, chunked):
        self.chunked = chunked

    def apply(self, hidden, weight, bias, targets, temperature, chunk_size, softcap=None, logit_scale=1.0,
              outputs=("log_probs",)):
        if (hidden.device.type == "cpu" and softcap is None and hidden.dtype == weight.dtype == torch.float32
                and not torch.is_autocast_enabled("cpu")
                and hidden.shape[0] * weight.shape[0] * 4 <= KEEP_PROBS_BYTES):
            return KeptProbs.apply(hidden, weight, bias, targets, temperature, logit_scale, tuple(outputs))
        return self.chunked.apply(hidden, weight, bias, targets, temperature, chunk_size, softcap, logit_scale, outputs)


class KeptProbs(torch.autograd.Function):
    """Per-position log p(target) under softmax((hidden @ weightᵀ + bias) x logit_scale / temperature),
    and what TRL's `ChunkedLogProbFunction` computes beside it on request (`outputs`: "entropy",
    "log_sum_sq_probs", "mean_logits", "is_top1"), with the same return tuple. The forward keeps the
    probabilities; the backward turns them, in place, into the logits' gradient, so it runs once
    (a second backward raises, as autograd sees the saved tensor changed)."""

    ROWS = 64  # rows at a time where a temporary of the logits' width is needed

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, temperature, logit_scale, outputs):
        n, vocab = hidden.shape[0], weight.shape[0]
        scale = logit_scale / temperature
        z = torch.mm(hidden, weight.t())
        if bias is not None:
            z.add_(bias)
        if scale != 1.0:
            z.mul_(scale)
        log_z = torch.logsumexp(z, dim=-1)
        logprobs = z.gather(-1, targets[:, None]).squeeze(-1) - log_z
        mean_logits = z.sum(-1) / vocab if "mean_logits" in outputs else None
        is_top1 = z.argmax(-1) == targets if "is_top1" in outputs else None  # the first maximum, as TRL's
        z.sub_(log_z[:, None])  # log-probabilities
        entropy = z.new_empty(n) if "entropy" in outputs else None
        for a in range(0, n, KeptProbs.ROWS):
            block = z[a: a + KeptProbs.ROWS]
            if entropy is not None:
                probs = block.exp()
                entropy[a: a + KeptProbs.ROWS] = -(probs * block).sum(-1)
                block.copy_(probs)
            else:
                block.exp_()
        log_sum_sq = z.square().sum(-1).log() if "log_sum_sq_probs" in outputs else None
        ctx.save_for_backward(hidden, weight, bias, targets, z, log_z, entropy if entropy is not None else log_z)
        ctx.scale = scale
        ctx.mark_non_differentiable(*(x for x in (log_sum_sq, mean_logits, is_top1) if x is not None))
        ctx.set_materialize_grads(False)
        return logprobs, entropy, log_sum_sq, mean_logits, is_top1

    @staticmethod
    def backward(ctx, grad_logprobs, grad_entropy, *_):
        hidden, weight, bias, targets, probs, log_z, entropy = ctx.saved_tensors
        # d log p_t / dz_j = 1[j = t] - p_j;  d entropy / dz_j = -p_j (log p_j + entropy)
        grad = probs  # the logits' gradient, made in place of the probabilities
        if grad_logprobs is None and grad_entropy is None:
            grad.zero_()
        elif grad_entropy is None:
            grad.mul_(-grad_logprobs[:, None])
        else:
            for a in range(0, grad.shape[0], KeptProbs.ROWS):
                sl = slice(a, a + KeptProbs.ROWS)
                log_p = torch.mm(hidden[sl], weight.t())  # again: a kept p_j may have underflowed to 0
                if bias is not None:
                    log_p.add_(bias)
                factor = log_p.mul_(ctx.scale).sub_(log_z[sl, None]).add_(entropy[sl, None])
                factor.mul_(grad_entropy[sl, None])
                if grad_logprobs is not None:
                    factor.add_(grad_logprobs[sl, None])
                grad[sl].mul_(factor.neg_())
        if grad_logprobs is not None:
            grad[torch.arange(grad.shape[0]), targets] += grad_logprobs
        grad.mul_(ctx.scale)
        need_hidden, need_weight, need_bias = ctx.needs_input_grad[:3]
        return (torch.mm(grad, weight) if need_hidden else None,
                torch.mm(grad.t(), hidden) if need_weight else None,
                grad.sum(0) if need_bias and bias is not None else None,
                None, None, None, None)
