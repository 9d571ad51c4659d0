"""The in-place KV cache (`kv_slab`) returns exactly what transformers' dynamic layers return."""

import copy

import pytest
import torch
from transformers.cache_utils import DynamicCache, DynamicLayer, DynamicSlidingWindowLayer

from selfalign.core.engines.kv_slab import SlabLayer, SlabSlidingLayer, slab


def _steps(seed=0, batch=3, prefill=11, steps=40):
    g = torch.Generator().manual_seed(seed)
    yield torch.randn(batch, 1, prefill, 4, generator=g), torch.randn(batch, 1, prefill, 4, generator=g)
    for _ in range(steps):
        yield torch.randn(batch, 1, 1, 4, generator=g), torch.randn(batch, 1, 1, 4, generator=g)


@pytest.mark.parametrize("room", [1, 3, 64])  # 1 and 3 force the buffer to fill and compact or grow
@pytest.mark.parametrize("window", [None, 8])
def test_a_slab_layer_returns_what_the_dynamic_layer_returns(room, window):
    ref = DynamicLayer() if window is None else DynamicSlidingWindowLayer(sliding_window=window)
    ours = SlabLayer(room) if window is None else SlabSlidingLayer(window, room)
    for i, (k, v) in enumerate(_steps()):
        if i == 20:  # a row leaves the batch half-way, as finished rows do
            keep = torch.tensor([0, 2])
            ref.batch_select_indices(keep)
            ours.batch_select_indices(keep)
            k, v = k[keep], v[keep]
        if i > 20:
            k, v = k[:2], v[:2]
        rk, rv = ref.update(k, v)
        ok, ov = ours.update(k, v)
        assert torch.equal(rk, ok) and torch.equal(rv, ov), f"step {i}"
        assert ref.get_seq_length() == ours.get_seq_length()
        assert ref.get_mask_sizes(1) == ours.get_mask_sizes(1)
        assert torch.equal(ref.keys, ours.keys)


def test_slab_copies_a_forked_prefix_and_leaves_the_kept_one_alone():
    from selfalign.core.engines.hf import fork_cache

    k, v = torch.randn(1, 1, 9, 4), torch.randn(1, 1, 9, 4)
    kept, ref = DynamicCache(), DynamicCache()
    kept.update(k, v, 0)
    ref.update(k, v, 0)
    ref.batch_repeat_interleave(2)
    ours = slab(fork_cache(kept), 5)
    assert isinstance(ours.layers[0], SlabLayer)
    ours.batch_repeat_interleave(2)
    for _ in range(12):
        nk, nv = torch.randn(2, 1, 1, 4), torch.randn(2, 1, 1, 4)
        a, b = ref.update(nk, nv, 0), ours.update(nk, nv, 0)
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert kept.layers[0].keys.shape[-2] == 9 and torch.equal(kept.layers[0].keys, k)


@pytest.mark.parametrize("room", [1, 3, 64])
@pytest.mark.parametrize("window", [None, 8])
def test_dropping_the_last_positions_equals_never_writing_them(room, window):
    """Prompt lookup writes draft positions and forgets those not kept (`drop_last`): the layer then
    returns what a layer fed only the kept positions returns, across compactions and the window."""
    ref = DynamicLayer() if window is None else DynamicSlidingWindowLayer(sliding_window=window)
    ours = SlabLayer(room) if window is None else SlabSlidingLayer(window, room)
    g = torch.Generator().manual_seed(1)
    for i in range(30):
        t = 9 if i == 0 else 1 + i % 5  # a prefill, then a token and up to 4 drafts
        keep = t if i == 0 else 1 + (i * 7) % t  # how many of them were kept
        k, v = torch.randn(1, 1, t, 4, generator=g), torch.randn(1, 1, t, 4, generator=g)
        ours.update(k, v)
        ours.drop_last(t - keep)
        ref.update(k[:, :, :keep], v[:, :, :keep])
        assert ref.get_seq_length() == ours.get_seq_length(), f"step {i}"
        assert torch.equal(ref.keys, ours.keys) and torch.equal(ref.values, ours.values), f"step {i}"
        probe = torch.randn(1, 1, 1, 4, generator=g)  # and the next write sees the same past
        a, b = copy.deepcopy(ref).update(probe, probe), copy.deepcopy(ours).update(probe, probe)
        assert torch.equal(a[0], b[0]), f"step {i}"
