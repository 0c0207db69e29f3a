"""Better 4-bit rounding for the 270M's layers on ONNX (issue 10): round to nearest (symmetric, as
int4b32 does; asymmetric with an integer zero point) against torchao's HQQ (half-quadratic
optimisation of scale and zero point, CPU), every layer tensor at 4 bits in blocks of 32, the tied
embedding/head kept in the GGUF's Q8_0 blocks. Eager simulations of the `gguf` reference
(int8 activations per block, as accuracy_level 4 computes), 512 teacher-forced positions against the
float model (the GGUF dequantized). Then the tied table at int4 too (rows marked `table_too`): alone,
and with the layers, symmetric or asymmetric (why `int4b32-asym` keeps its table symmetric).

    python benchmarks/int4_rounding.py [--length 512] [--json docs/int4_rounding.json]

Size: layer tensors at 4 bits + an fp32 scale per 32 (+ a 4-bit zero point for the asymmetric forms),
the Q8_0 table as `--quant gguf` stores it; the embedding gather's scale copy (21 MB) not included.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

sys.path.insert(0, str(Path(__file__).resolve().parent))

from gguf_mix import EMBED, score, setup, write  # noqa: E402  (the same reference and scoring)

from gemma3_export.exporters import onnx as ox  # noqa: E402
BLOCK = 32


def rtn_asymmetric(w: torch.Tensor) -> torch.Tensor:
    """Min/max per block, an integer zero point in 0..15 (MatMulNBits' uint8 zero points): int4b32-asym's grid."""
    return ox.fake_nbits_asym(w, 4, BLOCK)


def hqq(w: torch.Tensor, integer_zero: bool) -> torch.Tensor:
    from torchao.quantization.quant_primitives import _choose_qparams_and_quantize_affine_hqq

    q, scale, zero, _ = _choose_qparams_and_quantize_affine_hqq(
        w.float(), nbits=4, group_size=BLOCK, compute_dtype=torch.float32, device="cpu", raw_output=True)
    q = q.float().unflatten(-1, (-1, BLOCK))
    scale, zero = scale.float()[..., None], zero.float()[..., None]
    if integer_zero:  # MatMulNBits' fast kernels take integer zero points: round it, re-round the codes
        zero = torch.round(zero).clamp(0, 15)
        q = torch.round(w.float().unflatten(-1, (-1, BLOCK)) / scale + zero).clamp(0, 15)
    return ((q - zero) * scale).flatten(-2)


# label -> (rounding of one weight, whether it stores zero points)
METHODS = {
    "round to nearest, symmetric (int4b32)": (lambda w: ox.fake_nbits(w, 4, BLOCK), False),
    "round to nearest, asymmetric (integer zero point)": (rtn_asymmetric, True),
    "HQQ (float zero point)": (lambda w: hqq(w, False), True),
    "HQQ, zero point rounded to an integer": (lambda w: hqq(w, True), True),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--length", type=int, default=512)
    ap.add_argument("--json")
    args = ap.parse_args()
    grid, ids, ref, base = setup(args.length)
    layers = {n: p.shape for n, p in base.named_parameters() if p.dim() == 2 and n != EMBED}
    n_layer = sum(s[0] * s[1] for s in layers.values())
    e = grid[EMBED]
    table = e.u.size * e.bits / 8 + e.scales.size * 4
    rows = []
    for label, (method, zero_points) in METHODS.items():
        zp = n_layer / BLOCK / 2 if zero_points else 0
        rows.append({"method": label, "size_mb": round((table + n_layer / 2 + n_layer / BLOCK * 4 + zp) / 1e6, 1),
                     **score(base, dict.fromkeys(layers, method), ids, ref)})
        print(json.dumps(rows[-1]), flush=True)
    # The tied table too (int4b32-asym keeps it symmetric: is an asymmetric table better?)
    sym, asym = METHODS["round to nearest, symmetric (int4b32)"][0], rtn_asymmetric
    for label, rounding in (
        ("table only, symmetric", {EMBED: sym}),
        ("table only, asymmetric", {EMBED: asym}),
        ("every matrix symmetric (int4b32)", {**dict.fromkeys(layers, sym), EMBED: sym}),
        ("every matrix asymmetric", {**dict.fromkeys(layers, asym), EMBED: asym}),
        ("layers asymmetric, table symmetric (int4b32-asym)", {**dict.fromkeys(layers, asym), EMBED: sym}),
    ):
        rows.append({"method": label, "table_too": True, **score(base, rounding, ids, ref)})
        print(json.dumps(rows[-1]), flush=True)
    write(args.json, args.length, rows)


if __name__ == "__main__":
    main()
