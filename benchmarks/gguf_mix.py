"""Can a mix of the GGUF's own 8-bit blocks and 4-bit round-to-nearest reach llama.cpp's agreement at
<= 260 MB on ONNX (issue 10)? Eager simulations of candidate mixes on the real 270M, teacher-forced
over the bundled validation text, against the float model (the GGUF dequantized).

    python benchmarks/gguf_mix.py [--length 512] [--json docs/gguf_mix.json]

Each mix is the `gguf` scheme's reference model (`exporters/onnx.py::simulate`: the file's blocks,
int8 activations per block as accuracy_level 4 computes) with some tensors rounded again to int4
(MatMulNBits' symmetric grid), and the artifact size that mix would have (MatMulNBits: codes plus one
fp32 scale per block; one table for the tied embedding and head).
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gemma3_export.exporters import onnx as ox  # noqa: E402
from gemma3_export.gguf_grid import read_gguf_grid  # noqa: E402
from gemma3_export.load import load_model  # noqa: E402
from gemma3_export.validate import validation_ids  # noqa: E402

EMBED = "model.embed_tokens.weight"


def size_mb(model, grid, int4: dict[str, int]) -> float:
    """MatMulNBits bytes: `int4` tensors at 4 bits + fp32 scale per block; the rest as the gguf scheme stores them."""
    total = 0
    for name, p in model.named_parameters():
        if p.dim() != 2:
            continue
        n, k = p.shape
        if name in int4:
            total += n * k // 2 + n * (k // int4[name]) * 4
        else:
            g = grid[name]
            total += n * k * g.bits // 8 + n * (k // g.block) * (4 + (1 if g.zero_points is not None else 0))
    return total / 1e6


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--length", type=int, default=512)
    ap.add_argument("--json")
    args = ap.parse_args()
    torch.set_num_threads(2)
    loaded = load_model("270m", log=lambda *_: None)
    grid = read_gguf_grid(loaded.gguf_path)
    ids = torch.tensor([validation_ids(loaded.tokenizer, args.length)])
    with torch.no_grad():
        ref = loaded.model(ids)[0].log_softmax(-1)
    base = ox.simulate(loaded.model, "gguf", grid)
    layers = [n for n, p in base.named_parameters() if p.dim() == 2 and n != EMBED]
    mixes = {"gguf (every tensor its own blocks)": {},
             "embedding/head int4 block 32": {EMBED: 32},
             "embedding/head int4 block 16": {EMBED: 16},
             "every layer tensor int4 block 32": dict.fromkeys(layers, 32)}
    rows = []
    for label, int4 in mixes.items():
        model = copy.deepcopy(base)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name in int4:
                    p.copy_(ox.fake_nbits(p, 4, int4[name]))
            got = model(ids)[0].log_softmax(-1)
        row = {"mix": label, "size_mb": round(size_mb(base, grid, int4), 1),
               "top1": round(float((got.argmax(-1) == ref.argmax(-1)).float().mean()), 4),
               "kl": round(float((ref.exp() * (ref - got)).sum(-1).mean()), 4)}
        rows.append(row)
        print(json.dumps(row), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps({"command": " ".join(["python", *sys.argv]), "length": args.length,
                                               "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
