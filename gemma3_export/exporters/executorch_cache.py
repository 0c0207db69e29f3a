"""In-place KV caches and attention for the ExecuTorch program (issue 9): module swaps applied before
torch.export, as ExecuTorch's own `examples/models/llama/source_transformation` does.

Why: lowered, the eager caches (cache.py) write with an out-variant `index_put` that copies the whole
cache and then `copy_` it back into the buffer, and attention broadcasts cache-sized tensors, all in
portable kernels: every decode step moved the whole KV cache several times. ExecuTorch's LLM custom ops
(`executorch.extension.llm.custom_ops`, kernels in the runtime's `custom_ops` library) do neither:
`llama::update_cache` / `llama::update_cache_with_indices` copy the new tokens into the buffer in place,
and `llama::custom_sdpa` attends over the buffer itself (GQA inside, causal up to `start_pos` + T or
under a float mask). Local layers with one kv head (the 270M, 1b) attend under their mask through
batched matmuls and a softmax instead (`masked_attention`), which XNNPACK runs: custom_sdpa's masked path
took 61% of a 128-token prefill (benchmarks/et_profile.py).

The semantics are the eager model's: a local query at p sees p-W+1..p, a global one 0..p, and inside an
image block a query also sees the block's later keys (model.attention_mask, reused here). Differences:
- buffers are `[1, slots, n_kv, head_dim]` (the custom ops' layout), not `[1, n_kv, slots, head_dim]`;
- a local layer's ring has W + C - 1 slots (C: the prefill chunk), not W: the chunk is written BEFORE
  attention, so the ring must still hold the oldest key its first query needs (DESIGN.md allows it);
- masks are float (0 or the dtype's minimum, added to the scores) and built once per call for all
  layers that share a cache shape, not once per layer.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..config import Gemma3Config
from ..model import Attention, Gemma3ForCausalLM, attention_mask, rotate


def load_custom_ops() -> None:
    """Register `llama::*` (their meta functions for export, their kernels for the Python runtime)."""
    from executorch.extension.llm.custom_ops import custom_ops  # noqa: F401


def ring_slots(window: int, chunk: int) -> int:
    """A local layer's ring: W + C - 1 slots keep every key a chunk's first query needs after the write."""
    return window + chunk - 1


class InPlaceKVCache(nn.Module):
    """Full-length cache `[1, slots, n_kv, D]`, written in place at input_pos."""

    def __init__(self, n_kv: int, slots: int, head_dim: int, dtype: torch.dtype = torch.float32):
        super().__init__()
        shape = (1, slots, n_kv, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype), persistent=False)
        self.slots = slots
        self.ring = False

    def update(self, input_pos: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        # input_pos [1]; k, v [1, T, Hkv, D]
        start = input_pos[0].item()
        torch._check(start >= 0)
        torch._check(start + k.shape[1] <= self.slots)
        torch.ops.llama.update_cache(k, self.k, start)
        torch.ops.llama.update_cache(v, self.v, start)
        return self.k, self.v, torch.arange(self.slots, device=k.device)


class InPlaceRingKVCache(InPlaceKVCache):
    """A ring of `slots` >= W + T - 1 entries; position p lives in slot p % slots."""

    def __init__(self, n_kv: int, slots: int, head_dim: int, dtype: torch.dtype = torch.float32):
        super().__init__(n_kv, slots, head_dim, dtype)
        self.ring = True

    def update(self, input_pos: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        s = self.slots
        steps = torch.arange(k.shape[1], device=k.device)
        where = ((input_pos + steps) % s)[None]  # [1, T]
        # start_pos (0) is only range-checked when indices are given
        torch.ops.llama.update_cache_with_indices(k, self.k, 0, where)
        torch.ops.llama.update_cache_with_indices(v, self.v, 0, where)
        # The latest position up to the chunk's last held by each slot (negative: empty). Both operands
        # of % stay non-negative: ExecuTorch's integer remainder follows C semantics (STACK.md).
        last = input_pos + (k.shape[1] - 1)
        slot = torch.arange(s, device=k.device)
        return self.k, self.v, last - (last - slot + s) % s  # [S]


class StepMasks:
    """One float mask per cache shape and call, shared by the layers (the same `pos` object is one call)."""

    def __init__(self):
        self._last: dict[tuple, tuple[Tensor, Tensor]] = {}

    def get(self, key: tuple, pos: Tensor, build) -> Tensor:
        hit = self._last.get(key)
        if hit is None or hit[0] is not pos:
            hit = self._last[key] = (pos, build())
        return hit[1]


class CustomOpAttention(nn.Module):
    """Attention with the same weights and interface as model.Attention, over an in-place cache."""

    def __init__(self, attn: Attention, cache: InPlaceKVCache, masks: StepMasks):
        super().__init__()
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj
        self.q_norm, self.k_norm = attn.q_norm, attn.k_norm
        self.n_heads, self.n_kv, self.head_dim = attn.n_heads, attn.n_kv, attn.head_dim
        self.scaling, self.window = attn.scaling, attn.window
        self.cache, self.masks = cache, masks

    def forward(self, x: Tensor, pos: Tensor, rope: tuple[Tensor, Tensor], input_pos: Tensor,
                blocks: Tensor | None = None) -> Tensor:
        B, T, _ = x.shape
        cos, sin = rope[0][:, None], rope[1][:, None]  # [T, 1, D]: the sequence stays at dim 1
        q = rotate(self.q_norm(self.q_proj(x).view(B, T, self.n_heads, self.head_dim)), cos, sin)  # [B, T, Hq, D]
        k = rotate(self.k_norm(self.k_proj(x).view(B, T, self.n_kv, self.head_dim)), cos, sin)  # [B, T, Hkv, D]
        v = self.v_proj(x).view(B, T, self.n_kv, self.head_dim)
        keys, values, k_pos = self.cache.update(input_pos, k, v)  # [1, S, Hkv, D], [S]
        if self.window is None and blocks is None:  # plain causal: attend to keys 0 .. input_pos + T - 1 only
            start = input_pos[0].item()
            torch._check(start >= 0)
            out = torch.ops.llama.custom_sdpa(q, keys, values, start, None, 0.0, True, self.scaling)
        else:
            key = (self.cache.slots, self.cache.ring, self.window)
            mask = self.masks.get(key, pos, lambda: _float_mask(attention_mask(pos, k_pos, self.window, blocks)))
            if self.n_kv == 1:  # the cache needs no copy to be read as a matrix (270m, 1b)
                out = masked_attention(q, keys, values, mask, self.scaling)
            else:
                out = torch.ops.llama.custom_sdpa(q, keys, values, 0, mask, 0.0, False, self.scaling)
        return self.o_proj(out.flatten(2))  # [B, T, Hq * D] -> [B, T, hidden]


def masked_attention(q: Tensor, keys: Tensor, values: Tensor, mask: Tensor, scale: float) -> Tensor:
    """q [B, T, Hq, D] over one kv head's keys/values [1, S, 1, D] under a float mask [T, S] ->
    [B, T, Hq, D], as batched matmuls, an add and a softmax, which XNNPACK runs: custom_sdpa's masked
    path ran at a third of its unmasked speed (benchmarks/et_profile.py). The cache is read through views
    only (scores come out keys-major, [S, Hq * T], and only they are transposed), so no step copies it."""
    B, T, Hq, D = q.shape
    S = keys.shape[1]
    k, v = keys.view(1, S, D), values.view(1, S, D)
    rows = q.reshape(1, T * Hq, D).transpose(1, 2)  # [1, D, T * Hq]: the queries are small
    scores = torch.bmm(k, rows).transpose(1, 2) * scale  # [1, T * Hq, S]
    probs = (scores.view(T, Hq, S) + mask[:, None, :]).softmax(dim=-1).view(1, T * Hq, S)
    return torch.bmm(probs, v).view(B, T, Hq, D)


def _float_mask(allowed: Tensor) -> Tensor:
    """Boolean [T, S] -> what custom_sdpa adds to the scores: 0 where allowed, float32's minimum elsewhere
    (finite: a block of keys that is all masked cannot turn the online softmax into NaN)."""
    return torch.where(allowed, 0.0, torch.finfo(torch.float32).min)


def _slots(config: Gemma3Config, layer: int, context: int, chunk: int) -> tuple[bool, int]:
    """(ring?, slots) of a layer's cache: a ring where W + C - 1 slots are fewer than the context."""
    ring = config.is_local(layer) and ring_slots(config.sliding_window, chunk) < context
    return ring, ring_slots(config.sliding_window, chunk) if ring else context


def use_custom_ops(model: Gemma3ForCausalLM, context: int, chunk: int) -> None:
    """Swap every layer's attention (and with it its cache) IN PLACE for the custom-op versions."""
    load_custom_ops()
    c, masks = model.config, StepMasks()
    for i, layer in enumerate(model.model.layers):
        ring, slots = _slots(c, i, context, chunk)
        cache = (InPlaceRingKVCache if ring else InPlaceKVCache)(c.num_key_value_heads, slots, c.head_dim)
        layer.self_attn = CustomOpAttention(layer.self_attn, cache, masks)


def cache_layout(config: Gemma3Config, context: int, chunk: int) -> list[dict]:
    """The manifest's `cache` entries for these buffers (the fields of bundle.cache_layout)."""
    layers = []
    for i, kind in enumerate(config.layer_types):
        ring, slots = _slots(config, i, context, chunk)
        layers.append({"layer": i, "type": kind, "window": config.sliding_window if config.is_local(i) else None,
                       "cache": "ring" if ring else "full", "slots": slots,
                       "shape": [1, slots, config.num_key_value_heads, config.head_dim], "dtype": "float32"})
    return layers
