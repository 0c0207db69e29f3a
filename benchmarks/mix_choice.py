"""Does the sensitivity step choose well? (issue 10) `--max-size` on ONNX int4b32 / int4b32-asym raises
what its int4 rounding costs the most KL per extra byte to int8 blocks of 32: layer matrices, and the
tied table's rows in their ranked order (exporters/onnx.py::choose_mix, gemma3_export/sensitivity.py).
Here, on the real 270M, the same extra bytes spent three ways:

- sensitivity: what `--max-size` picks (KL measured on 4 x 96 tokens sampled from the float model, rows
  ranked on 16 x 96: the export's own calibration, cached in bundles/calibration);
- in layer order: the first layers' matrices first (a hand rule: early layers matter most), then the
  table's rows, ranked as above;
- by size: the largest matrices first (the whole table, then the MLPs).

Each mix is scored as the export would run it (`onnx.simulate`: the stored grid and int8 activations),
teacher-forced over the bundled validation text against the float model: top-1 agreement and mean KL.

    python benchmarks/mix_choice.py [--scheme int4b32-asym] [--extra-mb 25 50 85] [--length 512] [--json F]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from gemma3_export import sensitivity  # noqa: E402
from gemma3_export.exporters import onnx as ox  # noqa: E402
from gemma3_export.load import load_model  # noqa: E402
from gemma3_export.pipeline import _calibrate  # noqa: E402
from gemma3_export.validate import validation_ids  # noqa: E402


def score(model, scheme: str, raised: list[str], rows: int, order, ids, ref) -> dict:
    """The mix as the export stores it: `raised` matrices at int8; the table's first `rows` ranked rows
    at int8 and the rest at int4 (a split), or all int4 (rows 0)."""
    int4_rows = np.sort(order[rows:]) if 0 < rows < len(order) else None
    raised = [*raised, ox.EMBED] if rows else raised
    with torch.no_grad():
        got = ox.simulate(model, scheme, raised=raised, int4_rows=int4_rows)(ids)[0].log_softmax(-1)
    return {"top1": round(float((got.argmax(-1) == ref.argmax(-1)).float().mean()), 4),
            "kl": round(float((ref.exp() * (ref - got)).sum(-1).mean()), 4)}


def fill(order: list[str], extra: dict[str, int], room: int) -> list[str]:
    chosen = []
    for name in order:
        if extra[name] <= room:
            chosen.append(name)
            room -= extra[name]
    return chosen


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--scheme", default="int4b32-asym", choices=ox.MIX_SCHEMES)
    ap.add_argument("--extra-mb", type=float, nargs="+", default=[25, 50, 85])
    ap.add_argument("--length", type=int, default=512)
    ap.add_argument("--json")
    args = ap.parse_args()
    torch.set_num_threads(2)
    loaded = load_model("270m", log=lambda *_: None)
    model = loaded.model
    ids = torch.tensor([validation_ids(loaded.tokenizer, args.length)])
    with torch.no_grad():
        ref = model(ids)[0].log_softmax(-1)
    ranked = _calibrate(loaded, "270m", None, None, ROOT / "bundles/calibration", log=print)
    order = np.asarray(ranked["table_order"]())
    tokens = ranked["calibration"]()[: sensitivity.SENSITIVITY_SEQUENCES]
    weights = sensitivity.matrices(model)
    extra = ox.raise_costs(args.scheme, weights)
    vocab, hidden = weights[ox.EMBED].shape
    kept, small = ox.split_row_bytes(8, 32, hidden, False)
    start = time.perf_counter()
    kl, table_kl, _, _ = ox.choose_mix(model, args.scheme, tokens, order, 0, log=print)
    seconds = time.perf_counter() - start
    top = sorted(kl, key=kl.get, reverse=True)[:10]
    print("table:", json.dumps(table_kl), "most sensitive:", json.dumps({n: round(kl[n], 5) for n in top}))
    layers = [n for n in weights if n != ox.EMBED]
    by_size = sorted(weights, key=lambda n: -extra[n])
    rows = [{"extra_mb": 0, "choice": "none (every matrix int4)", "raised": 0, "table_rows": 0,
             **score(model, args.scheme, [], 0, order, ids, ref)}]
    print(json.dumps(rows[-1]), flush=True)
    for mb in args.extra_mb:
        room = int(mb * 1e6)
        chosen, n8 = sensitivity.plan(kl, {n: extra[n] for n in layers}, table_kl, kept - small, 4 * vocab, room)
        in_order = fill(layers, extra, room)
        left = room - sum(extra[n] for n in in_order) - 4 * vocab
        order_rows = min(vocab, max(0, left) // (kept - small))
        sized = fill(by_size, extra, room)
        for label, raised, n in (("sensitivity (--max-size)", chosen, n8),
                                 ("in layer order, then table rows", in_order, order_rows),
                                 ("by size, largest first", [m for m in sized if m != ox.EMBED],
                                  vocab if ox.EMBED in sized else 0)):
            used = sum(extra[m] for m in raised) + (n * (kept - small) + (4 * vocab if n < vocab else 0) if n else 0)
            rows.append({"extra_mb": mb, "choice": label, "raised": len(raised), "table_rows": int(n),
                         "used_mb": round(used / 1e6, 1), **score(model, args.scheme, raised, n, order, ids, ref)})
            print(json.dumps(rows[-1]), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps({
            "command": "python benchmarks/mix_choice.py " + " ".join(sys.argv[1:]),
            "scheme": args.scheme, "positions": args.length, "sensitivity_seconds": round(seconds, 1),
            "table_kl": {str(n): round(v, 5) for n, v in table_kl.items()},
            "most_sensitive": {n: round(kl[n], 5) for n in top}, "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
