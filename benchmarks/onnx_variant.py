"""The 270M ONNX int4b32 bundle exported with one export choice changed, for onnx_ab.py (issue 9):

    python benchmarks/onnx_variant.py separate-gate-up --out bundles/kept/onnx-int4b32-separate-gate-up

Variants (docs/benchmarks.md, 2026-12-07):
- separate-gate-up: the MLP's gate and up MatMulNBits stay two nodes (the exporter stacks them into one
  node and a Split, as it stacks q/k/v); onnxruntime-genai's graph keeps them apart.
- head-one-piece: the LM head as one node, as onnxruntime-genai's graph has it (the exporter splits it
  by rows into four pieces and a Concat); head-two-pieces: in two.
- head-block-128: the tied table (LM head and embedding) in int4 blocks of 128 instead of 32: a quarter
  of the scales of the matrix that is most of a decode step's bytes.
- head-block-128-mse: the same, each block's scale chosen by least squared error (`mse_codes`) instead
  of round-to-nearest.

The bundle is what `gemma3-export --model 270m --target onnx --quant int4b32 --context 2048 --no-validate`
writes, with the variant's change; its manifest says which variant it is (target_info.variant).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def separate_gate_up() -> None:
    """Siblings in pairs (the MLP's gate/up) are hidden from the stacking; q/k/v are still stacked."""
    from gemma3_export.exporters import onnx as exporter

    stack = exporter._fuse_sibling_nbits

    def fuse(graph) -> int:
        readers: dict[str, int] = {}
        for node in graph.node:
            if node.op_type == "MatMulNBits":
                readers[node.input[0]] = readers.get(node.input[0], 0) + 1
        for i, node in enumerate(graph.node):  # hide each pair from the fusion: a private input name
            if node.op_type == "MatMulNBits" and readers[node.input[0]] == 2:
                node.input[0] += f"#{i}"
        merged = stack(graph)  # (it rebuilds graph.node: restore the names on the nodes it kept)
        for node in graph.node:
            if node.op_type == "MatMulNBits" and "#" in node.input[0]:
                node.input[0] = node.input[0].rsplit("#", 1)[0]
        return merged

    exporter._fuse_sibling_nbits = fuse


def mse_codes(w, block: int, steps: int = 20):
    """Symmetric int4 codes [N, nb, block] and scales [N, nb, 1] of w [N, K] whose scale per block is the
    one of `steps` candidates (0.75x to 1.0x of the round-to-nearest scale) with the least squared error,
    then refitted by least squares to its codes (llama.cpp's make_qx_quants idea)."""
    import torch

    n, k = w.shape
    wb = w.float().view(n, k // block, block)
    hi, lo = wb.amax(-1, keepdim=True), wb.amin(-1, keepdim=True)
    base = torch.where(hi.abs() > lo.abs(), hi, lo) / -8  # the round-to-nearest scale (nbits_codes)
    best_err = torch.full_like(base, float("inf"))
    best_q, best_s = torch.zeros_like(wb), base.clone()
    for f in torch.linspace(0.75, 1.0, steps).tolist():
        s = base * f
        q = torch.round(wb / torch.where(s == 0, 1, s)).clamp(-8, 7)
        fit = (wb * q).sum(-1, keepdim=True) / (q * q).sum(-1, keepdim=True).clamp(min=1)
        s = torch.where(fit == 0, s, fit)
        err = ((wb - q * s) ** 2).sum(-1, keepdim=True)
        better = err < best_err
        best_err, best_q, best_s = torch.where(better, err, best_err), torch.where(better, q, best_q), torch.where(better, s, best_s)
    return best_q, best_s


def head_block_128(mse: bool = False) -> None:
    """The tied table (LM head and embedding) in int4 blocks of 128 (5 scales per row of 640) instead of
    32; every other matrix as int4b32 has it. Rounded as `nbits_codes` rounds (onnxruntime's quantizer's
    rounding; `mse`: the table by `mse_codes`), packed by the exporter's own `_pack_nbits`."""
    from gemma3_export.exporters import onnx as exporter

    original = exporter.quantize_nbits

    def quantize(proto, scheme, accuracy_level=None, pack=None, table_rows=None):
        if scheme != "int4b32" or pack is not None or table_rows is not None:
            return original(proto, scheme, accuracy_level, pack, table_rows)

        def rounded(block, search=False):
            codes = (lambda w: mse_codes(w, block)) if search else (lambda w: exporter.nbits_codes(w, 4, block))
            return lambda w: exporter._signed(4, *exporter._blocks_of(codes(w)))

        pack_nbits = exporter._pack_nbits  # quantize_nbits packs through it; the head gets blocks of 128
        exporter._pack_nbits = lambda graph, level, pack_of, head_pack=None: pack_nbits(graph, level, pack_of, rounded(128, mse))
        try:
            return original(proto, scheme, accuracy_level, pack=rounded(32))
        finally:
            exporter._pack_nbits = pack_nbits

    exporter.quantize_nbits = quantize


def head_pieces(rows: int) -> None:
    """The LM head split by rows into pieces of `rows` (the exporter's: 65,536, four on the 262,144-row
    vocabulary, and a Concat, so that loading never holds the whole stored table beside the packed one)."""
    from gemma3_export.exporters import onnx as exporter

    save = exporter.save
    exporter.save = lambda proto, folder, piece_rows=None: save(proto, folder, piece_rows=rows)


VARIANTS = {"separate-gate-up": separate_gate_up, "head-one-piece": lambda: head_pieces(1 << 30),
            "head-two-pieces": lambda: head_pieces(1 << 17), "head-block-128": head_block_128,
            "head-block-128-mse": lambda: head_block_128(mse=True)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("variant", choices=VARIANTS)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    VARIANTS[args.variant]()
    from gemma3_export import pipeline

    out = pipeline.export(model="270m", target="onnx", quant="int4b32", context=2048, chunk=128, out=args.out,
                          random_weights=False, validate=False)
    manifest = Path(args.out) / "manifest.json"
    m = json.loads(manifest.read_text())
    m["target_info"]["variant"] = args.variant
    manifest.write_text(json.dumps(m, indent=2) + "\n")
    print(out)


if __name__ == "__main__":
    main()
