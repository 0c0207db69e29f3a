"""A GGUF's own quantization grid, per tensor, in the form MatMulNBits stores (issue 10, `--quant gguf`).

llama.cpp's block formats map onto MatMulNBits' `(u - zero_point) * scale` per block along K:

| GGUF | stored as | exact? |
|---|---|---|
| Q4_0 | 4 bits, block 32, u = q, default zero point 8 | bit for bit |
| Q8_0 | 8 bits, block 32, u = q + 128 | bit for bit |
| Q5_0 | 8 bits, block 32, u = q - 16 + 128 (5-bit codes inside 8) | bit for bit |
| Q6_K | 8 bits, block 16, scale = d * sc (exact in fp32), u = q - 32 + 128 | bit for bit |
| Q4_K | 8 bits, block 32, u = k * q, scale = d * sc / k, zero point round(k * dmin * m / (d * sc)) | offsets to 1/(2k) of a step |
| other | re-quantized by the exporter | no (reported) |

Every form has integer zero points: onnxruntime's fast CPU kernels take no float zero points (a 4-bit
MatMulNBits with them decodes 77x slower) and no 8-bit weights without `accuracy_level=4`
(benchmarks/matmulnbits_forms.py, docs/matmulnbits_forms.json). Q4_K's
offset dmin * m is not a whole number of steps, so it is held in 8 bits with k <= 17 codes per 4-bit
step: k * q stays within 0..255 and the offset is rounded to 1/k of a step (k is the largest that keeps
the zero point within 0..255; 17 on the embedded 270M).

`read_gguf_grid(path)` unpacks every linear/embedding tensor's raw blocks (the same bit layouts as
gguf-py's `dequantize_blocks`) into `GGUFTensor`s keyed by Hugging Face name; `dequantize()` gives the
values the artifact computes with. Nothing here rounds. A Q4_K tensor also carries its blocks as the file
holds them (`offsets`: codes 0..15, scale d * sc and offset dmin * m per block, exact in fp32), for a
target that takes float offsets (Core ML, exporters/coreml_gguf.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

QK_K = 256


@dataclass
class GGUFTensor:
    """One weight [N, K] as MatMulNBits holds it: w = (u - zero_point) * scale per block of K."""

    source: str  # the GGUF type, e.g. "Q5_0"
    u: np.ndarray  # uint8 [N, K]
    scales: np.ndarray  # float32 [N, K / block]
    zero_points: np.ndarray | None  # uint8 [N, K / block]; None: 2^(bits - 1)
    bits: int
    block: int
    exact: str  # "bit for bit", or how close
    offsets: OffsetBlocks | None = None  # Q4_K: the file's own form (float offsets), beside the stored one

    def dequantize(self) -> np.ndarray:
        n, k = self.u.shape
        zp = self.zero_points if self.zero_points is not None else np.float32(2 ** (self.bits - 1))
        q = self.u.astype(np.float32).reshape(n, k // self.block, self.block)
        zp = zp[..., None] if isinstance(zp, np.ndarray) else zp
        return ((q - zp) * self.scales[..., None]).reshape(n, k)

    def describe(self) -> str:
        zp = ", zero points" if self.zero_points is not None else ""
        return f"{self.source} -> int{self.bits} block {self.block}{zp} ({self.exact})"


@dataclass
class OffsetBlocks:
    """A Q4_K weight [N, K] as the file holds it: w = scale * q - offset per block of 32 along K."""

    q: np.ndarray  # uint8 [N, K], 0..15
    scale: np.ndarray  # float32 [N, K / 32]: d * sc (exact)
    offset: np.ndarray  # float32 [N, K / 32]: dmin * m (exact)

    def dequantize(self) -> np.ndarray:
        n, k = self.q.shape
        q = self.q.astype(np.float32).reshape(n, k // 32, 32)
        return (q * self.scale[..., None] - self.offset[..., None]).reshape(n, k)


def _f16(b: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(b).view(np.float16).astype(np.float32)


def _q8_0(blocks: np.ndarray):
    d, x = _f16(blocks[:, :2]), blocks[:, 2:].view(np.int8)
    return (x.astype(np.int16) + 128).astype(np.uint8), d, None, 8, 32, "bit for bit"


def _q4_0(blocks: np.ndarray):
    d, qs = _f16(blocks[:, :2]), blocks[:, 2:]
    q = np.concatenate([qs & 0x0F, qs >> 4], axis=1)  # values 0..15 then 16..31 of the block
    return q.astype(np.uint8), d, None, 4, 32, "bit for bit"


def _q5_0(blocks: np.ndarray):
    n = blocks.shape[0]
    d, qh, qs = _f16(blocks[:, :2]), np.ascontiguousarray(blocks[:, 2:6]).view(np.uint32), blocks[:, 6:]
    high = ((qh.reshape(n, 1) >> np.arange(32, dtype=np.uint32)) & 1).astype(np.uint8)
    low = np.concatenate([qs & 0x0F, qs >> 4], axis=1)
    q = (low | (high << 4)).astype(np.int16) - 16  # -16..15
    return (q + 128).astype(np.uint8), d, None, 8, 32, "bit for bit"


def _q6_k(blocks: np.ndarray):
    n = blocks.shape[0]
    ql, qh = blocks[:, : QK_K // 2], blocks[:, QK_K // 2 : QK_K // 2 + QK_K // 4]
    sc = blocks[:, QK_K // 2 + QK_K // 4 : QK_K // 2 + QK_K // 4 + QK_K // 16].view(np.int8).astype(np.float32)
    d = _f16(blocks[:, -2:])
    low = ((ql.reshape(n, -1, 1, 64) >> np.array([0, 4], np.uint8).reshape(1, 1, 2, 1)) & 0x0F).reshape(n, -1, 32)
    high = ((qh.reshape(n, -1, 1, 32) >> np.array([0, 2, 4, 6], np.uint8).reshape(1, 1, 4, 1)) & 0x03).reshape(n, -1, 32)
    q = (low | (high << 4)).astype(np.int16).reshape(n, QK_K) - 32  # -32..31
    return (q + 128).astype(np.uint8), (d * sc).reshape(n, QK_K // 16), None, 8, 16, "bit for bit"


def _q4_k_parts(blocks: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Q4_K super-blocks of 256 -> codes [n, 8, 32] (0..15), scale d * sc and offset dmin * m [n, 8]."""
    from gguf.quants import Q4_K

    n = blocks.shape[0]
    d, dmin = _f16(blocks[:, :2]), _f16(blocks[:, 2:4])
    sc, m = Q4_K.get_scale_min(blocks[:, 4 : 4 + Q4_K.K_SCALE_SIZE])
    qs = blocks[:, 4 + Q4_K.K_SCALE_SIZE :]
    q = ((qs.reshape(n, -1, 1, 32) >> np.array([0, 4], np.uint8).reshape(1, 1, 2, 1)) & 0x0F).reshape(n, QK_K)
    scale = (d * sc.astype(np.float32)).reshape(n, 8)
    offset = (dmin * m.astype(np.float32)).reshape(n, 8)
    return q.reshape(n, 8, 32).astype(np.uint8), scale, offset


def _q4_k(blocks: np.ndarray):
    return _offset_codes(*_q4_k_parts(blocks))


def _offset_codes(q: np.ndarray, scale: np.ndarray, offset: np.ndarray):
    """w = scale * q - offset (q 0..15 per block) as 8-bit u = k * q, zero point round(k * offset / scale),
    scale / k: the largest k <= 17 whose zero point fits in a byte. A block whose scale is 0 holds the
    constant -offset: codes 0, zero point 1, scale = offset."""
    ratio = np.divide(offset, scale, out=np.zeros_like(offset), where=scale != 0).astype(np.float64)
    k = np.clip(np.floor(255.49 / np.maximum(ratio, 1e-9)), 1, 17)
    zp = np.clip(np.round(k * ratio), 0, 255)
    flat = scale == 0
    k[flat], zp[flat] = 1, 1
    u = (q * k[..., None]).astype(np.uint8)
    u[flat] = 0
    step = np.where(flat, offset, scale / k).astype(np.float32)
    worst = float(np.max(np.abs(zp - k * ratio)[~flat] / k[~flat], initial=0.0))  # offset error, in steps
    exact = "bit for bit" if worst == 0 else f"offsets within {worst:.3g} of a 4-bit step"
    n = q.shape[0]
    return u.reshape(n, -1), step, zp.astype(np.uint8), 8, 32, exact


UNPACK = {"Q8_0": _q8_0, "Q4_0": _q4_0, "Q5_0": _q5_0, "Q6_K": _q6_k, "Q4_K": _q4_k}


def unpack(tensor_type: str, data: np.ndarray, shape: tuple[int, int]) -> GGUFTensor | None:
    """The tensor's blocks as a GGUFTensor, or None for a type MatMulNBits cannot hold as it is."""
    if tensor_type not in UNPACK:
        return None
    n, k = shape
    raw = np.ascontiguousarray(data).view(np.uint8)
    blocks = raw.reshape(-1, raw.size // (n * k // (QK_K if tensor_type.endswith("_K") else 32)))
    u, scales, zp, bits, block, exact = UNPACK[tensor_type](blocks)
    nb = k // block
    offsets = None
    if tensor_type == "Q4_K":
        q, scale, offset = _q4_k_parts(blocks)
        offsets = OffsetBlocks(q.reshape(n, k), scale.reshape(n, k // 32), offset.reshape(n, k // 32))
    return GGUFTensor(tensor_type, u.reshape(n, k), np.asarray(scales, np.float32).reshape(n, nb),
                      None if zp is None else zp.reshape(n, nb), bits, block, exact, offsets)


def read_gguf_grid(path: str | Path) -> dict[str, GGUFTensor | str]:
    """Every 2-D weight of a Gemma 3 GGUF by Hugging Face name: its GGUFTensor, or (a string) the
    GGUF type the exporter has to re-quantize."""
    from .weights import gguf_to_hf_name, open_gguf

    reader = open_gguf(Path(path))
    out: dict[str, GGUFTensor | str] = {}
    for t in reader.tensors:
        name = gguf_to_hf_name(t.name)
        if name is None or len(t.shape) != 2:
            continue
        shape = (int(t.shape[1]), int(t.shape[0]))  # GGUF lists ne0 (K) first
        grid = unpack(t.tensor_type.name, t.data, shape)
        out[name] = grid if grid is not None else t.tensor_type.name
    return out
