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
import functools
import json
import sys
from collections.abc import Callable
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


def setup(length: int):
    """The real 270M: its GGUF grid, `length` validation ids, the float model's log-probabilities and
    the `gguf` reference model (what every mix starts from)."""
    torch.set_num_threads(2)
    loaded = load_model("270m", log=lambda *_: None)
    grid = read_gguf_grid(loaded.gguf_path)
    ids = torch.tensor([validation_ids(loaded.tokenizer, length)])
    with torch.no_grad():
        ref = loaded.model(ids)[0].log_softmax(-1)
    return grid, ids, ref, ox.simulate(loaded.model, "gguf", grid)


def score(base, rounding: dict[str, Callable], ids, ref) -> dict:
    """Top-1 agreement and mean KL against `ref` of `base` with the named tensors rounded again."""
    model = copy.deepcopy(base)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name in rounding:
                p.copy_(rounding[name](p))
        got = model(ids)[0].log_softmax(-1)
    return {"top1": round(float((got.argmax(-1) == ref.argmax(-1)).float().mean()), 4),
            "kl": round(float((ref.exp() * (ref - got)).sum(-1).mean()), 4)}


def write(path: str | None, length: int, rows: list[dict]) -> None:
    if path:
        Path(path).write_text(json.dumps({"command": " ".join(["python", *sys.argv]), "length": length,
                                          "rows": rows}, indent=1) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--length", type=int, default=512)
    ap.add_argument("--json")
    args = ap.parse_args()
    grid, ids, ref, base = setup(args.length)
    layers = [n for n, p in base.named_parameters() if p.dim() == 2 and n != EMBED]
    mixes = {"gguf (every tensor its own blocks)": {},
             "embedding/head int4 block 32": {EMBED: 32},
             "embedding/head int4 block 16": {EMBED: 16},
             "every layer tensor int4 block 32": dict.fromkeys(layers, 32)}
    rows = []
    for label, int4 in mixes.items():
        rounding = {name: functools.partial(ox.fake_nbits, bits=4, block=block) for name, block in int4.items()}
        rows.append({"mix": label, "size_mb": round(size_mb(base, grid, int4), 1), **score(base, rounding, ids, ref)})
        print(json.dumps(rows[-1]), flush=True)
    write(args.json, args.length, rows)


if __name__ == "__main__":
    main()
