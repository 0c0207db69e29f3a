"""ExecuTorch on the real Gemma 3 270M: export cost, .pte size, speed and memory on 2 threads, parity
with the float model, and what ExecuTorch's stock C++ LLM runner writes for a plain prompt; optionally
onnxruntime artifacts measured the same way in the same run.

    python benchmarks/executorch_bench.py [--schemes fp32 8da4w] [--onnx fp32 int4b32] [--threads 2]
        [--repeats 3] [--context 2048] [--chunk 128] [--out bench] [--json FILE]
        [--model 1b --random-weights --export-only]    # export cost of a larger model

Every export, speed run and stock-runner run is a fresh subprocess, so its peak RSS (ru_maxrss) is its
own. Speeds are medians over `--repeats`; schemes are compared as ratios within the same run. Parity is
`validate_bundle` (the same comparison `gemma3-export validate` runs): teacher-forced over the bundled
text across three sliding windows, against the float eager model (and the eager 8da4w model).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from gemma3_export.bundle import read_bundle  # noqa: E402

PROMPT = "The capital of France is Paris. The capital of Germany is"


def child(code: str, *args: str) -> dict:
    """Run `code` in a fresh interpreter; its last stdout line is a JSON object."""
    out = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True)
    if out.returncode:
        raise RuntimeError(out.stderr[-3000:])
    return json.loads(out.stdout.strip().splitlines()[-1])


EXPORT = """
import json, resource, sys, time
from gemma3_export import pipeline
marks = []
t = time.perf_counter()
out = pipeline.export(model=sys.argv[1], target=sys.argv[7], quant=sys.argv[2], context=int(sys.argv[3]),
                      chunk=int(sys.argv[4]), out=sys.argv[5], random_weights=sys.argv[6] == "1", validate=False,
                      max_size=sys.argv[8] if len(sys.argv) > 8 else None,
                      log=lambda m: marks.append((time.perf_counter() - t, m)))
load_s = next(s for s, m in marks if m.startswith("loaded"))
print(json.dumps({"total_s": time.perf_counter() - t, "load_s": load_s,
                  "export_s": time.perf_counter() - t - load_s,
                  "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e3}))
"""

SPEED = """
import json, resource, statistics, sys, time
import numpy as np
from gemma3_export.bundle import read_bundle
from gemma3_export.pipeline import RUNTIMES, _resolve
from gemma3_export.validate import validation_ids
from gemma3_export.tokenizer import Tokenizer
b = read_bundle(sys.argv[1])
threads, repeats, new = int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
t = time.perf_counter()
runner = _resolve(RUNTIMES, b.target).from_bundle(b, threads=threads)
load_s = time.perf_counter() - t
ids = validation_ids(Tokenizer(b.tokenizer_path), runner.chunk)
prefill, decode = [], []
for _ in range(repeats):
    runner.reset()
    t = time.perf_counter()
    logits = runner.prefill(ids)  # one forward of T = chunk
    prefill.append(len(ids) / (time.perf_counter() - t))
    t = time.perf_counter()
    for _ in range(new):
        logits = runner.decode(int(np.argmax(logits)))
    decode.append(new / (time.perf_counter() - t))
print(json.dumps({"load_s": load_s, "prefill_tok_s": statistics.median(prefill),
                  "decode_tok_s": statistics.median(decode), "prompt_tokens": len(ids), "decode_tokens": new,
                  "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e3}))
"""

STOCK = """
import json, resource, sys
import executorch.kernels.quantized  # the quantized embedding kernels, as the phone builds link them
from executorch.extension.llm.runner import GenerationConfig, TextLLMRunner
from executorch.extension.pybindings.portable_lib import _unsafe_reset_threadpool
from gemma3_export.bundle import read_bundle
b = read_bundle(sys.argv[1])
_unsafe_reset_threadpool(int(sys.argv[2]))
runner = TextLLMRunner(str(b.artifact), str(b.tokenizer_path))
pieces, stats = [], []
config = GenerationConfig(echo=False, max_new_tokens=int(sys.argv[4]), temperature=0.0, num_bos=1)
runner.generate(sys.argv[3], config, token_callback=pieces.append,
                stats_callback=lambda s: stats.append(s.to_json_string()))
s = json.loads(stats[-1])
print(json.dumps({"text": "".join(pieces), "stats": s,
                  "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e3}))
"""

VALIDATE = """
import json, sys
from gemma3_export.validate import validate_bundle
s = validate_bundle(sys.argv[1], length=int(sys.argv[2]) or None, log=lambda *_: None)
print(json.dumps({k: s[k] for k in ("passed", "reference", "positions", "vs_reference", "vs_float")}))
"""


def bench_scheme(args, scheme: str, target: str = "executorch") -> dict:
    out = Path(args.out) / f"gemma3-{args.model}-{target}-{scheme}"
    row: dict = {"target": target, "scheme": scheme, "bundle": str(out)}
    if args.skip_export and (out / "manifest.json").exists():  # export figures from the run that wrote it
        row["export"] = args.previous.get(str(out))
        print(f"[{target} {scheme}] reusing {out}", flush=True)
    else:
        print(f"[{target} {scheme}] exporting {args.model} ...", flush=True)
        row["export"] = child(EXPORT, args.model, scheme, str(args.context), str(args.chunk), str(out),
                              "1" if args.random_weights else "0", target)
    row["pte_mb"] = read_bundle(out).artifact_bytes / 1e6
    print(f"[{target} {scheme}] {row['export']}, {row['pte_mb']:.1f} MB", flush=True)
    if args.export_only:
        return row
    row["speed"] = child(SPEED, str(out), str(args.threads), str(args.repeats), str(args.decode_tokens))
    print(f"[{target} {scheme}] speed {row['speed']}", flush=True)
    if target == "executorch":
        row["stock"] = child(STOCK, str(out), str(args.threads), PROMPT, "16")
        print(f"[{scheme}] stock runner: {row['stock']['text']!r}", flush=True)
    if not args.no_parity and target == "executorch":  # onnx parity: benchmarks/onnx_bench.py
        row["parity"] = child(VALIDATE, str(out), str(args.parity_positions))
        vf = row["parity"]["vs_float"]
        print(f"[{target} {scheme}] vs float: top-1 {vf['top1']:.3f} (worst band), KL {vf['kl']:.3g} (worst band), "
              f"max abs {vf['max_abs']:.3g}", flush=True)
    return row


def table(rows: list[dict]) -> str:
    base = rows[0]
    lines = ["| target | scheme | artifact MB | export s (load excl.) | export peak RSS MB | prefill tok/s "
             "| decode tok/s | run peak RSS MB | top-1 vs float | KL vs float |", "|---" * 10 + "|"]
    for r in rows:
        e, s = r["export"], r.get("speed")
        p = r.get("parity", {}).get("vs_float")
        lines.append(
            f"| {r['target']} | {r['scheme']} | {r['pte_mb']:.0f} | "
            + (f"{e['export_s']:.0f} | {e['peak_rss_mb']:.0f} | " if e else "- | - | ")
            + (f"{s['prefill_tok_s']:.0f} ({s['prefill_tok_s'] / base['speed']['prefill_tok_s']:.2f}x) | "
               f"{s['decode_tok_s']:.1f} ({s['decode_tok_s'] / base['speed']['decode_tok_s']:.2f}x) | "
               f"{s['peak_rss_mb']:.0f} | " if s else "- | - | - | ")
            + (f"{p['top1']:.3f} | {p['kl']:.3g} |" if p else "- | - |")
        )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="270m")
    ap.add_argument("--random-weights", action="store_true")
    ap.add_argument("--schemes", nargs="+", default=["fp32", "8da4w"])
    ap.add_argument("--onnx", nargs="*", default=[], help="onnxruntime schemes to run side by side (e.g. fp32 int4b32)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--decode-tokens", type=int, default=32)
    ap.add_argument("--context", type=int, default=2048)
    ap.add_argument("--chunk", type=int, default=128)
    ap.add_argument("--out", default="bench")
    ap.add_argument("--export-only", action="store_true", help="export cost only (e.g. 1b, random weights)")
    ap.add_argument("--no-parity", action="store_true")
    ap.add_argument("--parity-positions", type=int, default=0, help="validate over N positions (default: 3 windows)")
    ap.add_argument("--skip-export", action="store_true",
                    help="reuse bundles in --out (their export figures from --previous-json, if given)")
    ap.add_argument("--previous-json", help="an earlier --json whose export figures the reused bundles keep")
    ap.add_argument("--json")
    args = ap.parse_args()
    previous = json.loads(Path(args.previous_json).read_text())["rows"] if args.previous_json else []
    args.previous = {r["bundle"]: r["export"] for r in previous}
    start = time.time()
    rows = [bench_scheme(args, s) for s in args.schemes] + [bench_scheme(args, s, "onnx") for s in args.onnx]
    result = {"model": args.model, "threads": args.threads, "load_avg_at_end": os.getloadavg(),
              "wall_s": time.time() - start, "rows": rows}
    print(table(rows))
    print(f"machine load average at the end: {result['load_avg_at_end']}")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
