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

It changes one private TRL name for the duration of a `with` block, and does nothing when that
name is absent (another TRL version): training then runs as it did, only slower.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager


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
    if original is None or not hasattr(trl_utils, "add_fused_lm_head"):
        yield False
        return
    trl_utils._use_triton = _compact_on_every_device
    try:
        yield True
    finally:
        trl_utils._use_triton = original
