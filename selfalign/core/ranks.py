"""Which process of a `launcher:` launch this is (`accelerate launch` starts one per device).

Every process runs the whole stage, so that all of them take part in training; only the main one
(rank 0) writes the stage's files: rows, the model, the trainer state, the done-marker. Outside a
launch (no `SELFALIGN_LAUNCHED` in the environment) every process is the main one, whatever
`RANK` another tool has set.
"""

from __future__ import annotations

import os
import time

LAUNCHED = "SELFALIGN_LAUNCHED"


def rank() -> int:
    """This process's global rank in a selfalign launch; 0 outside one."""
    if LAUNCHED not in os.environ:
        return 0
    return int(os.environ.get("RANK", "0") or 0)


def is_follower() -> bool:
    """A launched process other than the main one: it trains, and writes nothing of the stage's own."""
    return rank() > 0


def barrier() -> None:
    """Wait for every process of a launch (a no-op outside one, or before torch.distributed is up)."""
    if LAUNCHED not in os.environ:
        return
    try:
        import torch.distributed as dist
    except ImportError:
        return
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def wait_for_rows(store, ids: list[str], poll: float = 1.0) -> None:
    """A follower's share of a generation inside a launched stage: the main process generates and
    writes the rows; the follower rereads the store until every id is there (no collective, so
    generation may take longer than a process-group timeout)."""
    while True:
        store.reload()
        if all(rid in store for rid in ids):
            return
        time.sleep(poll)
