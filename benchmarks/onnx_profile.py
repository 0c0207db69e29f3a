"""Where an ONNX bundle's time goes, from onnxruntime's own profiler (docs/benchmarks.md, issue 9):

    python benchmarks/onnx_profile.py [--bundle bundles/bench-onnx/270m-int4b32] [--threads 2] [--decode 32]
        [--decomposed BUNDLE] [--json FILE]

The bundle's runner (gemma3_export.runtimes.onnx.OnnxRunner, the same IOBinding of the caches) gets a
session with `enable_profiling`; one 128-token prefill chunk and `--decode` decode steps run, and the
trace's node events are summed per bucket and phase: the LM head (the MatMulNBits whose weight has one
row per vocabulary entry), the other int4 linears, attention (score and value MatMuls, Softmax, masks,
cache writes, or GroupQueryAttention), the RMSNorms (decomposed, or fused with or without the residual
Add), the rest; plus the share of a run's wall
time that no kernel accounts for (per-node dispatch), and the LM head's output shape in prefill (all
positions or one). Then, alternating round by round, prefill and decode rates of: the runner as it is
(its threads spin-wait, onnxruntime's default); the same without spinning; with `--decomposed`,
another bundle of the same weights (e.g. one exported before GroupQueryAttention) with spinning.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

ATTENTION = {"MatMul", "Softmax", "Where", "ScatterElements", "And", "LessOrEqual", "Mod", "Sub", "GroupQueryAttention"}
NORM = {"Pow", "ReduceMean", "Sqrt", "Reciprocal", "SimplifiedLayerNormalization", "SkipSimplifiedLayerNormalization"}


def runner_with(bundle: str, threads: int, **options):
    """The bundle's OnnxRunner, its session rebuilt with extra SessionOptions / config entries."""
    import onnxruntime as ort

    from gemma3_export.bundle import read_bundle
    from gemma3_export.runtimes.onnx import OnnxRunner

    runner = OnnxRunner.from_bundle(read_bundle(bundle), threads=threads)
    so = ort.SessionOptions()
    so.intra_op_num_threads, so.inter_op_num_threads = threads, 1
    so.add_session_config_entry("session.intra_op.allow_spinning", options.pop("spin", "1"))
    for key, value in options.items():
        setattr(so, key, value)
    runner.session = ort.InferenceSession(str(read_bundle(bundle).artifact), so, providers=["CPUExecutionProvider"])
    runner.binding = runner.session.io_binding()
    runner._alloc()
    return runner


def head_nodes(bundle: str, vocab: int) -> set[str]:
    import onnx

    from gemma3_export.bundle import read_bundle

    g = onnx.load(str(read_bundle(bundle).artifact), load_external_data=False).graph
    big = {i.name for i in g.initializer if i.dims and i.dims[0] == vocab}
    return {n.name for n in g.node if n.op_type.startswith("MatMul") and  # the head whole, or its pieces
            (any(x in big for x in n.input) or (len(n.input) > 1 and n.input[1].startswith("head_t")))}


def bucket(op: str, node: str, head: set[str]) -> str:
    if node in head:
        return "lm_head"
    if op == "MatMulNBits":
        return "int4 linears"
    if op in ATTENTION:
        return "attention"
    if op in NORM:
        return "rmsnorm"
    return "rest"


def summarize(trace: list[dict], head: set[str]) -> dict:
    """Per phase (the first model run = prefill, the others = decode): ms per run in each bucket."""
    runs = sorted((e for e in trace if e.get("name") == "model_run"), key=lambda e: e["ts"])
    phases = {"prefill": runs[:1], "decode": runs[1:]}
    out = {}
    for phase, rs in phases.items():
        spans = [(r["ts"], r["ts"] + r["dur"]) for r in rs]
        ms, nodes, head_shape = defaultdict(float), 0, None
        for e in trace:
            if e.get("cat") != "Node" or not e.get("name", "").endswith("_kernel_time"):
                continue
            if not any(a <= e["ts"] <= b for a, b in spans):
                continue
            name = e["name"][: -len("_kernel_time")]
            ms[bucket(e["args"].get("op_name", ""), name, head)] += e["dur"] / 1000
            nodes += 1
            if name in head and head_shape is None:
                head_shape = e["args"].get("output_type_shape")
        wall = sum(r["dur"] for r in rs) / 1000
        kernels = sum(ms.values())
        n = max(len(rs), 1)
        out[phase] = {"runs": len(rs), "wall_ms_per_run": wall / n, "kernel_ms_per_run": kernels / n,
                      "nodes_per_run": nodes / n, "outside_kernels_share": 1 - kernels / wall if wall else None,
                      "share_of_kernel_time": {k: v / kernels for k, v in sorted(ms.items())},
                      "ms_per_run": {k: v / n for k, v in sorted(ms.items())}, "lm_head_output_shape": head_shape}
    return out


def decode_rate(runner, prompt: list[int], steps: int) -> float:
    import numpy as np

    runner.reset()
    token = int(np.argmax(runner.prefill(prompt)))
    start = time.perf_counter()
    for _ in range(steps):
        token = int(np.argmax(runner.decode(token)))
    return steps / (time.perf_counter() - start)


def with_accuracy_level(bundle: str, level: int) -> str:
    """A copy of the bundle whose MatMulNBits nodes carry `accuracy_level=level`."""
    import shutil

    import onnx

    from gemma3_export.bundle import read_bundle

    b = read_bundle(bundle)
    out = ROOT / f"bundles/compare/{Path(bundle).name}-accuracy{level}"
    if not (out / "manifest.json").exists() or (out / "manifest.json").read_bytes() != (b.path / "manifest.json").read_bytes():
        out.mkdir(parents=True, exist_ok=True)
        model = onnx.load(str(b.artifact))
        for node in model.graph.node:
            if node.op_type == "MatMulNBits":
                for a in [a for a in node.attribute if a.name == "accuracy_level"]:
                    node.attribute.remove(a)
                node.attribute.append(onnx.helper.make_attribute("accuracy_level", level))
        onnx.save(model, str(out / b.artifact.name))
        for f in Path(bundle).iterdir():
            if f.name != b.artifact.name:
                shutil.copy(f, out / f.name)
    return str(out)


def rates(runner, prompt: list[int], steps: int) -> dict:
    import numpy as np

    runner.prefill(prompt[:8])
    runner.reset()
    start = time.perf_counter()
    logits = runner.prefill(prompt)
    prefill = len(prompt) / (time.perf_counter() - start)
    return {"prefill_tok_s": prefill, "decode_tok_s": decode_rate(runner, prompt, steps), "first": int(np.argmax(logits))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bundle", default="bundles/bench-onnx/270m-int4b32")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--decode", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3, help="rounds of the variant timings")
    ap.add_argument("--decomposed", help="another bundle to time beside it (same weights)")
    ap.add_argument("--json")
    args = ap.parse_args()
    from gemma3_export.tokenizer import Tokenizer
    from gemma3_export.bundle import read_bundle
    from gemma3_export.validate import validation_ids

    b = read_bundle(args.bundle)
    (ROOT / "bundles/compare").mkdir(parents=True, exist_ok=True)
    prompt = validation_ids(Tokenizer(b.tokenizer_path), 128)
    runner = runner_with(args.bundle, args.threads, enable_profiling=True,
                         profile_file_prefix=str(ROOT / "bundles/compare/onnx-profile"))
    runner.prefill(prompt[:8])  # warm-up, not in the trace's phases below
    runner.reset()
    warm = runner.session.end_profiling()
    runner = runner_with(args.bundle, args.threads, enable_profiling=True,
                         profile_file_prefix=str(ROOT / "bundles/compare/onnx-profile"))
    runner.prefill(prompt)
    for _ in range(args.decode):
        runner.decode(5)
    trace = json.loads(Path(runner.session.end_profiling()).read_text())
    result = {"bundle": args.bundle, "threads": args.threads,
              **summarize(trace, head_nodes(args.bundle, b.manifest["outputs"][0]["shape"][-1]))}
    Path(warm).unlink(missing_ok=True)
    variants = {"as exported": (args.bundle, "1"), "no spinning": (args.bundle, "0"),
                **({"--decomposed": (args.decomposed, "1")} if args.decomposed else {})}
    runs: dict[str, list] = {k: [] for k in variants}
    for _ in range(args.repeats):  # alternate the variants round by round
        for name, (bundle, spin) in variants.items():
            runs[name].append(rates(runner_with(bundle, args.threads, spin=spin), prompt, args.decode))
    result["variants"] = {k: {m: statistics.median(r[m] for r in v) for m in ("prefill_tok_s", "decode_tok_s")}
                          | {"same_first_token": v[0]["first"] == runs["as exported"][0]["first"]} for k, v in runs.items()}
    result["load_average_at_end"] = __import__("os").getloadavg()
    print(json.dumps(result, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
