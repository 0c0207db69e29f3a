"""The memory table (docs/memory.md): Table 3 of the report beside this project's analytic figures,
with measured rows for the real 270M and a random-weight 1B, both int4b32 with a 32,768-token cache.

    python benchmarks/memory_table.py [--work bundles/bench-onnx] [--context 32768]

Exports the bundles it lacks in child processes (wall time and the child's peak RSS: the 1B export
must fit in 16 GB), then runs `gemma3-export memory` on them (each measured in a fresh process with
its cache written to `--context` tokens) and writes docs/memory.json, docs/memory_table.md,
docs/memory_kv.svg and docs/memory_exports.json.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from onnx_bench import export_bundle  # noqa: E402

from gemma3_export.memory import memory_report  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--work", default="bundles/bench-onnx")
    p.add_argument("--context", type=int, default=32768)
    p.add_argument("--out", default="docs")
    args = p.parse_args()
    work = (ROOT / args.work).resolve()
    work.mkdir(parents=True, exist_ok=True)
    exports = {}
    wanted = [
        ("270m", f"int4b32-{args.context // 1024}k", (f"context={args.context}",)),
        ("1b", f"random-int4b32-{args.context // 1024}k", (f"context={args.context}", "random_weights=true")),
    ]
    bundles = []
    for model, name, extra in wanted:
        bundle = work / f"{model}-{name}"
        if not (bundle / "manifest.json").exists():
            exports[f"{model}-{name}"] = export_bundle(work, "int4b32", model=model, name=name, extra=extra)
            print(f"export {model}-{name}: {exports[f'{model}-{name}']}", file=sys.stderr)
        bundles.append(str(bundle))
    out = ROOT / args.out
    result = memory_report(bundles, args.context, log=lambda m: print(m, file=sys.stderr), out=out)
    if exports:
        (out / "memory_exports.json").write_text(json.dumps(exports, indent=2))
    for m in result["measured"]:
        ok = abs(m["kv_measured_over_analytic"] - 1) <= 0.10
        print(f"{m['model']}: measured KV / analytic {m['kv_measured_over_analytic']:.3f} ({'within' if ok else 'NOT within'} 10%)",
              file=sys.stderr)


if __name__ == "__main__":
    main()
