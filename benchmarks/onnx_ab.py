"""Two ONNX bundles of the same model, step against step in one process (docs/benchmarks.md, issue 9):

    python benchmarks/onnx_ab.py BUNDLE_A BUNDLE_B [--steps 200] [--threads 2] [--spin 0|1] [--json FILE]

Process-level rounds on a shared 2-core machine move by 10% from one minute to the next, more than a
graph change is worth. Here both runners are made in one process, prefill the same 128-token prompt,
and then decode alternately, one step of A, one step of B (the order swapped every step), so slow
spells of the machine fall on both. Reported: the median and mean step time of each, the median of
the per-pair ratios B / A, and the share of pairs in which B was faster.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("a")
    ap.add_argument("b")
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--spin", type=int, default=1, help="threads spin-wait (the runner's default)")
    ap.add_argument("--json")
    args = ap.parse_args()
    import numpy as np

    from gemma3_export.bundle import read_bundle
    from gemma3_export.runtimes.onnx import OnnxRunner
    from gemma3_export.tokenizer import Tokenizer
    from gemma3_export.validate import validation_ids

    runners = [OnnxRunner.from_bundle(read_bundle(p), threads=args.threads, spin=bool(args.spin)) for p in (args.a, args.b)]
    prompt = validation_ids(Tokenizer(read_bundle(args.a).tokenizer_path), 128)
    tokens = []
    for r in runners:
        r.prefill(prompt[:8])  # warm-up
        r.reset()
        tokens.append(int(np.argmax(r.prefill(prompt))))
    times: list[list[float]] = [[], []]
    for step in range(args.steps):
        for i in ((0, 1) if step % 2 == 0 else (1, 0)):
            start = time.perf_counter()
            tokens[i] = int(np.argmax(runners[i].decode(tokens[i])))
            times[i].append(time.perf_counter() - start)
    ratios = [b / a for a, b in zip(*times)]
    result = {"a": args.a, "b": args.b, "steps": args.steps, "threads": args.threads, "spin": bool(args.spin),
              **{f"{k}_ms": {"median": 1000 * statistics.median(t), "mean": 1000 * statistics.mean(t)}
                 for k, t in zip("ab", times)},
              "median_ratio_b_over_a": statistics.median(ratios),
              "b_faster_share": sum(r < 1 for r in ratios) / len(ratios),
              "load_average_at_end": __import__("os").getloadavg()}
    print(json.dumps(result, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
