"""Static-shape KV caches: full length for global layers, a ring of `window` slots for local ones.

Both have one method, `update(input_pos, k, v) -> (keys, values, key_pos)`: store the new chunk and
return what the chunk's queries may attend to, with the absolute position of every key (negative for
an empty slot). Masks are derived from those positions inside the graph; there is no mask input.
Exporters that need the cache to cross the graph boundary differently swap `_write` (see export/).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


class KVCache(nn.Module):
    """Global layers: one slot per position up to `max_context`."""

    def __init__(self, n_kv: int, max_context: int, head_dim: int, dtype: torch.dtype = torch.float32):
        super().__init__()
        shape = (1, n_kv, max_context, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype), persistent=False)
        self.slots = max_context
        self.window: int | None = None

    def update(self, input_pos: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        # input_pos [1]; k, v [1, H, T, D]
        pos = input_pos + torch.arange(k.shape[2], device=k.device)  # [T]
        keys, values = self._write(pos, k, v)
        # Slots past the chunk hold stale or empty data; causality masks them.
        return keys, values, torch.arange(self.slots, device=k.device)

    def _write(self, slots: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        self.k[:, :, slots] = k
        self.v[:, :, slots] = v
        return self.k, self.v


class RingKVCache(KVCache):
    """Local layers: a ring of exactly `window` slots; position p lives in slot p % window.

    A chunk's queries attend to the ring as it was before the chunk plus the chunk itself, so a chunk
    of up to `window` tokens never overwrites a key that one of its own queries still needs.
    """

    def __init__(self, n_kv: int, window: int, head_dim: int, dtype: torch.dtype = torch.float32):
        super().__init__(n_kv, window, head_dim, dtype)
        self.window = window

    def update(self, input_pos: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        w = self.window
        steps = torch.arange(k.shape[2], device=k.device)
        new_pos = input_pos + steps  # [T]
        slot = torch.arange(w, device=k.device)
        # The latest position before the chunk held by each slot (negative: empty). Both operands of
        # % stay non-negative: ExecuTorch's integer remainder follows C semantics (STACK.md).
        old_pos = input_pos - 1 - (input_pos - 1 - slot + w) % w  # [W]
        keys = torch.cat([self.k, k], dim=2)  # [1, H, W + T, D]
        values = torch.cat([self.v, v], dim=2)
        self._write(new_pos % w, k, v)
        return keys, values, torch.cat([old_pos, new_pos])
