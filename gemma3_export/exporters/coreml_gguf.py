"""`--quant gguf` on Core ML: each GGUF tensor's own blocks as an iOS 18 `constexpr_blockwise_shift_scale`.

The op computes w = scale * (data - offset) per block along K, in fp16 (scale fp16; data int4, uint4 or
int8; offset absent or fp16). llama.cpp's formats (gguf_grid.py) map onto it:

| GGUF | data | block | scale (fp16) | offset (fp16) | exact? |
|---|---|---|---|---|---|
| Q4_0 | int4 q - 8 | 32 | d | - | bit for bit |
| Q8_0 | int8 q | 32 | d | - | bit for bit |
| Q5_0 | int8 q - 16 (5-bit codes inside 8) | 32 | d | - | bit for bit |
| Q6_K | int8 q - 32 | 16 | d * sc, rounded | - | scale rounded to fp16 |
| Q4_K | uint4 q | 32 | d * sc, rounded | dmin * m / (d * sc), rounded | scale and offset rounded to fp16 |
| other | int8, per output channel | K | coremltools' | - | no: re-quantized, with a notice |

"Bit for bit": the file's codes and fp16 scale, unchanged; the package's value is the GGUF's value
rounded once to fp16, as every fp16 weight is (fp16 d times a code of at most 8 bits is exact in fp32,
so the op's fp16 product rounds once). d * sc (an fp16 times a 6- or 8-bit integer) and the Q4_K
offset are not always fp16 numbers: they are rounded to fp16. A Q6_K value is then within 2^-10 of
its block's largest magnitude (scale and product rounded); a Q4_K value within 2^-9 of the larger of
that and the block's offset dmin * m (scale, offset, difference and product rounded); fp16's subnormal
step (2^-24) aside. Each tensor's measured worst is its manifest entry (the 270M: 0.00095 for Q6_K,
0.0016 for Q4_K). A Q4_K block whose scale d * sc is 0 holds
the constant -dmin * m: data 0, offset 1, scale dmin * m.

Weights are matched to GGUF tensors by their fp16 values (`GGUFImport.of`). A weight the numerics
check keeps in an fp32 block gets fp32 scales and offsets (none on the 270M); `simulate` rounds as
for fp16.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np
import torch
from coremltools.converters.mil.mil import Builder as mb
from coremltools.converters.mil.mil import types
from coremltools.converters.mil.mil.ops.defs.iOS18.compression import constexpr_blockwise_shift_scale
from coremltools.converters.mil.mil.passes.graph_pass import AbstractGraphPass
from torch import nn

from ..gguf_grid import GGUFTensor

# Imported only by exporters/coreml.py's functions: an ONNX user never loads coremltools.

OP = "constexpr_blockwise_shift_scale"


@dataclass
class ShiftScale:
    """One weight [N, K] as constexpr_blockwise_shift_scale holds it: w = scale * (data - offset) per block."""

    source: str  # the GGUF type, e.g. "Q4_K"
    data: np.ndarray  # int8 or uint8 [N, K] (4-bit forms: -8..7 or 0..15)
    dtype: str  # the package's data type: int4, uint4 or int8
    scale: np.ndarray  # float16 [N, K / block]
    offset: np.ndarray | None  # float16 [N, K / block]
    exact: str  # "bit for bit", or how close

    @property
    def block(self) -> int:
        return self.data.shape[1] // self.scale.shape[1]

    def dequantize(self) -> np.ndarray:
        """The values Core ML computes from the op (its own `decompress`: fp16 arithmetic), as float32."""
        return np.asarray(constexpr_blockwise_shift_scale.decompress(self.data, self.scale, self.offset), np.float32)

    def describe(self) -> str:
        block = "per channel" if self.block == self.data.shape[1] else f"block {self.block}"
        offsets = ", fp16 offsets" if self.offset is not None else ""
        how = f", {self.exact}" if self.exact.startswith("re-quantized") else f" ({self.exact})"
        return f"{self.source} -> {self.dtype} {block}{offsets}{how}"


def shift_scale(g: GGUFTensor) -> ShiftScale | None:
    """A GGUF tensor's own blocks in the op's form; None where fp16 cannot hold its scales or offsets."""
    if g.offsets is not None:  # Q4_K: uint4 codes and a float offset per block
        o = g.offsets
        flat = o.scale == 0
        ratio = np.divide(o.offset, o.scale, out=np.ones_like(o.offset), where=~flat)
        scale = np.where(flat, o.offset, o.scale).astype(np.float16)
        data = o.q.copy()
        n, k = data.shape
        data.reshape(n, k // 32, 32)[flat] = 0
        form = ShiftScale(g.source, data, "uint4", scale, ratio.astype(np.float16), "")
        reference = o.dequantize()
    elif g.zero_points is None:  # a signed code: u - 2^(bits - 1)
        data = (g.u.astype(np.int16) - 2 ** (g.bits - 1)).astype(np.int8)
        form = ShiftScale(g.source, data, f"int{g.bits}", g.scales.astype(np.float16), None, "")
        reference = None if np.array_equal(form.scale.astype(np.float32), g.scales) else g.dequantize()
    else:
        return None
    if not all(np.isfinite(a).all() for a in (form.scale, form.offset) if a is not None):
        return None
    form.exact = "bit for bit" if reference is None else _how_close(form, reference)
    return form


def _how_close(form: ShiftScale, reference: np.ndarray) -> str:
    """The largest error of the op's fp16 values, relative to its block's largest |reference| (or offset)."""
    got = form.dequantize()
    if np.array_equal(got, reference.astype(np.float16).astype(np.float32)):
        return "bit for bit"
    n, k = reference.shape
    blocks = (n, k // form.block, form.block)
    err = np.abs(got - reference).reshape(blocks).max(-1)
    size = np.abs(reference).reshape(blocks).max(-1)
    if form.offset is not None:
        size = np.maximum(size, np.abs(form.offset.astype(np.float32) * form.scale.astype(np.float32)))
    worst = float(np.max(err / np.maximum(size, np.finfo(np.float32).tiny)))
    rounded = "scale and offset" if form.offset is not None else "scale"
    return f"{rounded} rounded to fp16: within {worst:.3g} of each block's largest magnitude"


def requantized(weight: torch.Tensor, source: str, why: str) -> ShiftScale:
    """int8 per output channel on coremltools' own grid (linear_symmetric, from the fp16 value)."""
    from coremltools.optimize.coreml._quantization_passes import linear_quantize_weights as lq

    params = lq.blockwise_compress(weight.detach().to(torch.float16).numpy(), nbits=8, mode="LINEAR_SYMMETRIC",
                                   signed=True, block_sizes=[1, 0])
    return ShiftScale(source, np.asarray(params.data, np.int8), "int8", np.asarray(params.scale, np.float16), None,
                      f"re-quantized ({why})")


def _key(values) -> str:
    return hashlib.sha256(np.ascontiguousarray(np.asarray(values, np.float16)).tobytes()).hexdigest()


class GGUFImport:
    """The Core ML form of every 2-D weight of `model` (the tied table once) from `grid`
    (gguf_grid.read_gguf_grid), found again by its fp16 values in a converted program."""

    def __init__(self, model: nn.Module, grid: dict):
        self.forms: dict[str, ShiftScale] = {}
        self._names: dict[str, str] = {}
        for name, param in model.named_parameters():  # the tied table once
            if param.dim() != 2:
                continue
            g = grid.get(name)
            form = shift_scale(g) if isinstance(g, GGUFTensor) else None
            if form is None:
                source = g if isinstance(g, str) else g.source if g is not None else "float"
                why = (f"{g} has no {OP} form" if isinstance(g, str) else "not in the GGUF" if g is None
                       else "its scales or offsets pass fp16's range")
                form = requantized(param, source, why)
            self.forms[name] = form
            self._names[_key(param.detach().numpy())] = name

    @property
    def tensors(self) -> dict[str, str]:
        """What each tensor was imported as, and how exactly (the manifest's `target_info.tensors`)."""
        return {name: form.describe() for name, form in self.forms.items()}

    def notices(self) -> dict[str, str]:
        return {name: form.describe() for name, form in self.forms.items() if "re-quantized" in form.exact}

    def of(self, values) -> tuple[str, ShiftScale]:
        """The parameter name and form of a weight, by its values (a program's const or a state dict's tensor)."""
        name = self._names.get(_key(values))
        if name is None:
            raise RuntimeError("a weight of the converted program is not one of the model's")
        return name, self.forms[name]

    def values(self, weight: torch.Tensor) -> torch.Tensor:
        """The values the package computes with in place of `weight` (fp16 dequantization), float32."""
        return torch.from_numpy(self.of(weight.detach().numpy())[1].dequantize())

    def apply(self, mlmodel, names: list[str]):
        """`mlmodel` with the const ops `names` replaced by constexpr_blockwise_shift_scale ops."""
        from coremltools.models.utils import _apply_graph_pass

        return _apply_graph_pass(mlmodel, _ShiftScalePass(self, set(names)))


def _mil_data(form: ShiftScale) -> np.ndarray:
    return form.data.astype({"int4": types.np_int4_dtype, "uint4": types.np_uint4_dtype, "int8": np.int8}[form.dtype])


class _ShiftScalePass(AbstractGraphPass):
    """Each named const -> its GGUF tensor's constexpr_blockwise_shift_scale (scales in the const's dtype)."""

    def __init__(self, imported: GGUFImport, names: set[str]):
        super().__init__()
        self.imported, self.names = imported, names

    def apply(self, prog) -> None:
        for function in prog.functions.values():
            for op in list(function.operations):
                if op.op_type == "const" and op.name in self.names:
                    self._swap(op)

    def _swap(self, op) -> None:
        value = op.outputs[0].val
        form = self.imported.of(value)[1]
        dtype = value.dtype  # fp16, or fp32 in a block the numerics check kept in fp32
        block = op.enclosing_block
        with block:
            new = mb.constexpr_blockwise_shift_scale(
                data=_mil_data(form), scale=form.scale.astype(dtype),
                offset=None if form.offset is None else form.offset.astype(dtype),
                before_op=op, name=op.name + "_quantized")
        block.replace_uses_of_var_after_op(anchor_op=op, old_var=op.outputs[0], new_var=new, no_check_var_types=True)
        block.remove_ops([op])
