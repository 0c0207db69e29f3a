"""ONNX exporter: the cached forward with its KV cache as explicit graph inputs and outputs.

The graph (names in the manifest's `inputs` / `outputs`):
    tokens int64[1, T] (T = 1..chunk), input_pos int64[1], k_cache_{i}, v_cache_{i}
    -> logits float32[1, vocab], k_cache_out_{i}, v_cache_out_{i}
Every cache has a static shape: [1, n_kv, max_context, head_dim] on global layers, a ring of
`sliding_window` slots on local ones. The model's caches are swapped for `BoundaryCache`, which runs
the same `update` over tensors that come in as graph inputs and writes out of place, so the updated
cache is a graph output; the runner (runtimes/onnx.py) binds outputs to preallocated buffers.

Schemes (quant.py):
- fp32: float graph; the tied LM head is a `Gemm(transB=1)` on the embedding's own initializer.
- fp16: fp16 weights and matmuls, fp32 norms, residual stream, softmax and mask; fp16 cache. Linear
  inputs are clamped to the fp16 range (Gemma's activations pass 65,504, GEMMA3.md).
- int8 / int4 / int4b32: onnxruntime.quantization's MatMulNBits (symmetric; per channel = one block
  spanning K); int4b32-asym: the layers' weights with a 4-bit zero point per block (`nbits_codes_asym`),
  the tied table symmetric, computing with int8 inputs (accuracy_level 4, ACCURACY_LEVEL below). The head is exported as a separate pre-transposed MatMul so the quantizer sees a
  constant weight (STACK.md); the embedding then gathers from that same packed table through
  GatherBlockQuantized: the tied weight is stored once, quantized.
- fp8: float8e4m3fn initializers with per-output-channel scales through DequantizeLinear; the
  embedding gathers columns of the head's fp8 table.
- gguf: each weight's own GGUF blocks (gguf_grid.py); with `--max-size` the least used rows of the
  tied table are rounded again to int4 (`split_table`): two head tables, the embedding gathers from
  the one that holds each token.
Every scheme: each RMSNorm is one SimplifiedLayerNormalization; MatMulNBits that share an input
(q/k/v, gate/up) are stacked into one node and a Split.
`simulate(model, scheme)` gives the eager model on exactly the artifact's grid, for validate.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import logging
import math
import shutil
import time
import warnings
from collections.abc import Callable, Collection, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import UserError
from ..vocab_rows import split_record, split_rows
from . import onnx_attention
from .onnx_attention import fused_attention, translation_table

OPSET = 21
ARTIFACT, EXTERNAL_DATA = "model.onnx", "model.onnx.data"  # the graph, and every weight over 1 KB (`save`)
# the LM head's MatMulNBits is split into pieces of this many output rows (`split_heads`)
HEAD_PIECE_ROWS = 1 << 16
NBITS = {"int8": (8, None), "int4": (4, None), "int4b32": (4, 32), "int4b32-asym": (4, 32),
         "int4b128": (4, 128)}  # bits, block (None: per channel)
# Layers with an integer zero point per block (the fast kernels' form); the tied table stays symmetric:
# the embedding gathers the head's table, and GatherBlockQuantized takes zero points only as one byte per
# block (MatMulNBits packs two), while an asymmetric table measured no better (docs/quantization.md).
ASYMMETRIC = ("int4b32-asym",)
MATMUL_NBITS = (*NBITS, "gguf")  # gguf: each weight's own GGUF blocks (gguf_grid.py)
# MatMulNBits' accuracy_level: 4 = int8 compute (each linear's input quantized to int8 per weight block,
# as llama.cpp and onnxruntime-genai's builder run int4), 0 = dequantize and compute in fp32. onnxruntime's
# fast CPU kernels are the int8 ones: one decode step of a 640x2048 weight takes 43x longer at level 0 in
# 8 bits (benchmarks/matmulnbits_forms.py), and the real 270M int4b32 decodes 1.4-1.8x slower at level 0
# (docs/onnx.md). Level 4 is the default; gguf always runs at it. `simulate` quantizes the same way.
ACCURACY_LEVEL = 4
ACCURACY_LEVELS = (0, 4)
FP16_MAX = 65504.0
FP8_MAX = 448.0  # float8 e4m3fn


def io_names(n_layers: int) -> tuple[list[str], list[str]]:
    """Graph input and output names, in order."""
    caches = [f"{kv}_cache_{i}" for i in range(n_layers) for kv in "kv"]
    outs = [f"{kv}_cache_out_{i}" for i in range(n_layers) for kv in "kv"]
    return ["tokens", "input_pos", *caches], ["logits", *outs]


# -- the exported module ---------------------------------------------------------------------------


class BoundaryCache(nn.Module):
    """Stands in for a KVCache / RingKVCache at export: the same `update`, over cache tensors that are
    graph inputs (plain attributes, not buffers), written out of place (ScatterElements) so the updated
    cache is a graph output.

    The runner binds each cache output to its input's buffer, and onnxruntime's ScatterElements skips
    its copy when they coincide: the write happens in place. That is safe only if nothing reads the
    input after the write. A global layer reads the written cache (the write comes first by data
    dependency). A ring layer reads the ring as it was before the chunk, so its write takes the old
    ring from the attended copy (`keys[:, :, :W]`), which orders it after the read.
    """

    def __init__(self, cache, dtype: torch.dtype):
        super().__init__()
        self._update = type(cache).update
        self.slots, self.window, self.dtype = cache.slots, cache.window, dtype
        self.k = self.v = self.k_out = self.v_out = None
        self._pending: tuple[Tensor, Tensor, Tensor] | None = None

    def update(self, input_pos: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        keys, values, key_pos = self._update(self, input_pos, k.to(self.dtype), v.to(self.dtype))
        if self.window is not None:  # ring: write after the read (see the class docstring)
            slots, k_new, v_new = self._pending
            self.k_out = _scatter(keys[:, :, : self.slots], slots, k_new)
            self.v_out = _scatter(values[:, :, : self.slots], slots, v_new)
        return keys.to(k.dtype), values.to(v.dtype), key_pos

    def _write(self, slots: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        self._pending = (slots, k, v)
        if self.window is None:  # global: attention reads the written cache
            self.k_out, self.v_out = _scatter(self.k, slots, k), _scatter(self.v, slots, v)
        return self.k_out, self.v_out


def _scatter(cache: Tensor, slots: Tensor, new: Tensor) -> Tensor:
    """cache [1, H, S, D] with new [1, H, T, D] at `slots` [T], out of place."""
    return cache.scatter(2, slots.view(1, 1, -1, 1).expand(new.shape), new)


class OnnxStep(nn.Module):
    """forward(tokens, input_pos, caches) -> (logits [1, V], *updated caches)."""

    def __init__(self, model: nn.Module, separate_head: bool):
        super().__init__()
        self.text = model.model
        self.lm_head = model.lm_head
        # A separate [H, V] copy gives MatMulNBits a constant weight; the tied Gemm does not.
        self.head_t = nn.Parameter(model.lm_head.weight.detach().t().contiguous(), requires_grad=False) if separate_head else None
        self.caches = [layer.self_attn.cache for layer in model.model.layers]

    def forward(self, tokens: Tensor, input_pos: Tensor, caches: list[Tensor]) -> tuple[Tensor, ...]:
        for i, cache in enumerate(self.caches):
            cache.k, cache.v = caches[2 * i], caches[2 * i + 1]
        h = self.text(tokens, input_pos)[:, -1]  # [1, H]
        logits = h @ self.head_t if self.head_t is not None else self.lm_head(h)
        return (logits.float(), *[t for c in self.caches for t in (c.k_out, c.v_out)])


class OnnxMultimodalStep(OnnxStep):
    """forward(tokens, input_pos, caches, image_embeds [1, T, H]) -> as OnnxStep (vision bundles only:
    the rows of image_embeds where tokens hold the image soft token replace those embeddings)."""

    def forward(self, tokens: Tensor, input_pos: Tensor, caches: list[Tensor], image_embeds: Tensor) -> tuple[Tensor, ...]:
        for i, cache in enumerate(self.caches):
            cache.k, cache.v = caches[2 * i], caches[2 * i + 1]
        h = self.text(tokens, input_pos, image_embeds)[:, -1]  # [1, H]
        logits = h @ self.head_t if self.head_t is not None else self.lm_head(h)
        return (logits.float(), *[t for c in self.caches for t in (c.k_out, c.v_out)])


def fused(scheme: str, vision: bool) -> bool:
    """Whether the graph's attention is onnxruntime's GroupQueryAttention (onnx_attention.py): every
    float-compute scheme of a text decoder; fp16 and vision decoders keep the decomposed attention."""
    return scheme != "fp16" and not vision


@contextlib.contextmanager
def boundary_caches(model: nn.Module, context: int, dtype: torch.dtype) -> Iterator[None]:
    """Give the model BoundaryCaches for the export, and its own caches back afterwards."""
    layers = model.model.layers
    saved = [layer.self_attn.cache for layer in layers]
    model.setup_caches(context)
    templates = [layer.self_attn.cache for layer in layers]
    for layer, cache in zip(layers, templates):
        layer.self_attn.cache = BoundaryCache(cache, dtype)
    try:
        yield
    finally:
        for layer, cache in zip(layers, saved):
            layer.self_attn.cache = cache


# -- fp16 --------------------------------------------------------------------------------------


class HalfLinear(nn.Module):
    """fp16 weight and matmul; fp32 in and out, so norms and the residual stream stay fp32."""

    def __init__(self, weight: nn.Parameter):
        super().__init__()
        self.weight = weight  # fp16, possibly shared with HalfEmbedding (tied head)

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x.clamp(-FP16_MAX, FP16_MAX).half(), self.weight).float()


class HalfEmbedding(nn.Module):
    """fp16 table, fp32 rows out."""

    def __init__(self, weight: nn.Parameter):
        super().__init__()
        self.weight = weight

    def forward(self, tokens: Tensor) -> Tensor:
        return F.embedding(tokens, self.weight).float()


def _to_half(model: nn.Module) -> nn.Module:
    """Swap every linear and the embedding for fp16 versions (in place); the head stays tied."""
    table = nn.Parameter(model.model.embed_tokens.weight.detach().half(), requires_grad=False)
    model.model.embed_tokens = HalfEmbedding(table)
    model.lm_head = HalfLinear(table)
    for layer in model.model.layers:
        for parent in (layer.self_attn, layer.mlp):
            for name, child in list(parent.named_children()):
                if isinstance(child, nn.Linear):
                    setattr(parent, name, HalfLinear(nn.Parameter(child.weight.detach().half(), requires_grad=False)))
    return model


# -- the quantization grids, in torch (simulate) ----------------------------------------------------


def block_for(scheme: str, k: int) -> int:
    """The grid's block along K: 32 for int4b32, K itself (one scale per output channel) otherwise."""
    return NBITS[scheme][1] or k


def nbits_scale(blocks: Tensor, bits: int) -> Tensor:
    """MatMulNBits' symmetric scale of each block [..., block] -> [..., 1]: the block's max if |max| > |min|,
    else its min, over -2^(bits-1) (so the extreme weight is exactly a code)."""
    hi, lo = blocks.amax(-1, keepdim=True), blocks.amin(-1, keepdim=True)
    return torch.where(hi.abs() > lo.abs(), hi, lo) / -(2 ** (bits - 1))


def nbits_codes(w: Tensor, bits: int, block: int) -> tuple[Tensor, Tensor]:
    """Symmetric round-to-nearest of w [N, K] in blocks along K, exactly as onnxruntime's MatMulNBits
    quantizer (MLAS `range2scale` + `roundf(x * (1 / scale) + zero_point)`) rounds: the scale is the
    block's max if |max| > |min|, else its min, over -2^(bits-1); codes round half up after the
    zero-point shift, in fp32. Real checkpoints (a GGUF's grid) hit those ties often.
    Returns signed codes [N, nb, block] (K zero-padded) and scales [N, nb, 1]."""
    n, k = w.shape
    nb = -(-k // block)
    wb = F.pad(w.float(), (0, nb * block - k)).view(n, nb, block)
    zero = 2 ** (bits - 1)
    scale = nbits_scale(wb, bits)  # [N, nb, 1]
    t = wb * torch.where(scale == 0, 0, 1.0 / scale) + zero  # fp32, in [0, 2^bits] up to rounding
    t_floor = torch.floor(t)
    q = (t_floor + (t - t_floor >= 0.5)).clamp(0, 2 * zero - 1)  # roundf: half away from 0 (t >= 0)
    return q - zero, scale


def fake_nbits(w: Tensor, bits: int, block: int) -> Tensor:
    """w [N, K] quantized and dequantized on the grid of `nbits_codes`."""
    codes, scale = nbits_codes(w, bits, block)
    return (codes * scale).view(w.shape[0], -1)[:, : w.shape[1]].to(w.dtype)


def nbits_codes_asym(w: Tensor, bits: int, block: int) -> tuple[Tensor, Tensor, Tensor]:
    """Asymmetric round-to-nearest of w [N, K] (K a multiple of `block`): per block, the range from
    min(w, 0) to max(w, 0) in 2^bits - 1 steps and an integer zero point, as MatMulNBits' uint8 zero
    points hold it. Returns codes u [N, nb, block] in 0..2^bits-1, scales and zero points [N, nb, 1]."""
    top = 2**bits - 1
    wb = w.float().unflatten(-1, (-1, block))
    lo, hi = wb.amin(-1, keepdim=True).clamp(max=0), wb.amax(-1, keepdim=True).clamp(min=0)
    scale = (hi - lo) / top
    inv = torch.where(scale == 0, 0, 1 / scale)
    zero = torch.round(-lo * inv).clamp(0, top)
    return torch.round(wb * inv + zero).clamp(0, top), scale, zero


def fake_nbits_asym(w: Tensor, bits: int, block: int) -> Tensor:
    """w [N, K] quantized and dequantized on the grid of `nbits_codes_asym`."""
    u, scale, zero = nbits_codes_asym(w, bits, block)
    return ((u - zero) * scale).flatten(-2).to(w.dtype)


def fp8_codes(w: Tensor) -> tuple[Tensor, Tensor]:
    """Per-row e4m3 codes and scales of w [N, K]: (codes float8 [N, K], scale float32 [N])."""
    amax = w.float().abs().amax(-1)
    scale = torch.where(amax == 0, 1.0, amax / FP8_MAX)
    return (w.float() / scale[:, None]).to(torch.float8_e4m3fn), scale


def fake_int8_blocks(x: Tensor, block: int) -> Tensor:
    """x [..., K] quantized and dequantized as MatMulNBits with accuracy_level=4 quantizes its input:
    symmetric int8 per block of the weight's block along K, scale = the block's absmax / 127."""
    blocks = x.float().unflatten(-1, (-1, block))
    scale = blocks.abs().amax(-1, keepdim=True) / 127
    q = torch.round(blocks / torch.where(scale == 0, 1, scale))
    return (q * scale).flatten(-2).to(x.dtype)


def _int8_activations(block: int) -> Callable:
    return lambda module, args: (fake_int8_blocks(args[0], block), *args[1:])


def fake_fp8(w: Tensor) -> Tensor:
    codes, scale = fp8_codes(w)
    return (codes.float() * scale[:, None]).to(w.dtype)


class SplitHead(nn.Module):
    """The tied head of a table split by rows (`split_table`): the int4 rows see the input quantized per
    block of SPLIT_BLOCK, the kept rows per their own block, as their two MatMulNBits quantize it."""

    def __init__(self, weight: nn.Parameter, int4_rows: Tensor, kept_block: int):
        super().__init__()
        self.weight, self.kept_block = weight, kept_block
        self.register_buffer("int4_rows", int4_rows, persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        out = F.linear(fake_int8_blocks(x, self.kept_block), self.weight)
        out[..., self.int4_rows] = F.linear(fake_int8_blocks(x, SPLIT_BLOCK), self.weight[self.int4_rows])
        return out


def simulate(model: nn.Module, scheme: str, grid=None, accuracy_level: int = ACCURACY_LEVEL,
             int4_rows: np.ndarray | None = None, raised: Collection[str] = ()) -> nn.Module:
    """A copy of the eager model on the artifact's grid: weights quantized and dequantized exactly as
    the ONNX export stores them (fp16: the same fp16 modules). A QAT checkpoint's weights already lie
    on the grid the export imports: they stay as they are. MatMulNBits schemes at `accuracy_level` 4
    also quantize each linear's input as onnxruntime does (`fake_int8_blocks`, per weight block).
    `int4_rows` (gguf, `--max-size`): those rows of the tied table rounded again to int4 (`split_table`).
    `raised` (int4b32 schemes, `--max-size`): matrices stored as int8 blocks of 32 (`mixed_packs`)."""
    sim = copy.deepcopy(model)
    if scheme == "gguf":  # the GGUF's blocks as stored; what has no MatMulNBits form is rounded to int8
        with torch.no_grad():
            blocks = {}
            for name, param in sim.named_parameters():
                if param.dim() == 2 and (name not in grid or gguf_requantized(name, grid[name])):
                    param.copy_(fake_nbits(param, 8, param.shape[1]))
                    blocks[name] = math.gcd(param.shape[1], 128)  # `_signed`'s per-channel blocks
                elif param.dim() == 2:  # the stored grid (Q4_K's offsets rounded to its 8-bit step)
                    param.copy_(torch.from_numpy(grid[name].dequantize()))
                    blocks[name] = grid[name].block
            if int4_rows is not None and len(int4_rows):
                table, rows = sim.model.embed_tokens.weight, torch.as_tensor(np.asarray(int4_rows), dtype=torch.long)
                table[rows] = fake_nbits(table[rows], 4, SPLIT_BLOCK)
                sim.lm_head = SplitHead(table, rows, blocks["model.embed_tokens.weight"])
        for name, module in sim.named_modules():
            if isinstance(module, nn.Linear):
                key = "model.embed_tokens.weight" if module.weight is sim.model.embed_tokens.weight else f"{name}.weight"
                module.register_forward_pre_hook(_int8_activations(blocks[key]))
        return sim
    if scheme == "fp16":
        return _to_half(sim)
    fake = None  # fake(name, w): the stored grid of matrix `name`
    if scheme == "fp8":
        fake = lambda name, w: fake_fp8(w)  # noqa: E731
    elif scheme in MIX_SCHEMES:
        low = fake_low(scheme)
        fake = lambda name, w: fake_nbits(w, *HIGH) if name in raised else low(name, w)  # noqa: E731
    elif scheme in NBITS:
        bits = NBITS[scheme][0]
        fake = lambda name, w: fake_nbits(w, bits, block_for(scheme, w.shape[1]))  # noqa: E731
    if fake is not None and grid is None:
        with torch.no_grad():
            for name, w in sim.named_parameters():  # every linear; the tied table once
                if w.dim() == 2:
                    w.copy_(fake(name, w))
            if scheme in MIX_SCHEMES and int4_rows is not None and len(int4_rows):  # a table split by rows
                table, rows = sim.model.embed_tokens.weight, torch.as_tensor(np.asarray(int4_rows), dtype=torch.long)
                table[rows] = fake_nbits(table[rows], 4, SPLIT_BLOCK)  # both parts see blocks of 32: no SplitHead
    if scheme in NBITS and accuracy_level == 4:
        for module in sim.modules():
            if isinstance(module, nn.Linear):
                k = module.weight.shape[1]
                module.register_forward_pre_hook(_int8_activations(NBITS[scheme][1] or math.gcd(k, 128)))
    return sim


# -- export ---------------------------------------------------------------------------------------


def export(model: nn.Module, folder: Path, spec, log=print, accuracy_level: int | None = None) -> dict:
    """Write model.onnx and model.onnx.data (`save`) into `folder`; return manifest fields.
    `accuracy_level` (MatMulNBits: 4 = int8 compute, 0 = fp32) applies to int8/int4/int4b32 (default
    ACCURACY_LEVEL); gguf always runs at ACCURACY_LEVEL."""
    import onnx

    scheme = spec.scheme.name
    if accuracy_level is not None and scheme not in MATMUL_NBITS:
        raise UserError(f"accuracy_level applies to {', '.join(MATMUL_NBITS)}, not {scheme}.")
    if accuracy_level not in (None, *ACCURACY_LEVELS):
        raise UserError(f"accuracy_level is one of {', '.join(map(str, ACCURACY_LEVELS))}, not {accuracy_level}.")
    if scheme == "gguf" or (scheme in MATMUL_NBITS and accuracy_level is None):
        accuracy_level = ACCURACY_LEVEL
    if scheme == "int4b128":  # whole blocks only (every Gemma 3 size has them; int8 inputs are rounded per block)
        from ..gptq import check_shapes

        check_shapes(model, scheme)
    config = model.config
    start = time.perf_counter()
    proto = _torch_export(model, spec, scheme)
    log(f"  torch.onnx.export: {len(proto.graph.node)} nodes in {time.perf_counter() - start:.1f} s")
    codes, pack, tensors = None, None, None
    if scheme == "gguf":
        pack, tensors = gguf_packs(model, spec.grid)
        for name, fate in tensors.items():  # never silently: each tensor rounded again, said as it happens
            if "re-quantized" in fate:
                log(f"  notice: {name}: {fate}")
    elif spec.grid is not None:
        codes = grid_codes(model, spec.grid)
        pack = (lambda w: _signed(NBITS[scheme][0], *codes(w))) if scheme in NBITS else None  # noqa: E731
    split: dict = {}
    table_rows = _rows_within(spec.max_size, spec.table_order, split, log) if spec.max_size and scheme == "gguf" else None
    if scheme in MIX_SCHEMES and spec.grid is None and (spec.max_size or scheme in ASYMMETRIC):
        pack, tensors, int4_rows = mixed_packs(model, proto, spec, accuracy_level, log)
        if int4_rows is not None:
            split.update(split_record(spec.max_size, int4_rows, model.config.vocab_size, SPLIT_BLOCK))
            table_rows = lambda graph: int4_rows  # noqa: E731
    if scheme in MATMUL_NBITS:
        start = time.perf_counter()
        proto = quantize_nbits(proto, scheme, accuracy_level, pack, table_rows)
        how = (" (the GGUF's blocks, as they are)" if scheme == "gguf" else " (the QAT grid, as it is)" if spec.grid
               else " (--max-size's mix)" if spec.max_size else "")
        log(f"  MatMulNBits {scheme}{how}: {time.perf_counter() - start:.1f} s")
    elif scheme == "fp8":
        proto = quantize_fp8(proto, codes)
        log(f"  fp8 weights through DequantizeLinear{' (the QAT grid, as it is)' if codes else ''}")
    weight_bytes = sum(_tensor_bytes(t) for t in proto.graph.initializer)
    layout = save(proto, folder)
    size = sum(f.stat().st_size for f in (folder / ARTIFACT, folder / EXTERNAL_DATA) if f.exists())
    if spec.max_size and size > spec.max_size:
        raise RuntimeError(f"the artifact is {size} bytes, over --max-size {spec.max_size}: the estimate is wrong")
    if spec.max_size:
        log(f"  artifact {size / 1e6:.1f} MB (--max-size {spec.max_size / 1e6:g} MB)")
    if split:
        split["ranking"] = spec.table_ranking
        embed = "model.embed_tokens.weight"
        if tensors and embed in tensors:
            tensors[embed] += (f"; its {split['int4_rows']} least used of {split['rows']} rows re-quantized to int4 "
                               f"block {SPLIT_BLOCK} (--max-size)")
    inputs, outputs = _describe(proto)
    cache_dtype = "float16" if scheme == "fp16" else "float32"
    gqa = fused(scheme, getattr(spec, "vision", None) is not None)
    return {
        **({"cache": onnx_attention.cache_layout(config, spec.context, spec.chunk)} if gqa else {}),
        "artifact": ARTIFACT,
        "inputs": inputs,
        "outputs": outputs,
        "cache_dtype": cache_dtype,
        "prefill_chunks": list(range(1, spec.chunk + 1)),
        "target_info": {
            "opset": OPSET,
            "external_data": EXTERNAL_DATA,
            "weight_bytes": weight_bytes,
            **layout,
            "accuracy_level": accuracy_level,
            "tied_head": "Gemm on the embedding table" if scheme in ("fp32", "fp16")
            else "one quantized table for the head MatMul and the embedding gather",
            "cache_io": "k_cache_{i}/v_cache_{i} in, k_cache_out_{i}/v_cache_out_{i} out, same shapes",
            "attention": ("GroupQueryAttention (com.microsoft): rotary inside, caches shared past/present, local "
                          "layers in onnxruntime's windowed layout of window + chunk rows"
                          if gqa else "decomposed (MatMul, mask, Softmax; ScatterElements cache writes, local rings)"),
            "layers": config.num_hidden_layers,
            **({"tensors": tensors} if tensors else {}),
            **({"table_split": split} if split else {}),
            **({"mix": mix_record(tensors, spec)} if spec.max_size and scheme in MIX_SCHEMES else {}),
        },
    }


def _torch_export(model: nn.Module, spec, scheme: str):
    """torch.onnx.export (dynamo) of the cached step; returns the ModelProto (float weights)."""
    if scheme == "fp16":
        model = _to_half(copy.deepcopy(model))
    dtype = torch.float16 if scheme == "fp16" else torch.float32
    n = model.config.num_hidden_layers
    in_names, out_names = io_names(n)
    vision = getattr(spec, "vision", None) is not None  # the decoder of a vision bundle
    caches = fused_attention(model, spec.context, spec.chunk) if fused(scheme, vision) else boundary_caches(model, spec.context, dtype)
    with caches as rope_tables, torch.no_grad(), _quiet():
        step = (OnnxMultimodalStep if vision else OnnxStep)(model, separate_head=scheme in MATMUL_NBITS or scheme == "fp8").eval()
        if rope_tables is not None:
            step.rope = rope_tables  # their cos/sin become initializers
        caches = [torch.zeros(s, dtype=dtype) for c in step.caches for s in (_shape(model, c), _shape(model, c))]
        tokens = torch.zeros(1, min(2, spec.chunk), dtype=torch.long)
        t_dim = {1: torch.export.Dim("T", min=1, max=spec.chunk)} if spec.chunk > 1 else None
        dims = {"tokens": t_dim, "input_pos": None, "caches": [None] * len(caches)}
        args = (tokens, torch.tensor([0]), caches)
        if vision:
            args += (torch.zeros(1, tokens.shape[1], model.config.hidden_size),)
            dims["image_embeds"] = t_dim
            in_names = [*in_names, "image_embeds"]
        program = torch.onnx.export(
            step, args, dynamic_shapes=dims, input_names=in_names,
            output_names=out_names, dynamo=True, opset_version=OPSET, optimize=True, verbose=False,
            custom_translation_table=translation_table(),
        )
        proto = program.model_proto
    for value in proto.graph.input:  # the exporter names the dynamic axis after a symbol
        if value.name in ("tokens", "image_embeds") and spec.chunk > 1:
            value.type.tensor_type.shape.dim[1].dim_param = "T"
    _name_nodes(proto.graph)
    _fuse_rms_norms(proto)
    return proto


def _fuse_rms_norms(proto) -> None:
    """Each RMSNorm as torch.onnx spells it (Pow, ReduceMean, Add eps, Sqrt, Reciprocal, Mul x, Mul by
    the constant 1 + w) -> one SimplifiedLayerNormalization, in place, by onnxruntime.transformers' own
    fusion (onnxruntime's session optimizer matches only the Div spelling)."""
    from onnxruntime.transformers.fusion_simplified_layernorm import FusionSimplifiedLayerNormalization
    from onnxruntime.transformers.onnx_model import OnnxModel

    with _quiet():
        FusionSimplifiedLayerNormalization(OnnxModel(proto)).apply()


def _shape(model: nn.Module, cache: BoundaryCache) -> tuple[int, ...]:
    c = model.config
    return (1, c.num_key_value_heads, cache.slots, c.head_dim)


_NOISY = ("torch.onnx", "onnxscript", "onnx_ir", "onnxruntime.quantization")


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """The exporters' and quantizer's info logs and warnings are noise for the user."""
    loggers = [logging.getLogger(name) for name in _NOISY]
    levels = [log.level for log in loggers]
    for log in loggers:
        log.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for log, level in zip(loggers, levels):
            log.setLevel(level)


# -- the saved layout: weights in a data file onnxruntime maps -------------------------------------


def save(proto, folder: Path, piece_rows: int = HEAD_PIECE_ROWS) -> dict:
    """Write model.onnx (the graph) and model.onnx.data (every weight over 1 KB, in order, unpadded).
    onnxruntime maps the data file rather than reading it, one mapping per initializer, and drops a
    weight's mapping once a kernel has packed it (MatMulNBits, Gemm) and nothing else reads it. Two
    rewrites of the saved graph make that keep the tied table out of resident memory without storing
    it twice (docs/onnx.md, "Memory"): the embedding's gather reads the table through initializers of
    its own over the same bytes (`alias_gathered_tables`), so only the rows it looks up are ever
    paged in; and the head is split by rows (`split_heads`), so each piece's mapping is dropped right
    after it is packed and loading never holds the whole stored table beside its packed copy.
    Returns the manifest's record of both."""
    import onnx

    onnx.save_model(proto, folder / ARTIFACT, save_as_external_data=True, all_tensors_to_one_file=True,
                    location=EXTERNAL_DATA, size_threshold=1024)
    model = onnx.load(str(folder / ARTIFACT), load_external_data=False)
    gathered = alias_gathered_tables(model.graph)
    pieces = split_heads(model.graph, piece_rows)
    onnx.save_model(model, folder / ARTIFACT)  # the graph alone: its tensors keep their places in the data file
    shutil.copymode(folder / ARTIFACT, folder / EXTERNAL_DATA)  # onnx creates the data file owner-only
    return {"gathered_tables": gathered, "head_pieces": pieces}


def _external(t) -> dict | None:
    import onnx

    if t.data_location != onnx.TensorProto.EXTERNAL:
        return None
    return {e.key: e.value for e in t.external_data}


def _alias(graph, t, name: str, dims: list[int], start: int = 0, length: int | None = None):
    """A new initializer `name` over bytes [start, start + length) of external initializer `t`'s data."""
    import onnx

    ext = _external(t)
    alias = onnx.TensorProto(name=name, data_type=t.data_type, dims=dims, data_location=onnx.TensorProto.EXTERNAL)
    length = int(ext["length"]) - start if length is None else length
    for key, value in (("location", ext["location"]), ("offset", str(int(ext.get("offset", 0)) + start)),
                       ("length", str(length))):
        alias.external_data.add(key=key, value=value)
    graph.initializer.append(alias)
    return alias


def alias_gathered_tables(graph) -> list[str]:
    """Each Gather / GatherBlockQuantized that reads a stored table another node also reads (the tied
    embedding / LM head) reads it through an alias: an initializer of its own over the same bytes of
    the data file. A stored tensor reshaped for the gather (the head's scales, [V, k_blocks] ->
    [V, k_blocks, 1]) becomes an alias of that shape and the Reshape goes. Returns the tables aliased."""
    from onnx import numpy_helper

    inits = _initializers(graph)
    producer = {out: node for node in graph.node for out in node.output}
    readers: dict[str, int] = {}
    for node in graph.node:
        for name in node.input:
            readers[name] = readers.get(name, 0) + 1
    aliased, reshapes = [], []
    for node in [n for n in graph.node if n.op_type in ("Gather", "GatherBlockQuantized")]:
        data_inputs = (0, 2, 3) if node.op_type == "GatherBlockQuantized" else (0,)
        for i in (i for i in data_inputs if i < len(node.input) and node.input[i]):
            name, source, dims = node.input[i], None, None
            if name in inits and _external(inits[name]) and readers[name] > 1:
                source, dims = inits[name], list(inits[name].dims)
            elif name in producer and producer[name].op_type == "Reshape":
                data, shape = producer[name].input[:2]
                if data in inits and _external(inits[data]) and shape in inits:
                    source, dims = inits[data], numpy_helper.to_array(inits[shape]).tolist()
                    if -1 in dims:
                        dims[dims.index(-1)] = -math.prod(source.dims) // math.prod(dims)
                    reshapes.append(producer[name])
            if source is None:
                continue
            node.input[i] = _alias(graph, source, f"{source.name}_gathered", dims).name
            aliased.append(source.name)
    read = {name for node in graph.node for name in node.input} | {o.name for o in graph.output}
    for node in reshapes:
        if node.output[0] not in read:  # the gather was its only reader
            graph.node.remove(node)
    _drop_unused_initializers(graph)
    return aliased


def split_heads(graph, rows: int) -> int:
    """Each LM head MatMulNBits (`_heads`) over more than `rows` output rows (the 270M's: 262,144)
    becomes pieces of `rows` rows over their own slices of the data file, and a Concat of their
    outputs. (The layers' matrices are small enough to pack whole: 4,096 rows on the 270M.) Every stored
    input of MatMulNBits but A (B, scales, zero points, bias) is laid out by output row, so a piece's
    slice is contiguous. Returns the number of pieces written (0: nothing split)."""
    from onnx import helper

    inits = _initializers(graph)
    written = 0
    for node in _heads(graph):
        attrs = _attrs(node)
        n = attrs["N"]
        stored = [inits.get(name) for name in node.input[1:]]
        if n <= rows or stored[0] is None or any(t is not None and not _external(t) for t in stored) or (
                len(node.input) > 4 and node.input[4]):  # g_idx is laid out by input, not output, row
            continue
        pieces, outputs = [], []
        for p, first in enumerate(range(0, n, rows)):
            count = min(rows, n - first)
            inputs = [node.input[0]]
            for name, t in zip(node.input[1:], stored):
                if t is None:
                    inputs.append(name)
                    continue
                per_row = int(_external(t)["length"]) // n
                dims = [count, *t.dims[1:]] if len(t.dims) > 1 else [t.dims[0] // n * count]
                inputs.append(_alias(graph, t, f"{name}_rows{p}", dims, first * per_row, count * per_row).name)
            outputs.append(f"{node.output[0]}_rows{p}")
            pieces.append(helper.make_node("MatMulNBits", inputs, [outputs[-1]], name=f"{node.name}_rows{p}",
                                           domain="com.microsoft", **{**attrs, "N": count}))
        _replace_node(graph, node, [*pieces, helper.make_node("Concat", outputs, [node.output[0]],
                                                              name=f"{node.name}_concat", axis=-1)])
        written += len(pieces)
    _drop_unused_initializers(graph)
    return written


def _name_nodes(graph) -> None:
    for i, node in enumerate(graph.node):
        if not node.name:
            node.name = f"{node.op_type}_{i}"


def _tensor_bytes(t) -> int:
    import onnx

    if t.data_location == onnx.TensorProto.EXTERNAL:
        return next(int(e.value) for e in t.external_data if e.key == "length")
    return len(t.raw_data) if t.raw_data else onnx.numpy_helper.to_array(t).nbytes


def _describe(proto) -> tuple[list[dict], list[dict]]:
    import onnx

    def one(v) -> dict:
        t = v.type.tensor_type
        return {
            "name": v.name,
            "shape": [d.dim_param or d.dim_value for d in t.shape.dim],
            "dtype": onnx.helper.tensor_dtype_to_np_dtype(t.elem_type).name,
        }

    return [one(v) for v in proto.graph.input], [one(v) for v in proto.graph.output]


# -- graph passes ---------------------------------------------------------------------------------


def _initializers(graph) -> dict:
    return {t.name: t for t in graph.initializer}


def _embedding_gather(graph):
    """The Gather that looks up the token embeddings (data: the [V, H] table initializer)."""
    inits = _initializers(graph)
    gathers = [n for n in graph.node if n.op_type == "Gather" and n.input[0] in inits and len(inits[n.input[0]].dims) == 2]
    if len(gathers) != 1:
        raise RuntimeError(f"expected one embedding Gather, found {len(gathers)}")
    return gathers[0]


def _replace_node(graph, old, new_nodes: list) -> None:
    nodes = list(graph.node)
    i = nodes.index(old)
    graph.ClearField("node")
    graph.node.extend(nodes[:i] + new_nodes + nodes[i + 1 :])


def _drop_unused_initializers(graph) -> None:
    """In place: rebuilding the list would copy every kept weight (4 GB of float graph on the 1b)."""
    used = {name for node in graph.node for name in node.input}
    for i in reversed(range(len(graph.initializer))):
        if graph.initializer[i].name not in used:
            del graph.initializer[i]


def quantize_nbits(proto, scheme: str, accuracy_level: int | None = None, pack: Callable | None = None,
                   table_rows: Callable | None = None):
    """Every constant MatMul -> MatMulNBits, then the embedding Gather -> GatherBlockQuantized over the
    head's packed table. Blocks of 32: onnxruntime.quantization's MatMulNBitsQuantizer. Per channel:
    its quantizer takes blocks of at most 256, so the per-channel codes are packed here into the same
    MatMulNBits layout, in blocks of 128 that repeat the channel's scale. `pack(w)` (a QAT grid or a
    GGUF's blocks) gives each weight's codes and scales instead of rounding. `table_rows(graph)`, given
    the packed graph, names the head table's rows to round to int4 (`split_table`), if any."""
    import onnx

    bits, block = NBITS.get(scheme, (None, None))
    if pack is not None:
        _pack_nbits(proto.graph, accuracy_level, pack)
    elif scheme in ASYMMETRIC:
        _pack_nbits(proto.graph, accuracy_level, int4_pack(scheme, table=False), head_pack=int4_pack(scheme, table=True))
    elif block:
        from onnxruntime.quantization.matmul_nbits_quantizer import DefaultWeightOnlyQuantConfig, MatMulNBitsQuantizer

        config = DefaultWeightOnlyQuantConfig(block_size=block, is_symmetric=True, bits=bits, accuracy_level=accuracy_level)
        with _quiet():
            quantizer = MatMulNBitsQuantizer(proto, algo_config=config)
            quantizer.process()
        proto = quantizer.model.model
    else:
        _pack_nbits(proto.graph, accuracy_level, lambda w: _signed(bits, *_round_per_channel(w, bits)))
    if not any(o.domain == "com.microsoft" for o in proto.opset_import):
        proto.opset_import.append(onnx.helper.make_opsetid("com.microsoft", 1))
    rows = table_rows(proto.graph) if table_rows is not None else None
    if rows is not None and len(rows):
        split_table(proto.graph, rows)
    _share_embedding_nbits(proto.graph)
    _fuse_sibling_nbits(proto.graph)
    return proto


def _fuse_sibling_nbits(graph) -> int:
    """MatMulNBits nodes that read the same input with the same format (q/k/v, gate/up) -> one node
    over their weights stacked along N, then a Split: one kernel call instead of three per decode step.
    Rows are quantized independently, so the stacked tables are exactly the separate ones. Returns
    how many nodes were merged away."""
    from onnx import helper, numpy_helper

    inits = _initializers(graph)
    heads = {n.name for n in _heads(graph)}
    groups: dict[tuple, list] = {}
    for node in graph.node:
        if node.op_type == "MatMulNBits" and node.name not in heads and all(i in inits for i in node.input[1:]):
            fmt = tuple(sorted((k, v) for k, v in _attrs(node).items() if k != "N"))
            groups.setdefault((node.input[0], len(node.input), fmt), []).append(node)
    merged, replace = 0, {}
    for (x, _, _), nodes in groups.items():
        if len(nodes) < 2:
            continue
        name = f"{nodes[0].name}_fused"
        n_of = [_attrs(n)["N"] for n in nodes]
        stacked = []
        for slot in range(1, len(nodes[0].input)):
            parts = [numpy_helper.to_array(inits[n.input[slot]]) for n in nodes]
            if parts[0].ndim == 1:  # zero points, flat: [N * blocks] per node
                parts = [p.reshape(k, -1) for p, k in zip(parts, n_of)]
            t = np.concatenate(parts, 0)
            stacked.append(f"{name}_{slot}")
            graph.initializer.append(numpy_helper.from_array(t.reshape(-1) if slot == 3 else t, stacked[-1]))
        extra = {k: v for k, v in _attrs(nodes[0]).items() if k != "N"}
        fused = helper.make_node("MatMulNBits", [x, *stacked], [f"{name}_out"], name=name, domain="com.microsoft",
                                 N=sum(n_of), **extra)
        graph.initializer.append(numpy_helper.from_array(np.array(n_of, np.int64), f"{name}_split"))
        split = helper.make_node("Split", [f"{name}_out", f"{name}_split"], [n.output[0] for n in nodes],
                                 name=f"{name}_split", axis=-1)
        replace[id(nodes[0])] = [fused, split]
        replace.update({id(n): [] for n in nodes[1:]})
        merged += len(nodes) - 1
    nodes = [new for n in graph.node for new in replace.get(id(n), [n])]
    graph.ClearField("node")
    graph.node.extend(nodes)
    _drop_unused_initializers(graph)
    return merged


def _blocks_of(codes_scales: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
    """`nbits_codes`' [N, nb, block] codes and [N, nb, 1] scales as [N, K] and [N, nb] (K a multiple of block)."""
    codes, scale = codes_scales
    return codes.flatten(-2), scale[..., 0]


def _round_per_channel(w: Tensor, bits: int) -> tuple[Tensor, Tensor]:
    codes, scale = nbits_codes(w, bits, w.shape[1])  # [N, 1, K], [N, 1, 1]
    return codes.view(w.shape), scale.view(-1, 1)


@dataclass
class Packed:
    """One MatMulNBits weight: w[n, k] = (u[n, k] - zero_point) * scale, per block of K."""

    u: np.ndarray  # uint8 [N, K]
    scales: np.ndarray  # float32 [N, K / block]
    zero_points: np.ndarray | None  # uint8 [N, K / block]; None: the default 2^(bits-1)
    bits: int
    block: int


def _signed(bits: int, codes: Tensor, scale: Tensor) -> Packed:
    """Symmetric signed codes [N, K] and scales [N, K / block] (one column: per channel, stored in
    blocks of 128 that repeat the channel's scale)."""
    n, k = codes.shape
    block = math.gcd(k, 128) if scale.shape[1] == 1 else k // scale.shape[1]
    scales = scale.float().expand(n, k // block)
    u = (codes.to(torch.int16) + 2 ** (bits - 1)).to(torch.uint8)
    return Packed(u.numpy(), scales.contiguous().numpy(), None, bits, block)


def _pack_nbits(graph, accuracy_level: int | None, pack_of: Callable[[Tensor], Packed],
                head_pack: Callable[[Tensor], Packed] | None = None) -> None:
    """Every constant MatMul -> MatMulNBits holding `pack_of(w [N, K])` (the LM head: `head_pack`'s, if given)."""
    from onnx import helper, numpy_helper

    inits = _initializers(graph)
    nodes = []
    for node in graph.node:
        if node.op_type != "MatMul" or node.input[1] not in inits:
            nodes.append(node)
            continue
        b = inits[node.input[1]]
        k, n = b.dims
        w = torch.from_numpy(numpy_helper.to_array(b).T.copy())  # [N, K]
        p = head_pack(w) if head_pack is not None and b.name.startswith("head_t") else pack_of(w)
        bits, block = p.bits, p.block
        if block < 16 or block & (block - 1) or k % block:
            raise RuntimeError(f"K={k} has no MatMulNBits block (16..128) for these scales")
        u = p.u
        if bits == 4:
            u = u[:, 0::2] | (u[:, 1::2] << 4)  # two codes per byte, low nibble first
        names = [f"{b.name}_Q{bits}", f"{b.name}_scales"]
        graph.initializer.extend([numpy_helper.from_array(np.ascontiguousarray(u.reshape(n, k // block, -1)), names[0]),
                                  numpy_helper.from_array(np.ascontiguousarray(p.scales, np.float32), names[1])])
        if p.zero_points is not None:  # onnxruntime's fast CPU kernels: integer zero points (uint8)
            if p.zero_points.dtype != np.uint8:
                raise RuntimeError("zero points are uint8 here")
            zp = p.zero_points
            if bits == 4:  # two per byte, low nibble first, each row padded to whole bytes
                zp = np.pad(zp, ((0, 0), (0, zp.shape[1] % 2)))
                zp = zp[:, 0::2] | (zp[:, 1::2] << 4)
            names.append(f"{b.name}_zero_points")
            graph.initializer.append(numpy_helper.from_array(np.ascontiguousarray(zp).reshape(-1), names[2]))
        extra = {"accuracy_level": accuracy_level} if accuracy_level else {}
        nodes.append(helper.make_node("MatMulNBits", [node.input[0], *names], list(node.output),
                                      name=f"{node.name}_Q{bits}", domain="com.microsoft",
                                      K=k, N=n, bits=bits, block_size=block, **extra))
    graph.ClearField("node")
    graph.node.extend(nodes)
    _drop_unused_initializers(graph)


def by_content(model: nn.Module) -> Callable[[Tensor], str]:
    """The Hugging Face name of a graph weight, found by its values (the graph's initializer names are
    the exporter's; the head is the tied embedding)."""
    names = {}
    for name, param in model.named_parameters(remove_duplicate=True):
        if param.dim() == 2:
            names[hashlib.sha256(param.detach().float().contiguous().numpy().tobytes()).hexdigest()] = name

    def name_of(w: Tensor) -> str:
        name = names.get(hashlib.sha256(w.float().contiguous().numpy().tobytes()).hexdigest())
        if name is None:
            raise RuntimeError("a weight of the exported graph is not one of the model's")
        return name

    return name_of


def gguf_requantized(name: str, g) -> str | None:
    """Why `--quant gguf` rounds this GGUF tensor again (int8 per channel), or None: it is kept."""
    if isinstance(g, str):
        return f"{g} has no MatMulNBits form"
    if name == "model.embed_tokens.weight" and g.zero_points is not None:
        return "the embedding gathers the head's table without zero points (GatherBlockQuantized)"
    return None


def gguf_packs(model: nn.Module, grid: dict) -> tuple[Callable[[Tensor], Packed], dict[str, str]]:
    """`pack_of(w)` for `--quant gguf`: each weight's own GGUF blocks (gguf_grid.py) where MatMulNBits
    holds them, int8 per channel otherwise; and what happened to each tensor, for the manifest."""
    name_of, report = by_content(model), {}
    for name, g in grid.items():
        why = gguf_requantized(name, g)
        report[name] = f"{getattr(g, 'source', g)} -> int8 per channel, re-quantized ({why})" if why else g.describe()

    def pack_of(w: Tensor) -> Packed:
        name = name_of(w)
        g = grid.get(name)
        if g is None or gguf_requantized(name, g):
            return _signed(8, *_round_per_channel(w, 8))
        return Packed(g.u, g.scales, g.zero_points, g.bits, g.block)

    return pack_of, report


def grid_codes(model: nn.Module, grid) -> Callable:
    """`codes_of(w)` for a QAT checkpoint: the trained codes and scales of the graph weight w (the
    checkpoint's weights are exactly the dequantized grid; `by_content` finds the name)."""
    name_of = by_content(model)

    def codes_of(w: Tensor) -> tuple[Tensor, Tensor]:
        name = name_of(w)
        return grid.codes[name], grid.scales[name]

    return codes_of


def _share_embedding_nbits(graph) -> None:
    """Gather rows of the head's MatMulNBits table: B [V, k_blocks, blob] uint8 is exactly the
    embedding [V, H] quantized per row in blocks along H. The scales too are the head's, reshaped in
    the graph to the [V, k_blocks, 1] GatherBlockQuantized takes (MatMulNBits refuses that shape): a
    stored copy would add 4 bytes per block (21 MB on the 270M in blocks of 32). A head split by rows
    (`split_table`) has two tables: each token gathers from the one that holds its row."""
    from onnx import helper, numpy_helper

    heads = _heads(graph)
    gather = _embedding_gather(graph)
    name, ids, out = gather.name, gather.input[1], gather.output[0]
    if len(heads) == 1:
        nodes = _gather_rows(graph, heads[0], ids, out, f"{name}")
    else:  # split_table: head_t_rows8 then head_t_rows4; TABLE_SLOT maps a token to its slot in that order
        n8 = _attrs(heads[0])["N"]
        graph.initializer.extend([numpy_helper.from_array(np.array(n8, np.int64), "embed_n8"),
                                  numpy_helper.from_array(np.array(n8 - 1, np.int64), "embed_last8"),
                                  numpy_helper.from_array(np.array(0, np.int64), "embed_zero"),
                                  numpy_helper.from_array(np.array([-1], np.int64), "embed_last_axis")])
        nodes = [
            helper.make_node("Gather", [TABLE_SLOT, ids], [f"{name}_slot32"], name=f"{name}_slot", axis=0),
            helper.make_node("Cast", [f"{name}_slot32"], [f"{name}_slot"], name=f"{name}_slot_cast", to=7),
            helper.make_node("Less", [f"{name}_slot", "embed_n8"], [f"{name}_in8"], name=f"{name}_in8"),
            helper.make_node("Min", [f"{name}_slot", "embed_last8"], [f"{name}_ids8"], name=f"{name}_ids8"),
            helper.make_node("Sub", [f"{name}_slot", "embed_n8"], [f"{name}_off4"], name=f"{name}_off4"),
            helper.make_node("Max", [f"{name}_off4", "embed_zero"], [f"{name}_ids4"], name=f"{name}_ids4"),
            *_gather_rows(graph, heads[0], f"{name}_ids8", f"{name}_rows8", f"{name}8"),
            *_gather_rows(graph, heads[1], f"{name}_ids4", f"{name}_rows4", f"{name}4"),
            helper.make_node("Unsqueeze", [f"{name}_in8", "embed_last_axis"], [f"{name}_in8_h"], name=f"{name}_in8_h"),
            helper.make_node("Where", [f"{name}_in8_h", f"{name}_rows8", f"{name}_rows4"], [out], name=f"{name}_pick"),
        ]
    _replace_node(graph, gather, nodes)
    _drop_unused_initializers(graph)


def _attrs(node) -> dict:
    from onnx import helper

    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def _heads(graph) -> list:
    """The LM head's MatMulNBits (its weight is the pre-transposed `head_t`): one, or two once `split_table` ran."""
    return [n for n in graph.node if n.op_type == "MatMulNBits" and n.input[1].startswith("head_t")]


def _gather_rows(graph, head, ids: str, out: str, name: str) -> list:
    """Nodes that gather rows `ids` of MatMulNBits `head`'s table (no zero points) into float `out` [1, T, K]."""
    from onnx import helper, numpy_helper

    attrs = _attrs(head)
    hidden, block, bits = attrs["K"], attrs["block_size"], attrs["bits"]
    k_blocks = _initializers(graph)[head.input[1]].dims[1]
    graph.initializer.extend([
        numpy_helper.from_array(np.array([-1, k_blocks, 1], np.int64), f"{name}_scales_shape"),
        numpy_helper.from_array(np.array([1, -1, k_blocks * block], np.int64), f"{name}_flat_shape"),
        numpy_helper.from_array(np.array([0], np.int64), f"{name}_start"),
        numpy_helper.from_array(np.array([hidden], np.int64), f"{name}_stop"),
        numpy_helper.from_array(np.array([2], np.int64), f"{name}_axis"),
    ])
    return [
        helper.make_node("Reshape", [head.input[2], f"{name}_scales_shape"], [f"{name}_scales"], name=f"{name}_scales"),
        helper.make_node("GatherBlockQuantized", [head.input[1], ids, f"{name}_scales"], [f"{name}_q"],
                         name=f"{name}_q", domain="com.microsoft", gather_axis=0, quantize_axis=2,
                         block_size=block, bits=bits),  # [1, T, kb, block]
        helper.make_node("Reshape", [f"{name}_q", f"{name}_flat_shape"], [f"{name}_flat"], name=f"{name}_flat"),
        helper.make_node("Slice", [f"{name}_flat", f"{name}_start", f"{name}_stop", f"{name}_axis"], [out],
                         name=f"{name}_slice"),
    ]


# -- the int4 schemes' mix (`--max-size`, issue 10) -------------------------------------------------

MIX_SCHEMES = ("int4b32", "int4b32-asym")  # every matrix int4 in blocks of 32; `--max-size` raises some
HIGH = (8, 32)  # what a raised matrix becomes: int8 in blocks of 32 (Q8_0's grid), symmetric
EMBED = "model.embed_tokens.weight"


def zero_points(scheme: str, name: str) -> bool:
    """Whether an int4 scheme stores matrix `name` with zero points (int4b32-asym, the tied table aside)."""
    return scheme in ASYMMETRIC and name != EMBED


def low_form(scheme: str, name: str) -> str:
    """How an int4 scheme stores matrix `name`, in words (the manifest's `tensors`)."""
    return "int4 block 32, zero point per block" if zero_points(scheme, name) else "int4 block 32"


def fake_low(scheme: str) -> Callable[[str, Tensor], Tensor]:
    """`rounding(name, w)`: matrix `name` on the scheme's int4 grid, as the export stores it."""
    return lambda name, w: fake_nbits_asym(w, 4, 32) if zero_points(scheme, name) else fake_nbits(w, 4, 32)


def int4_pack(scheme: str, table: bool) -> Callable[[Tensor], Packed]:
    """`pack_of(w)` for an int4 scheme's matrices (`table`: the tied table)."""
    if zero_points(scheme, EMBED if table else ""):
        def asymmetric(w: Tensor) -> Packed:
            u, scale, zero = nbits_codes_asym(w, 4, 32)
            return Packed(u.flatten(-2).to(torch.uint8).numpy(), scale[..., 0].contiguous().numpy(),
                          zero[..., 0].to(torch.uint8).numpy(), 4, 32)

        return asymmetric
    return lambda w: _signed(4, *_blocks_of(nbits_codes(w, 4, 32)))


def raise_costs(scheme: str, weights: dict[str, Tensor]) -> dict[str, int]:
    """The bytes each matrix adds at int8 blocks of 32 over its int4 form (codes, scales, zero points)."""
    def size(rows: int, cols: int, bits: int, zero_points: bool) -> int:
        blocks = cols // 32
        return rows * cols * bits // 8 + rows * blocks * 4 + (rows * -(-blocks * bits // 8) if zero_points else 0)

    return {name: size(*w.shape, HIGH[0], False) - size(*w.shape, 4, zero_points(scheme, name))
            for name, w in weights.items()}


TABLE_CHUNKS = 8  # the table's rows, ranked by use, are raised in 8 equal chunks (and a partial one)


def split_rounding(order: np.ndarray, n8: int) -> Callable[[Tensor], Tensor]:
    """The table as a split stores it: int8 blocks of 32, then all but the `n8` first rows of `order`
    rounded again to int4 (`split_table` rounds the int8 values, as here)."""
    def rounding(w: Tensor) -> Tensor:
        t = fake_nbits(w, *HIGH)
        rows = torch.as_tensor(np.sort(order[n8:]), dtype=torch.long)
        if len(rows):
            t[rows] = fake_nbits(t[rows], 4, SPLIT_BLOCK)
        return t

    return rounding


def choose_mix(model: nn.Module, scheme: str, tokens, order: np.ndarray, room: int,
               log=print) -> tuple[dict[str, float], dict[int, float], list[str], int]:
    """The sensitivity step: each layer matrix's KL at int4 (`kl`), the table's with its first n ranked
    rows (`order`) at int8 and the rest at int4 for n in 8 chunks (`table_kl`), and the plan for `room`
    extra bytes: the layer matrices to raise and how many table rows (sensitivity.plan)."""
    from .. import sensitivity

    weights = sensitivity.matrices(model)
    kl = sensitivity.tensor_kl(model, fake_low(scheme), tokens, log)
    vocab, hidden = weights[EMBED].shape
    bounds = [round(vocab * i / TABLE_CHUNKS) for i in range(TABLE_CHUNKS + 1)]
    table_kl = {0: kl.pop(EMBED), **sensitivity.variant_kl(
        model, {n: (EMBED, split_rounding(order, n)) for n in bounds[1:]}, tokens, log, "table chunks")}
    kept, small = split_row_bytes(HIGH[0], HIGH[1], hidden, False)
    extra = raise_costs(scheme, weights)
    extra.pop(EMBED)
    chosen, n8 = sensitivity.plan(kl, extra, table_kl, kept - small, 4 * vocab, room)
    return kl, table_kl, chosen, n8


def mixed_packs(model: nn.Module, proto, spec, accuracy_level: int,
                log) -> tuple[Callable, dict[str, str], np.ndarray | None]:
    """`pack_of(w)` for an int4 scheme, each matrix's form for the manifest, and the table rows left at
    int4 when the table is split (None: not split). Without `--max-size`: every matrix int4. With it:
    the matrices, and chunks of the table's rows in their ranked order (`spec.table_order()`), whose
    int4 rounding costs the most KL per extra byte (sensitivity.py, on `spec.calibration()`) go to int8
    blocks of 32 while the file stays in the budget; a table raised in part is split by rows."""
    from .. import sensitivity

    scheme = spec.scheme.name
    name_of, weights = by_content(model), sensitivity.matrices(model)
    low = {table: int4_pack(scheme, table) for table in (False, True)}
    raised: dict[str, float] = {}

    def pack_of(w: Tensor) -> Packed:
        name = name_of(w)
        if name in raised:
            return _signed(HIGH[0], *_blocks_of(nbits_codes(w, *HIGH)))
        return low[name == EMBED](w)

    report = {name: low_form(scheme, name) for name in weights}
    if not spec.max_size:
        return pack_of, report, None
    smallest = quantize_nbits(copy.deepcopy(proto), scheme, accuracy_level, pack_of)
    size = _saved_bytes(smallest.graph) + (1 << 14)
    if size > spec.max_size:
        raise UserError(f"--max-size {spec.max_size / 1e6:g} MB is below the smallest this export reaches "
                        f"({size / 1e6:.1f} MB with every matrix at int4).")
    order = np.asarray(spec.table_order())
    tokens = spec.calibration()[: sensitivity.SENSITIVITY_SEQUENCES]
    log(f"  {size / 1e6:.1f} MB with every matrix at int4; measuring each matrix's sensitivity on the first "
        f"{sum(map(len, tokens))} of the {spec.table_ranking}")
    kl, table_kl, chosen, n8 = choose_mix(model, scheme, tokens, order, spec.max_size - size, log)
    vocab = len(order)
    for name in chosen:
        raised[name] = kl[name]
    int4_rows = None
    if n8:
        raised[EMBED] = table_kl[0]
        int4_rows = np.sort(order[n8:]) if n8 < vocab else None
    log(f"  {len(raised) - (EMBED in raised)} of {len(weights) - 1} layer matrices and {n8} of {vocab} table "
        f"rows to int8 blocks of 32 (within --max-size {spec.max_size / 1e6:g} MB)")
    for name in weights:
        if name == EMBED:
            report[name] = (f"int8 block 32 (--max-size: {n8} of {vocab} rows; at int4 the table alone costs KL "
                            f"{table_kl[0]:.2e})" if n8 else report[name] + f" (KL {table_kl[0]:.2e} at int4)")
        elif name in raised:
            report[name] = f"int8 block 32 (--max-size: its int4 rounding alone costs KL {kl[name]:.2e})"
        else:
            report[name] += f" (KL {kl[name]:.2e} at int4)"
    return pack_of, report, int4_rows


def mix_record(tensors: dict[str, str], spec) -> dict:
    """The manifest's `mix`: the budget, what it was measured on, and the raised matrices (validate's
    reference raises the same ones)."""
    return {"budget_bytes": spec.max_size, "ranking": spec.table_ranking, "high": f"int{HIGH[0]} block {HIGH[1]}",
            "raised": sorted(n for n, form in tensors.items() if form.startswith("int8"))}


# -- the table split by rows (`--max-size`, issue 10) ---------------------------------------------

TABLE_SLOT = "table_slot"  # int32 [V]: a token's row in the split head's (rows8, rows4) order
SPLIT_BLOCK = 32  # the int4 rows' block along K


def split_row_bytes(head_bits: int, head_block: int, hidden: int, zero_points: bool) -> tuple[int, int]:
    """Bytes of one table row as the head stores it, and as an int4 row in blocks of SPLIT_BLOCK."""
    kept = hidden * head_bits // 8 + hidden // head_block * (4 + zero_points)
    return kept, hidden // 2 + hidden // SPLIT_BLOCK * 4


def split_table(graph, int4_rows: np.ndarray) -> None:
    """The head's table split by rows: the rows `int4_rows` (token ids) rounded to int4 (symmetric,
    blocks of SPLIT_BLOCK) from the values the head holds, the others kept as they are. Two MatMulNBits
    over the two row sets, a Concat and a Gather (TABLE_SLOT) back to vocabulary order; the embedding
    (`_share_embedding_nbits`, called after this) gathers each token from the table that holds it."""
    from onnx import helper, numpy_helper

    from ..gguf_grid import GGUFTensor

    inits = _initializers(graph)
    (head,) = _heads(graph)
    attrs = _attrs(head)
    vocab, hidden, bits, block = attrs["N"], attrs["K"], attrs["bits"], attrs["block_size"]
    if bits != 8:
        raise RuntimeError("split_table keeps an 8-bit head table")
    u = numpy_helper.to_array(inits[head.input[1]]).reshape(vocab, hidden)
    scales = numpy_helper.to_array(inits[head.input[2]]).reshape(vocab, -1)
    zp = numpy_helper.to_array(inits[head.input[3]]).reshape(vocab, -1) if len(head.input) > 3 else None
    rows8, rows4, slot = split_rows(vocab, int4_rows)
    # the values the head computes with: (u - zero point) x scale per block, as for a GGUF grid
    w4 = GGUFTensor("", u[rows4], scales[rows4], None if zp is None else zp[rows4], 8, block, "").dequantize()
    codes, s4 = nbits_codes(torch.from_numpy(w4), 4, SPLIT_BLOCK)
    q4 = (codes.to(torch.int16) + 8).to(torch.uint8).reshape(len(rows4), hidden).numpy()
    q4 = q4[:, 0::2] | (q4[:, 1::2] << 4)
    nb8, nb4 = hidden // block, hidden // SPLIT_BLOCK
    tables = {
        "head_t_rows8": (u[rows8].reshape(len(rows8), nb8, block), scales[rows8], None if zp is None else zp[rows8], 8, block),
        "head_t_rows4": (q4.reshape(len(rows4), nb4, SPLIT_BLOCK // 2), s4.reshape(len(rows4), nb4).numpy(), None, 4, SPLIT_BLOCK),
    }
    out = head.output[0]
    nodes = []
    for name, (b, s, z, b_bits, b_block) in tables.items():
        names = [f"{name}_Q{b_bits}", f"{name}_scales"]
        graph.initializer.extend([numpy_helper.from_array(np.ascontiguousarray(b), names[0]),
                                  numpy_helper.from_array(np.ascontiguousarray(s, np.float32), names[1])])
        if z is not None:
            names.append(f"{name}_zero_points")
            graph.initializer.append(numpy_helper.from_array(np.ascontiguousarray(z).reshape(-1), names[2]))
        extra = {k: v for k, v in attrs.items() if k not in ("N", "bits", "block_size")}
        nodes.append(helper.make_node("MatMulNBits", [head.input[0], *names], [f"{out}_{name}"], name=f"{head.name}_{name}",
                                      domain="com.microsoft", **extra, N=len(b), bits=b_bits, block_size=b_block))
    graph.initializer.append(numpy_helper.from_array(slot.astype(np.int32), TABLE_SLOT))
    nodes += [helper.make_node("Concat", [f"{out}_head_t_rows8", f"{out}_head_t_rows4"], [f"{out}_by_slot"],
                               name=f"{head.name}_concat", axis=-1),
              helper.make_node("Gather", [f"{out}_by_slot", TABLE_SLOT], [out], name=f"{head.name}_vocab_order", axis=-1)]
    _replace_node(graph, head, nodes)
    _drop_unused_initializers(graph)


def _rows_within(budget: int, order: Callable[[], np.ndarray], record: dict, log) -> Callable:
    """`table_rows(graph)` for quantize_nbits: the fewest least-used rows of the head's table (the end of
    `order()`, most used first; called only when a split is needed) whose rounding to int4 brings the
    artifact to `budget` bytes; None when it fits as it is. Fills `record` (the manifest's `table_split`)."""

    def table_rows(graph) -> np.ndarray | None:
        table = _embedding_gather(graph).input[0]  # the float embedding, dropped once it gathers from the head
        (head,) = _heads(graph)
        a = _attrs(head)
        vocab = a["N"]
        size = _saved_bytes(graph, without=table) + (1 << 14)  # room for the split's few nodes
        if size <= budget:
            log(f"  {size / 1e6:.1f} MB fits --max-size {budget / 1e6:g} MB without rounding table rows")
            return None
        if a["bits"] != 8:
            raise UserError(f"This export is {size / 1e6:.1f} MB and its table is already {a['bits']}-bit: "
                            f"--max-size {budget / 1e6:g} MB cannot be met by rounding table rows to int4.")
        kept, small = split_row_bytes(8, a["block_size"], a["K"], len(head.input) > 3)
        n4 = -(-(size + 4 * vocab - budget) // (kept - small))  # + TABLE_SLOT's 4 bytes per row
        if n4 > vocab:
            least = size + 4 * vocab - vocab * (kept - small)
            raise UserError(f"--max-size {budget / 1e6:g} MB is below the smallest this export reaches "
                            f"({least / 1e6:.1f} MB with every table row at int4).")
        rows = np.sort(np.asarray(order())[vocab - n4:])
        record.update(split_record(budget, rows, vocab, SPLIT_BLOCK))
        log(f"  {size / 1e6:.1f} MB > --max-size {budget / 1e6:g} MB: the {n4} least used of {vocab} table rows "
            f"({n4 / vocab:.0%}) to int4, blocks of {SPLIT_BLOCK}")
        return rows

    return table_rows


EXTERNAL_REF_BYTES = 80  # a weight's place in the data file (location, offset, length) in the graph: 60-70 measured


def _saved_bytes(graph, without: str | None = None, whole: bool = True) -> int:
    """The bytes the graph would save to now (`save`: model.onnx and its data file), less the
    initializer `without`. protobuf measures a message under 2 GB; a larger graph (or `whole=False`) is
    summed by part (torch.export's metadata included), with 12 bytes per part for its field tag and
    length (the 270M's graph: 10.2 on average). Each weight that goes to the data file leaves a
    reference of at most EXTERNAL_REF_BYTES in the graph."""
    dropped = next(t for t in graph.initializer if t.name == without).ByteSize() if without else 0
    refs = EXTERNAL_REF_BYTES * sum(1 for t in graph.initializer if t.name != without and _tensor_bytes(t) >= 1024)
    try:
        if whole:
            return graph.ByteSize() - dropped + refs
    except (ValueError, OverflowError):
        pass
    parts = [*graph.initializer, *graph.node, *graph.value_info, *graph.input, *graph.output, *graph.metadata_props]
    strings = len(graph.name.encode()) + len(graph.doc_string.encode())
    return sum(x.ByteSize() + 12 for x in parts) + strings + 24 - dropped + refs


def quantize_fp8(proto, codes: Callable | None = None):
    """Every constant MatMul weight B [K, N] -> float8e4m3fn codes + per-column scale, DequantizeLinear
    (axis 1) before the MatMul; the embedding gathers columns of the head's fp8 table. `codes(w)` (a QAT
    grid) gives the codes and scales instead of rounding."""
    from onnx import TensorProto, helper, numpy_helper

    graph = proto.graph
    inits = _initializers(graph)
    new_nodes, head = [], None
    for node in graph.node:
        if node.op_type == "MatMul" and node.input[1] in inits:
            b = inits[node.input[1]]
            w = torch.from_numpy(numpy_helper.to_array(b).T.copy())  # [N, K]
            q8, scale = (codes or fp8_codes)(w)
            q = helper.make_tensor(f"{b.name}_f8", TensorProto.FLOAT8E4M3FN, list(b.dims),
                                   q8.t().contiguous().view(torch.uint8).numpy().tobytes(), raw=True)
            scale = scale.float().reshape(-1).contiguous()
            graph.initializer.extend([q, numpy_helper.from_array(scale.numpy(), f"{b.name}_f8_scale")])
            dq = helper.make_node("DequantizeLinear", [q.name, f"{b.name}_f8_scale"], [f"{b.name}_deq"],
                                  name=f"{node.name}_dq", axis=1)
            node.input[1] = f"{b.name}_deq"
            if b.name.startswith("head_t"):  # first: the embedding gathers from it too
                head = b.name
                new_nodes.insert(0, dq)
            else:
                new_nodes.append(dq)
        new_nodes.append(node)
    graph.ClearField("node")
    graph.node.extend(new_nodes)
    gather = _embedding_gather(graph)
    name, out, hidden = gather.name, gather.output[0], inits[head].dims[0]
    graph.initializer.extend([
        numpy_helper.from_array(np.array([-1], np.int64), "embed_ids_shape"),
        numpy_helper.from_array(np.array([1, -1, hidden], np.int64), "embed_out_shape"),
    ])
    # Gather takes no float8 input: the rows come from the head's dequantized table (same values).
    ids, cols = f"{name}_ids", f"{name}_cols"
    _replace_node(graph, gather, [
        helper.make_node("Reshape", [gather.input[1], "embed_ids_shape"], [ids], name=f"{name}_ids"),
        helper.make_node("Gather", [f"{head}_deq", ids], [cols], name=f"{name}_cols", axis=1),  # [H, n]
        helper.make_node("Transpose", [cols], [f"{name}_rows"], name=f"{name}_t", perm=[1, 0]),  # [n, H]
        helper.make_node("Reshape", [f"{name}_rows", "embed_out_shape"], [out], name=f"{name}_out"),
    ])
    _drop_unused_initializers(graph)
    return proto


# -- the vision encoder (issue 8) -------------------------------------------------------------------

VISION_ARTIFACT = "vision.onnx"
VISION_SCHEMES = ("fp32", "int8", "int4")  # per-channel MatMulNBits on the encoder's and projector's matmuls


def export_vision(vision: nn.Module, folder: Path, scheme: str, log=print) -> dict:
    """Write vision.onnx: pixels float32[N, 3, S, S] (N = 1..8 images or crops) -> image_embeds
    float32[N, tokens, text hidden]; return the manifest's `vision` fields. fp32, or int8/int4 weights
    per output channel (MatMulNBits; the patch convolution stays fp32)."""
    import onnx

    if scheme not in VISION_SCHEMES:
        raise UserError(f"The vision encoder exports as {', '.join(VISION_SCHEMES)} on onnx, not {scheme}.")
    c = vision.config
    size = c.vision_config.image_size
    start = time.perf_counter()
    with torch.no_grad(), _quiet():
        n = torch.export.Dim("N", min=1, max=8)
        program = torch.onnx.export(
            vision.eval(), (torch.zeros(2, 3, size, size),), dynamic_shapes={"pixels": {0: n}},
            input_names=["pixels"], output_names=["image_embeds"], dynamo=True, opset_version=OPSET,
            optimize=True, verbose=False,
        )
    proto = program.model_proto
    for value in [*proto.graph.input, *proto.graph.output]:
        value.type.tensor_type.shape.dim[0].dim_param = "N"
    _name_nodes(proto.graph)
    log(f"  vision encoder: torch.onnx.export, {len(proto.graph.node)} nodes in {time.perf_counter() - start:.1f} s")
    if scheme != "fp32":
        bits = NBITS[scheme][0]
        _pack_nbits(proto.graph, None, lambda w: _signed(bits, *_round_per_channel(w, bits)))
        if not any(o.domain == "com.microsoft" for o in proto.opset_import):
            proto.opset_import.append(onnx.helper.make_opsetid("com.microsoft", 1))
        _drop_unused_initializers(proto.graph)
        log(f"  vision encoder: MatMulNBits {scheme} per channel")
    weight_bytes = sum(_tensor_bytes(t) for t in proto.graph.initializer)
    onnx.save_model(proto, folder / VISION_ARTIFACT)
    inputs, outputs = _describe(proto)
    return {"artifact": VISION_ARTIFACT, "inputs": inputs, "outputs": outputs, "scheme": scheme,
            "weight_bytes": weight_bytes}


def simulate_vision(vision: nn.Module, scheme: str) -> nn.Module:
    """A copy of the eager encoder + projector on vision.onnx's grid (per-channel rounding)."""
    vision = copy.deepcopy(vision)
    if scheme == "fp32":
        return vision
    bits = NBITS[scheme][0]
    with torch.no_grad():
        for module in vision.modules():
            if isinstance(module, nn.Linear):
                module.weight.copy_(fake_nbits(module.weight, bits, module.weight.shape[1]))
        proj = vision.multi_modal_projector.mm_input_projection_weight  # [K, N], used as x @ w
        proj.copy_(fake_nbits(proj.t(), bits, proj.shape[0]).t())
    return vision

