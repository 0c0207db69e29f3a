"""Where an ONNX bundle's peak resident memory goes, and what session-side changes give (issue 9):
onnxruntime's CPU memory arena off, its weight prepacking off (`session.disable_prepacking`: the
kernels' packed copies of the weights are not made), and with `--before` the same model in an earlier
layout (the weights inside model.onnx, the gather and the head on one table initializer). Each
variant in a fresh process, alternating, on 2 threads: VmHWM after `import` + session creation, and
after the compare.py-like workload (a 128-token prefill, 64 decode steps, a 1024-token prefill).

    python benchmarks/onnx_session_memory.py BUNDLE [--before BUNDLE] [--repeats 2] [--json docs/onnx_session_memory.json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path


def vm_hwm_gb() -> float:
    line = next(line for line in open("/proc/self/status") if line.startswith("VmHWM"))
    return int(line.split()[1]) / 1e6


def child(bundle: str, mode: str) -> None:
    import numpy as np
    import onnxruntime as ort

    after_import = vm_hwm_gb()
    if mode != "default":  # the runner's session options, with the arena or the prepacking off
        base = ort.SessionOptions

        class Changed(base):
            def __init__(self):
                super().__init__()
                if mode == "no-arena":
                    self.enable_cpu_mem_arena = False
                else:
                    self.add_session_config_entry("session.disable_prepacking", "1")

        ort.SessionOptions = Changed
    from gemma3_export.bundle import read_bundle
    from gemma3_export.runtimes.onnx import OnnxRunner

    runner = OnnxRunner.from_bundle(read_bundle(bundle), threads=2)
    after_load = vm_hwm_gb()
    runner.prefill([2] + list(range(1000, 1127)))
    start, token = time.perf_counter(), 5
    for _ in range(64):
        token = int(np.argmax(runner.decode(token)))
    decode = 64 / (time.perf_counter() - start)
    runner.reset()
    start = time.perf_counter()
    runner.prefill([2] + list(range(2000, 3023)))
    print(json.dumps({"import_gb": after_import, "load_gb": after_load, "peak_gb": vm_hwm_gb(), "decode_tok_s": decode,
                      "prefill_1024_tok_s": 1024 / (time.perf_counter() - start)}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("bundle")
    ap.add_argument("--before", help="the same model exported in an earlier layout (e.g. bundles/kept/onnx-int4b32-one-file)")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--json")
    ap.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(*args.child)
    variants = {"as exported": (args.bundle, "default"), "arena off": (args.bundle, "no-arena"),
                "prepacking off": (args.bundle, "no-prepack")}
    if args.before:
        variants["before (--before)"] = (args.before, "default")
    runs: dict[str, list[dict]] = {name: [] for name in variants}
    for _ in range(args.repeats):
        for name, (bundle, mode) in variants.items():
            out = subprocess.run([sys.executable, __file__, args.bundle, "--child", bundle, mode],
                                 capture_output=True, text=True, check=True)
            runs[name].append(json.loads(out.stdout.splitlines()[-1]))
            print(name, runs[name][-1], f"load average {os.getloadavg()[0]:.2f}", flush=True)
    result = {"command": " ".join(["python", *sys.argv]), "bundle": args.bundle,
              "medians": {name: {k: round(statistics.median(r[k] for r in rs), 3) for k in rs[0]} for name, rs in runs.items()},
              "runs": runs}
    print(json.dumps(result["medians"], indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
