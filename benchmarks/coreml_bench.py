"""Core ML export on the real 270M (and 1b with random weights): export time and peak memory per
stage, package size per scheme beside the report's Table 3, the fp16 activation ranges per layer on
real text, and the fp16 eager proxy against the fp32 model.

    python benchmarks/coreml_bench.py --out /tmp/coreml-bench [--models 270m] [--schemes fp16 int8 int4 int4b32]
                                      [--validate-length 700] [--json results.json]

Every export runs in a fresh process, so its peak RSS is its own (ru_maxrss at each stage's log line).
Core ML predictions need macOS: the numbers here are conversion, structure and the fp16 proxy.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

PROBE = """
import json, resource, sys, time
import psutil
model, scheme, out = sys.argv[1], sys.argv[2], sys.argv[3]
t0, proc, stages = time.perf_counter(), psutil.Process(), []
def log(msg):
    stages.append({"t": round(time.perf_counter() - t0, 1), "rss_gb": round(proc.memory_info().rss / 1e9, 2),
                   "peak_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6, 2), "msg": msg.strip()})
from gemma3_export.pipeline import export
path = export(model=model, target="coreml", quant=scheme, random_weights=model != "270m", out=out, validate=False, log=log)
m = json.loads((path / "manifest.json").read_text())
print("RESULT " + json.dumps({"model": model, "scheme": scheme, "seconds": round(time.perf_counter() - t0, 1),
    "peak_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6, 2), "stages": stages,
    "target_info": m["target_info"]}))
"""

VALIDATE = """
import json, sys, time
from gemma3_export.validate import validate_bundle
t0 = time.perf_counter()
s = validate_bundle(sys.argv[1], length=int(sys.argv[2]), log=lambda *_: None)
print("RESULT " + json.dumps({"seconds": round(time.perf_counter() - t0, 1), **{k: s[k] for k in
    ("passed", "runtime", "positions", "reference")}, "vs_reference": {k: s["vs_reference"][k] for k in
    ("max_abs", "mean_abs", "top1", "kl")}, "vs_float": {k: s["vs_float"][k] for k in ("max_abs", "mean_abs", "top1", "kl")}}))
"""


CONVERT_MEMORY = """
import json, resource, sys, torch
import numpy as np
import coremltools as ct
from gemma3_export.config import preset
from gemma3_export.exporters import coreml as X
from gemma3_export.weights import load_strict, random_state
from gemma3_export.model import Gemma3ForCausalLM
mode = sys.argv[1]
config = preset("270m").replace(num_hidden_layers=4)  # the real embedding, 4 layers
model = Gemma3ForCausalLM(config)
load_strict(model, random_state(config, 0), "random")
ep = X.trace(X.prepare(model.eval().requires_grad_(False), 256), 1)
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6
if mode == "coremltools-check":  # the same conversion without the blockwise overflow test
    from gemma3_export.numerics import op_selector, tag_precision
    tag_precision(ep, [])
    ct.convert(ep, minimum_deployment_target=ct.target.iOS18, skip_model_load=True,
               compute_precision=ct.transform.FP16ComputePrecision(op_selector=op_selector),
               inputs=[ct.TensorType(name="tokens", shape=(1, 1), dtype=np.int32),
                       ct.TensorType(name="input_pos", shape=(1,), dtype=np.int32)])
else:
    X.convert(ep, 1, mode == "fp16", [])
weights = sum(p.numel() for p in model.parameters()) * 4 / 1e9
print("RESULT " + json.dumps({"mode": mode, "fp32_weights_gb": round(weights, 2), "before_gb": round(before, 2),
      "peak_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6, 2)}))
"""


def run(script: str, *args: str) -> dict:
    out = subprocess.run([sys.executable, "-c", script, *args], capture_output=True, text=True)
    lines = [line for line in out.stdout.splitlines() if line.startswith("RESULT ")]
    if out.returncode or not lines:
        raise SystemExit(f"{args} failed:\n{out.stderr[-3000:]}")
    return json.loads(lines[-1][len("RESULT "):])


# The Gemma 3 report's Table 3, 1b weights in GB over its 1.0B parameters (Table 1), as bits per
# parameter: bf16 2.0 GB, int4 0.5, int4 blocks=32 0.7, 8-bit (sfp8) 1.0.
TABLE3_1B_BITS = {"fp16": ("bf16", 16.0), "int4": ("int4", 4.0), "int4b32": ("int4 blocks=32", 5.6), "int8": ("sfp8", 8.0)}


def report(exports: list[dict], validation: dict | None) -> str:
    lines = ["| model | scheme | export s | peak RSS GB | package MiB | weight.bin MiB | weight bits/param | Table 3 (1b) |",
             "|---|---|---|---|---|---|---|---|"]
    for e in exports:
        pkg = e["target_info"]["package"]
        params = sum(v for k, v in pkg["weight_elements"].items() if k in ("float16", "float32", "int8", "int4"))
        stored = sum(v for k, v in pkg["weight_elements"].items() if k in ("int8", "int4"))
        n = stored or params
        lines.append(f"| {e['model']} | {e['scheme']} | {e['seconds']:.0f} | {e['peak_gb']:.1f} | "
                     f"{pkg['size_bytes'] / 2**20:.1f} | {pkg['weight_file_bytes'] / 2**20:.1f} | "
                     f"{8 * pkg['weight_file_bytes'] / n:.2f} | {'%s %.1f' % TABLE3_1B_BITS.get(e['scheme'], ('-', 0))} |")
    lines += ["", "Stages (seconds since start, peak RSS GB at that point):"]
    for e in exports:
        stages = "; ".join(f"{s['t']:.0f}s {s['peak_gb']:.1f}GB {s['msg'][:48]}" for s in e["stages"])
        lines.append(f"- {e['model']} {e['scheme']}: {stages}")
    fp16 = next((e for e in exports if e["scheme"] == "fp16"), None)
    if fp16:
        n = fp16["target_info"]["numerics"]
        lines += ["", f"fp16 activations on {n['tokens']} tokens of real text (largest |x|; fp16 max {n['limit']:.0f}; "
                  f"blocks kept in fp32: {n['fp32_blocks'] or 'none'}):", "",
                  "| layer | residual (fp32) | norms (fp32 out) | attention (fp16) | MLP (fp16) | KV cache (fp16 state) |",
                  "|---|---|---|---|---|---|"]
        for row in n["layers"]:
            lines.append(f"| {row['layer']} | {row['residual']:.4g} | {row['norm']:.4g} | {row['attention']:.4g} | "
                         f"{row['mlp']:.4g} | {row['kv']:.4g} |")
        lines.append(f"| other | {json.dumps(n['other'])} | | | | |")
    if validation:
        lines += ["", f"fp16 proxy validation ({validation['runtime']}), {validation['positions']} positions, "
                  f"{validation['seconds']:.0f} s: vs {validation['reference']} {validation['vs_reference']}, "
                  f"vs fp32 {validation['vs_float']}"]
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="folder for the bundles")
    p.add_argument("--models", nargs="+", default=["270m"])
    p.add_argument("--schemes", nargs="+", default=["fp16", "int8", "int4", "int4b32"])
    p.add_argument("--validate-length", type=int, default=0, help="positions for the 270M fp16 proxy validation")
    p.add_argument("--json", help="write all results here")
    p.add_argument("--conversion-memory", action="store_true",
                   help="only: peak RSS converting a 4-layer 270M-shaped decode step, fp32 / fp16 / fp16 with "
                        "coremltools' own overflow test")
    args = p.parse_args()
    if args.conversion_memory:
        for mode in ("fp32", "fp16", "coremltools-check"):
            print(json.dumps(run(CONVERT_MEMORY, mode)))
        return
    exports, validation = [], None
    for model in args.models:
        for scheme in args.schemes:
            out = Path(args.out) / f"{model}-{scheme}"
            cached = out.with_suffix(".bench.json")  # rerunning the script reuses finished exports
            if not cached.exists():
                cached.write_text(json.dumps(run(PROBE, model, scheme, str(out))))
            exports.append(json.loads(cached.read_text()))
            print(f"{model} {scheme}: {exports[-1]['seconds']} s, peak {exports[-1]['peak_gb']} GB", file=sys.stderr)
            if model == "270m" and scheme == "fp16" and args.validate_length:
                validation = run(VALIDATE, str(out), str(args.validate_length))
    if args.json:
        Path(args.json).write_text(json.dumps({"exports": exports, "validation": validation}, indent=1))
    print(report(exports, validation))


if __name__ == "__main__":
    main()
