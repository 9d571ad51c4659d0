"""A KV cache that grows in place, for the `hf` engine's decoding loop.

transformers' `DynamicCache` grows each layer by `torch.cat([keys, new])`: every decoding step copies
every row's whole cache, in every layer. Under Self-Align's principle prompt (~1,900 tokens on gemma)
that copy was a fifth of a decoding step at batch 16 on a 2-core CPU (`aten::cat`, 6.3 s of 29.6 s
in a profile of 24 steps), more than the attention that reads the same cache.

`slab(cache, room)` swaps each layer of a `DynamicCache` for one that keeps its keys and values in a
buffer with `room` free positions; a step writes its new position into the buffer and hands
attention a view, copying nothing. The layers keep transformers' semantics (`cumulative_length`,
the sliding window's visible span, `get_mask_sizes`), so masks and outputs are unchanged:

- a full-attention layer returns every position so far;
- a sliding-window layer returns its last `window - 1` positions plus the new ones, exactly what
  `DynamicSlidingWindowLayer` returns; when its buffer fills, it moves the last `window - 1`
  positions to the front (one copy every `room` steps, not one every step).

Rows leaving the batch (`batch_select_indices`) copy the survivors' rows into a new buffer.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import DynamicLayer, DynamicSlidingWindowLayer


class _Slab:
    """Buffer bookkeeping shared by both layer kinds: `_k`/`_v` hold `_n` positions and room for more."""

    _k: torch.Tensor
    _v: torch.Tensor
    _n: int
    room: int

    def _adopt(self, keys: torch.Tensor, values: torch.Tensor, room: int) -> None:
        b, h, n, d = keys.shape
        self.room = max(room, 1)
        self._k = keys.new_empty((b, h, n + self.room, d))
        self._v = values.new_empty((b, h, n + self.room, values.shape[-1]))
        self._k[:, :, :n] = keys
        self._v[:, :, :n] = values
        self._n = n

    def _write(self, key_states: torch.Tensor, value_states: torch.Tensor, keep: int | None) -> None:
        t = key_states.shape[-2]
        if self._n + t > self._k.shape[2]:
            # full: keep the last `keep` positions (all, for full attention) and make room again
            start = 0 if keep is None else max(self._n - keep, 0)
            self._adopt(self._k[:, :, start: self._n], self._v[:, :, start: self._n], max(self.room, t))
        self._k[:, :, self._n: self._n + t] = key_states
        self._v[:, :, self._n: self._n + t] = value_states
        self._n += t

    def _sync(self) -> None:
        raise NotImplementedError

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        if self.is_initialized:
            self._k, self._v = self._k[indices], self._v[indices]
            self._sync()

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.is_initialized:
            self._k = self._k.repeat_interleave(repeats, dim=0)
            self._v = self._v.repeat_interleave(repeats, dim=0)
            self._sync()

    def drop_last(self, n: int) -> None:
        """Forget the last `n` positions written (at most those of the last write): decoding wrote
        draft tokens that were not kept. The buffer still holds what the view needs: a write that
        made room kept the `window - 1` positions before it, and `n` is less than what it wrote."""
        self._n -= n
        self._sync()


class SlabLayer(_Slab, DynamicLayer):
    """A full-attention layer whose cache grows in place."""

    def __init__(self, room: int):
        DynamicLayer.__init__(self)
        self.room = room

    def _sync(self) -> None:
        self.keys, self.values = self._k[:, :, : self._n], self._v[:, :, : self._n]

    def update(self, key_states, value_states, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
            self._adopt(key_states[:, :, :0], value_states[:, :, :0], self.room + key_states.shape[-2])
        self._write(key_states, value_states, None)
        self._sync()
        return self.keys, self.values


class SlabSlidingLayer(_Slab, DynamicSlidingWindowLayer):
    """A sliding-window layer whose cache grows in place (see the module docstring)."""

    def __init__(self, sliding_window: int, room: int):
        DynamicSlidingWindowLayer.__init__(self, sliding_window=sliding_window)
        self.room = room

    def drop_last(self, n: int) -> None:
        self.cumulative_length -= n
        super().drop_last(n)

    def _sync(self) -> None:
        start = max(self._n - (self.sliding_window - 1), 0)
        self.keys, self.values = self._k[:, :, start: self._n], self._v[:, :, start: self._n]

    def update(self, key_states, value_states, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
            self._adopt(key_states[:, :, :0], value_states[:, :, :0], self.room + key_states.shape[-2])
        t = key_states.shape[-2]
        self.cumulative_length += t
        self._write(key_states, value_states, self.sliding_window - 1)
        start = max(self._n - (self.sliding_window - 1) - t, 0)
        out = self._k[:, :, start: self._n], self._v[:, :, start: self._n]
        self._sync()
        return out


def can_drop_last(cache) -> bool:
    """Whether every layer of `cache` can forget its last positions (`drop_last`): all are slab layers."""
    return cache is not None and bool(getattr(cache, "layers", None)) and all(
        isinstance(layer, _Slab) for layer in cache.layers)


def drop_last(cache, n: int) -> None:
    """Forget the last `n` positions of every layer of `cache` (see `can_drop_last`)."""
    if n:
        for layer in cache.layers:
            layer.drop_last(n)


def slab(cache, room: int):
    """`cache` (a `DynamicCache`, possibly holding a prefix) with every plain or sliding-window layer
    replaced by one that grows in place with `room` free positions; other layer kinds are kept as
    they are. The layers' current tensors are copied into the new buffers (the source is left alone,
    so a kept prefix cache can be slabbed again for the next batch)."""
    layers = []
    for layer in cache.layers:
        if type(layer) is DynamicSlidingWindowLayer and not layer.record_past:
            new = SlabSlidingLayer(layer.sliding_window, room)
            if layer.is_initialized:
                new.lazy_initialization(layer.keys, layer.values)
                new.cumulative_length = layer.cumulative_length
                new._adopt(layer.keys, layer.values, room)
                new._sync()
        elif type(layer) is DynamicLayer:
            new = SlabLayer(room)
            if layer.is_initialized and layer.keys.numel():
                new.lazy_initialization(layer.keys, layer.values)
                new._adopt(layer.keys, layer.values, room)
                new._sync()
        else:
            new = layer
        layers.append(new)
    cache.layers = layers
    return cache
