"""The key/value cache that decoding keeps, and the three calls the model makes on it.

``GPT.forward(idx, cache=cache)`` drives a cache through a small interface:

    positions = cache.begin(T, device)            before a pass over T new positions: their
                                                  positions (a LongTensor), and the mask is set
    k, v, mask, is_causal = cache.update(layer, k, v)   in each layer: store the new keys and
                                                  values, get back what attention should see
    cache.advance(T)                              after the pass

By default the position lives on the host and attention spans only the filled part: the least
work in eager mode. With ``static=True`` the position also lives in a device tensor and attention
always spans the whole buffer, masked: every one-token step then has the same shapes and reads no
host value, which is what capturing it as a CUDA graph or compiling it needs (``generate.Decoder``).
"""

from __future__ import annotations

import torch


class KVCache:
    """Preallocated keys and values of every layer, for ``batch`` sequences of ``length`` positions."""

    def __init__(self, config, batch: int, length: int, device, dtype, static: bool = False) -> None:
        shape = (batch, config.kv_heads, length, config.head_size)  # grouped-query: the key/value heads only
        self._attach([torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.n_layer)],
                     [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.n_layer)],
                     torch.zeros((), dtype=torch.long, device=device) if static else None)

    @classmethod
    def over(cls, keys: list[torch.Tensor], values: list[torch.Tensor], pos_tensor: torch.Tensor) -> "KVCache":
        """A static cache over existing buffers: how an exported step receives the decoder's cache."""
        cache = cls.__new__(cls)
        cache._attach(list(keys), list(values), pos_tensor)
        return cache

    def _attach(self, keys: list[torch.Tensor], values: list[torch.Tensor], pos_tensor: torch.Tensor | None) -> None:
        self.keys, self.values = keys, values
        self.length = keys[0].size(2)
        self.static = pos_tensor is not None
        self.pos = 0  # positions filled so far (kept on the host in both modes)
        self.pos_tensor = pos_tensor
        self.mask: torch.Tensor | None = None
        self.causal = True
        self._positions: torch.Tensor | None = None

    def reset(self) -> None:
        self.pos = 0
        if self.static:
            self.pos_tensor.zero_()

    def begin(self, T: int, device) -> torch.Tensor:
        """Set the mask for T new queries; return their positions."""
        if self.static:
            # Whoever drives a static cache keeps it in range: no host value may enter a captured
            # or compiled step.
            positions = self.pos_tensor + torch.arange(T, device=device)
            self.mask = torch.arange(self.length, device=device) <= positions[:, None]  # (T, length)
            self.causal = False
            self._positions = positions
            return positions
        past = self.pos
        if past + T > self.length:
            raise ValueError(f"sequence of {past + T} positions exceeds the cache's {self.length}")
        if past == 0:
            self.mask, self.causal = None, True
        elif T == 1:
            self.mask, self.causal = None, False  # one new query sees every cached position
        else:
            # New queries see all past positions and the new ones up to themselves.
            self.mask = torch.ones(T, past + T, dtype=torch.bool, device=device).tril(diagonal=past)
            self.causal = False
        return torch.arange(past, past + T, device=device)

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        """Store this pass's keys/values; return the keys, values, mask and causality attention uses."""
        if self.static:
            self.keys[layer].index_copy_(2, self._positions, k)
            self.values[layer].index_copy_(2, self._positions, v)
            return self.keys[layer], self.values[layer], self.mask, self.causal
        end = self.pos + k.size(2)
        self.keys[layer][:, :, self.pos:end] = k
        self.values[layer][:, :, self.pos:end] = v
        return self.keys[layer][:, :, :end], self.values[layer][:, :, :end], self.mask, self.causal

    def advance(self, T: int) -> None:
        if self.static:
            # Only the device-side position: a step replayed as a graph (or compiled) runs no
            # host code, so the host-side ``pos`` is kept by whoever drives the cache.
            self.pos_tensor += T
        else:
            self.pos += T


class FixedLayout:
    """Positions and an attention mask fixed for a whole pass, in the same protocol: what packed
    sequences use (``lmtrain.packing.PackedLayout``, ``lmtrain.tasks.PackedChoices``), nothing cached."""

    def __init__(self, positions: torch.Tensor, mask: torch.Tensor) -> None:
        self.positions, self.mask = positions, mask

    def begin(self, T: int, device) -> torch.Tensor:
        return self.positions

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        return k, v, self.mask, False

    def advance(self, T: int) -> None:
        pass
