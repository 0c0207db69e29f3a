"""Attention as onnxruntime's fused `GroupQueryAttention` (com.microsoft) in the ONNX graph (issue 9).

torch.onnx spells our attention as ~40 nodes per layer: rotary as Split/Neg/Concat/Mul, the cache write
as ScatterElements, scores over every static slot, a Where mask, Softmax. On the real 270M that took
94 of 224 ms of a 128-token prefill (global layers score all 2048 slots), against 25 of 144 ms with one
GroupQueryAttention node per layer, the node onnxruntime-genai's builder emits (docs/onnx.md).
So for the float-compute schemes each layer's attention is swapped, at export only, for one custom op
that the ONNX exporter translates to GroupQueryAttention:
- q and k are normalised (QK-norm, a SimplifiedLayerNormalization) and enter unrotated; the op applies
  rotary itself (`do_rotary`) from cos/sin tables of the bundle's context (one pair per rope base);
- global layers: a full-length cache, past and present bound to one buffer by the runner
  (onnxruntime's `past_present_share_buffer`): the op writes the new positions in place and attends
  only over the filled ones;
- local layers: onnxruntime's windowed cache (`sliding_window_cache`): `window + chunk` rows holding
  the most recent positions contiguously from row 0 (not a ring), evicted by the op in groups of
  chunk + 1 positions (compaction once per chunk + 1 decode steps, not every step); the manifest calls
  this layout "window". Where window + chunk reaches the context, a plain full-length cache.
The graph's inputs and outputs stay the same (tokens, input_pos, caches); the op's sequence lengths are
computed from input_pos inside the graph. fp16 graphs and vision decoders keep the decomposed attention
(fp16 computes its scores in fp32 there; an image's tokens attend to each other both ways, which
GroupQueryAttention's causal mask cannot say).
"""

from __future__ import annotations

import contextlib
import types
from collections.abc import Iterator

import torch
from torch import Tensor, nn

from .. import bundle


@torch.library.custom_op("gemma3_export::group_query_attention", mutates_args=())
def group_query_attention(q: Tensor, k: Tensor, v: Tensor, past_k: Tensor, past_v: Tensor, seqlens_k: Tensor,
                          total: Tensor, cos: Tensor, sin: Tensor, num_heads: int, kv_heads: int, scale: float,
                          window: int, windowed: int) -> tuple[Tensor, Tensor, Tensor]:
    """Stands for onnxruntime's GroupQueryAttention during torch.onnx.export; never run eagerly."""
    raise NotImplementedError("group_query_attention exists only to be exported to ONNX")


@group_query_attention.register_fake
def _(q, k, v, past_k, past_v, seqlens_k, total, cos, sin, num_heads, kv_heads, scale, window, windowed):
    return q.new_empty(q.shape), past_k.new_empty(past_k.shape), past_v.new_empty(past_v.shape)


def _schema():
    """GroupQueryAttention's inputs 0-8 and outputs 0-2 as an onnx OpSchema: onnx does not register
    onnxruntime's contrib ops, and onnxscript needs a schema to emit a node."""
    from onnx.defs import OpSchema

    p = OpSchema.FormalParameter
    names = ["query", "key", "value", "past_key", "past_value", "seqlens_k", "total_sequence_length",
             "cos_cache", "sin_cache"]
    inputs = [p(n, "M" if n in ("seqlens_k", "total_sequence_length") else "T") for n in names]
    ints = ["num_heads", "kv_num_heads", "local_window_size", "do_rotary", "sliding_window_cache"]
    attributes = [OpSchema.Attribute(a, OpSchema.AttrType.INT, "") for a in ints]
    attributes.append(OpSchema.Attribute("scale", OpSchema.AttrType.FLOAT, ""))
    return OpSchema("GroupQueryAttention", "com.microsoft", 1, inputs=inputs,
                    outputs=[p(n, "T") for n in ("output", "present_key", "present_value")],
                    type_constraints=[("T", ["tensor(float)"], ""), ("M", ["tensor(int32)"], "")],
                    attributes=attributes)


def translation_table() -> dict:
    """torch.onnx.export's custom_translation_table entry: our op -> one GroupQueryAttention node."""
    import onnxscript

    op = onnxscript.values.Op(onnxscript.values.Opset("com.microsoft", 1), "GroupQueryAttention", _schema())

    def gqa(q, k, v, past_k, past_v, seqlens_k, total, cos, sin, num_heads: int, kv_heads: int, scale: float,
            window: int, windowed: int):
        return op(q, k, v, past_k, past_v, seqlens_k, total, cos, sin, num_heads=num_heads, kv_num_heads=kv_heads,
                  scale=scale, local_window_size=window, do_rotary=1, sliding_window_cache=windowed)

    return {torch.ops.gemma3_export.group_query_attention.default: gqa}


class GqaCache:
    """A layer's cache at export: the graph input tensors (k, v) and the op's outputs (k_out, v_out)."""

    def __init__(self, slots: int, windowed: bool):
        self.slots, self.windowed = slots, windowed
        self.k = self.v = self.k_out = self.v_out = None


def cache_layout(config, context: int, chunk: int) -> list[dict]:
    """The manifest's `cache`: local layers keep window + chunk rows in onnxruntime's windowed layout
    ("window") where that is below the context, the rest one row per position ("full")."""
    return bundle.cache_layout(config, context, "float32", window_rows=config.sliding_window + chunk)


def resident(tokens: int, rows: int, window: int) -> int:
    """How many positions a windowed cache of `rows` holds after `tokens` (onnxruntime's contract): the
    most recent ones, in rows [0, n); eviction frees rows - window + 1 at a time."""
    if tokens <= rows:
        return tokens
    group = rows - window + 1
    return tokens - group * -(-(tokens - rows) // group)


def rope_tables(rope: nn.Module, context: int) -> tuple[Tensor, Tensor]:
    """cos, sin [context, head_dim / 2] of a RotaryEmbedding (rotate-half: each frequency once)."""
    freqs = torch.arange(context, dtype=torch.float32)[:, None] * rope.inv_freq[None, :]
    return freqs.cos(), freqs.sin()


def _forward(attn: nn.Module, cache: GqaCache, tables: nn.Module, kind: str):
    # local_window_size = W gives Gemma's window (keys p - W + 1 .. p): the parity tests cross W - 1, W, W + 1.
    window = attn.window if attn.window is not None else -1

    def forward(self, x: Tensor, pos: Tensor, rope, input_pos: Tensor, blocks=None) -> Tensor:
        B, T, _ = x.shape
        q = self.q_norm(self.q_proj(x).view(B, T, self.n_heads, self.head_dim)).reshape(B, T, -1)
        k = self.k_norm(self.k_proj(x).view(B, T, self.n_kv, self.head_dim)).reshape(B, T, -1)
        v = self.v_proj(x)
        seqlens_k = (input_pos + (T - 1)).to(torch.int32)  # [1]: the last position written
        total = (input_pos + T).to(torch.int32).reshape(())
        out, cache.k_out, cache.v_out = group_query_attention(
            q, k, v, cache.k, cache.v, seqlens_k, total, getattr(tables, f"cos_{kind}"), getattr(tables, f"sin_{kind}"),
            self.n_heads, self.n_kv, self.scaling, window, int(cache.windowed))
        return self.o_proj(out)

    return types.MethodType(forward, attn)


@contextlib.contextmanager
def fused_attention(model: nn.Module, context: int, chunk: int) -> Iterator[nn.Module]:
    """Give every layer a GqaCache and the GroupQueryAttention forward for the export; yields the module
    holding the rope tables (register it on the exported module so they become initializers)."""
    text = model.model
    tables = nn.Module()
    for kind, rope in (("local", text.rope_local), ("global", text.rope_global)):
        cos, sin = rope_tables(rope, context)
        tables.register_buffer(f"cos_{kind}", cos)
        tables.register_buffer(f"sin_{kind}", sin)
    saved = [(layer.self_attn.cache, layer.self_attn.__dict__.get("forward")) for layer in text.layers]
    for layer, entry in zip(text.layers, cache_layout(model.config, context, chunk)):
        attn = layer.self_attn
        attn.cache = GqaCache(entry["slots"], entry["cache"] == "window")
        attn.forward = _forward(attn, attn.cache, tables, "global" if attn.window is None else "local")
    try:
        yield tables
    finally:
        for layer, (cache, forward) in zip(text.layers, saved):
            layer.self_attn.cache = cache
            del layer.self_attn.forward
            if forward is not None:
                layer.self_attn.forward = forward
