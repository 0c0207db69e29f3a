"""Core ML's weight grids on the real 270M, and `--max-size` on them (issue 10): eager simulations
(exporters/coreml.py::simulate, fp32 compute; the package computes in fp16, which costs nothing
measurable here) scored as gguf_mix.py scores: top-1 agreement and KL against the float model over
512 teacher-forced positions of the bundled validation text. Size: `package_bytes`, the estimate
`--max-size` works with (an upper bound of the package).

    python benchmarks/coreml_table_split.py [--budget 260MB] [--json docs/coreml_table_split.json]

The split rows are the ones `--max-size BUDGET` picks (the same ranking and calibration cache as the
export: pipeline._calibrate).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from gguf_mix import score, write  # noqa: E402  (the same scoring)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--length", type=int, default=512)
    ap.add_argument("--budget", default="260MB")
    ap.add_argument("--json")
    args = ap.parse_args()
    from gemma3_export.exporters import coreml as cm
    from gemma3_export.load import load_model
    from gemma3_export.pipeline import _calibrate, parse_size
    from gemma3_export.validate import validation_ids

    torch.set_num_threads(2)
    loaded = load_model("270m", log=lambda *_: None)
    model = loaded.model
    ids = torch.tensor([validation_ids(loaded.tokenizer, args.length)])
    with torch.no_grad():
        ref = model(ids)[0].log_softmax(-1)
    order = _calibrate(loaded, "270m", None, None, ROOT / "bundles/calibration", log=print)["table_order"]
    budget = parse_size(args.budget)
    rows = []
    for scheme in ("int8", "int8b32", "int4b32"):
        rows.append({"scheme": scheme, "int4_rows": 0, "size_mb": round(cm.package_bytes(model, scheme) / 1e6, 1),
                     **score(cm.simulate(model, scheme), {}, ids, ref)})
        print(rows[-1], flush=True)
    for scheme in ("int8", "int8b32"):
        split = cm.rows_within(model, scheme, budget, order, print)  # order: called when a split is needed
        rows.append({"scheme": f"{scheme} --max-size {args.budget}", "int4_rows": len(split),
                     "size_mb": round(cm.package_bytes(model, scheme, len(split)) / 1e6, 1),
                     **score(cm.simulate(model, scheme, split), {}, ids, ref)})
        print(rows[-1], flush=True)
    write(args.json, args.length, rows)


if __name__ == "__main__":
    main()
