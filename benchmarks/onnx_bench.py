"""ONNX on the real Gemma 3 270M: export cost, parity, speed and resident memory (docs/onnx.md).

    python benchmarks/onnx_bench.py [--work bundles/bench-onnx] [--json docs/onnx_bench.json] [--threads 2]

1. export fp32, int4b32 and gguf (the GGUF's own blocks) bundles (context 2048, chunk 128), each in a
   child process: wall time and the child's peak RSS;
2. parity (`validate_bundle`): fp32 ONNX vs the eager model; int4b32 and gguf ONNX vs the eager model
   on the same grid and vs the float model (top-1 agreement, KL), over 3+ windows;
3. speed, each in a fresh child process on `--threads` threads, median of `--repeats`: prefill
   tokens/s (a 512-token prompt in chunks of 128), decode tokens/s (64 steps), the child's peak RSS;
   for the eager model and each bundle;
4. one decode step with the cache bound in place (the runner) vs ping-pong buffers vs plain
   `session.run` with numpy caches, at position 1024, for int4b32 bundles of context 2048 and 32768;
5. fp16 headroom: the residual stream's peak vs fp16's 65,504, and the fp16 scheme vs float (eager).

`--only NAME ...` exports and compares only those bundles and keeps the rest of `--json`.
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

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
PROMPT, DECODE = 512, 64
PARTS = ["parity", "speed", "binding", "fp16"]


def run_child(argv: list[str]) -> tuple[str, float]:
    """Run this script as a child process (it reports its own peak RSS); return (stdout, wall s)."""
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, __file__, *argv], capture_output=True, text=True, cwd=ROOT)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed:\n{proc.stderr[-3000:]}")
    return proc.stdout, time.perf_counter() - start


def peak_rss_gb() -> float:
    """This process's peak resident set (VmHWM: per address space, so a parent's size before the exec
    does not count, unlike ru_maxrss)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return round(int(line.split()[1]) * 1024 / 1e9, 3)
    raise RuntimeError("no VmHWM in /proc/self/status")


def export_bundle(work: Path, quant: str, model: str = "270m", name: str | None = None, extra: tuple[str, ...] = ()) -> dict:
    out = work / f"{model}-{name or quant}"
    stdout, wall = run_child(["--child-export", model, quant, str(out), *extra])
    return {"bundle": str(out), "wall_s": round(wall, 1), **json.loads(stdout.splitlines()[-1])}


def child_export(model: str, quant: str, out: str, extra: list[str]) -> None:
    """In the child: the export through the CLI's library function, peak RSS from the kernel."""
    from gemma3_export.bundle import read_bundle
    from gemma3_export.pipeline import export

    kw = {"context": 2048, "chunk": 128}
    for item in extra:
        key, value = item.split("=")
        kw[key] = int(value) if value.isdigit() else value == "true" if value in ("true", "false") else value
    start = time.perf_counter()
    export(model=model, target="onnx", quant=quant, out=out, validate=False, log=lambda m: print(m, file=sys.stderr), **kw)
    size = read_bundle(out).artifact_bytes
    print(json.dumps({"export_s": round(time.perf_counter() - start, 1), "artifact_gb": round(size / 1e9, 3),
                      "peak_rss_gb": peak_rss_gb()}))


def child_speed(source: str, threads: int) -> None:
    """In the child: prefill and decode tokens/s of the eager model ("eager") or a bundle."""
    import numpy as np

    ids = [2] + np.random.default_rng(0).integers(300, 200000, PROMPT - 1).tolist()
    if source == "eager":
        import torch

        torch.set_num_threads(threads)
        from gemma3_export.generate import EagerRunner
        from gemma3_export.load import load_model

        runner = EagerRunner(load_model("270m", log=lambda *_: None).model, 2048, 128)
    else:
        from gemma3_export.bundle import read_bundle
        from gemma3_export.runtimes.onnx import OnnxRunner

        runner = OnnxRunner.from_bundle(read_bundle(source), threads=threads)
    runner.prefill(ids[:8])  # warm-up
    runner.reset()
    start = time.perf_counter()
    logits = runner.prefill(ids)
    prefill = time.perf_counter() - start
    token = int(np.argmax(logits))
    start = time.perf_counter()
    for _ in range(DECODE):
        token = int(np.argmax(runner.decode(token)))
    decode = time.perf_counter() - start
    print(json.dumps({"prefill_tok_s": PROMPT / prefill, "decode_tok_s": DECODE / decode, "peak_rss_gb": peak_rss_gb()}))


def child_binding(bundle: str, threads: int) -> None:
    """In the child: ms per decode step at position 1024 with three ways of passing the cache."""
    import numpy as np
    import onnxruntime as ort

    from gemma3_export.bundle import read_bundle
    from gemma3_export.runtimes.onnx import OnnxRunner

    runner = OnnxRunner.from_bundle(read_bundle(bundle), threads=threads)
    session, specs, outs = runner.session, runner.cache_specs, runner.cache_out
    pos, steps = 1024, 24
    feeds = lambda: {"tokens": np.array([[5]], np.int64), "input_pos": np.array([pos], np.int64)}  # noqa: E731

    def in_place() -> None:
        runner.pos = pos
        runner.decode(5)

    caches = [np.zeros(shape, dtype) for _, shape, dtype in specs]

    def numpy_run() -> None:  # every step copies every cache in and out through numpy
        nonlocal caches
        result = session.run(None, {**feeds(), **{name: c for (name, _, _), c in zip(specs, caches)}})
        caches = result[1:]

    ping = [[ort.OrtValue.ortvalue_from_numpy(np.zeros(shape, dtype)) for _, shape, dtype in specs] for _ in range(2)]
    binding = session.io_binding()

    def ping_pong() -> None:  # in and out are different buffers, swapped each step
        binding.bind_cpu_input("tokens", feeds()["tokens"])
        binding.bind_cpu_input("input_pos", feeds()["input_pos"])
        for (name, _, _), out, a, b in zip(specs, outs, ping[0], ping[1]):
            binding.bind_ortvalue_input(name, a)
            binding.bind_ortvalue_output(out, b)
        binding.bind_output("logits")
        session.run_with_iobinding(binding)
        ping.reverse()

    result = {"cache_mb": sum(np.prod(s) * np.dtype(d).itemsize for _, s, d in specs) / 1e6}
    for name, step in (("in_place_ms", in_place), ("ping_pong_ms", ping_pong), ("numpy_run_ms", numpy_run)):
        step()
        times = []
        for _ in range(steps):
            start = time.perf_counter()
            step()
            times.append(time.perf_counter() - start)
        result[name] = 1000 * statistics.median(times)
    print(json.dumps(result))


def child_fp16() -> None:
    """In the child: why fp16 keeps the residual stream in fp32 (its peak vs 65,504), and what the
    fp16 scheme (fp16 weights and matmuls, fp32 norms/residuals) costs in eager, over 600 tokens."""
    import torch

    from gemma3_export.exporters.onnx import simulate
    from gemma3_export.load import load_model
    from gemma3_export.validate import kl_divergence, validation_ids

    loaded = load_model("270m", log=lambda *_: None)
    model, ids = loaded.model, torch.tensor([validation_ids(loaded.tokenizer, 600)])
    peaks: dict[str, float] = {}
    hooks = [m.register_forward_hook(lambda mod, i, o, n=n: peaks.__setitem__(n, max(peaks.get(n, 0.0), o.abs().max().item())))
             for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) or n.endswith(tuple(f"layers.{k}" for k in range(99)))]
    with torch.no_grad():
        full = model(ids)[0]
    for h in hooks:
        h.remove()
    with torch.no_grad():
        half = simulate(model, "fp16")(ids)[0]
    residual = max(v for n, v in peaks.items() if n.split(".")[-1].isdigit())
    linear = max(v for n, v in peaks.items() if not n.split(".")[-1].isdigit() and n != "lm_head")
    print(json.dumps({"residual_peak": residual, "linear_output_peak": linear, "fp16_finite": bool(torch.isfinite(half).all()),
                      "max_abs": (half - full).abs().max().item(), "top1": (half.argmax(-1) == full.argmax(-1)).float().mean().item(),
                      "kl": float(kl_divergence(full.numpy(), half.numpy()).mean())}))


def speed(source: str, threads: int, repeats: int) -> dict:
    runs = []
    for _ in range(repeats):
        stdout, _ = run_child(["--child-speed", source, str(threads)])
        runs.append(json.loads(stdout.splitlines()[-1]))
    return {k: round(statistics.median(r[k] for r in runs), 2) for k in runs[0]} | {"repeats": repeats}


def parity(bundle: str, length: int | None = None) -> dict:
    import torch

    from gemma3_export.validate import validate_bundle

    torch.set_num_threads(1)  # the eager reference: two contended threads were 4x slower than one

    s = validate_bundle(bundle, length=length, log=lambda m: print(m, file=sys.stderr))
    pick = lambda d: {k: d[k] for k in ("max_abs", "mean_abs", "top1", "kl")}  # noqa: E731
    return {"reference": s["reference"], "positions": s["positions"], "passed": s["passed"],
            "vs_reference": pick(s["vs_reference"]), "vs_float": pick(s["vs_float"]),
            "bands_vs_float": s["vs_float"]["bands"]}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--work", default="bundles/bench-onnx")
    p.add_argument("--json", default="docs/onnx_bench.json")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--skip-export", action="store_true", help="reuse the bundles in --work")
    p.add_argument("--parts", nargs="+", default=PARTS, choices=PARTS, help="rerun some parts, keep the rest of --json")
    p.add_argument("--parity-length", type=int, help="positions to validate (default: validate's, 3.5 windows)")
    p.add_argument("--only", nargs="+", help="bundles to export / compare (fp32, int4b32, gguf, int4b32-32k)")
    p.add_argument("--child-export", nargs="+")
    p.add_argument("--child-speed", nargs=2)
    p.add_argument("--child-binding", nargs=2)
    p.add_argument("--child-fp16", action="store_true")
    args = p.parse_args()
    if args.child_export:
        return child_export(*args.child_export[:3], args.child_export[3:])
    if args.child_speed:
        return child_speed(args.child_speed[0], int(args.child_speed[1]))
    if args.child_binding:
        return child_binding(args.child_binding[0], int(args.child_binding[1]))
    if args.child_fp16:
        return child_fp16()

    work = (ROOT / args.work).resolve()
    work.mkdir(parents=True, exist_ok=True)
    out = ROOT / args.json
    results: dict = json.loads(out.read_text()) if (args.parts != PARTS or args.only) and out.exists() else {}
    results.update({"threads": args.threads, "machine": f"{os.cpu_count()} CPUs"})
    log_path = work / "exports.json"  # export figures survive a rerun with --skip-export
    exports = json.loads(log_path.read_text()) if log_path.exists() else {}
    for name, quant, extra in (("fp32", "fp32", ()), ("int4b32", "int4b32", ()), ("gguf", "gguf", ()),
                               ("int4b32-32k", "int4b32", ("context=32768",))):
        if args.only and name not in args.only:
            continue
        if not (args.skip_export and (work / f"270m-{name}" / "manifest.json").exists()):
            exports[name] = export_bundle(work, quant, name=name, extra=extra)
            log_path.write_text(json.dumps(exports, indent=2))
            print(f"export {name}: {exports[name]}", file=sys.stderr)
    from gemma3_export.bundle import read_bundle

    for name, row in exports.items():  # sizes from the bundles as they are (the model, not its tokenizers)
        row["artifact_gb"] = round(read_bundle(work / f"270m-{name}").artifact_bytes / 1e9, 3)
    results["exports"] = exports
    wanted = lambda names: [n for n in names if not args.only or n in args.only]  # noqa: E731
    if "parity" in args.parts:
        results.setdefault("parity", {}).update({q: parity(str(work / f"270m-{q}"), args.parity_length) for q in wanted(("fp32", "int4b32", "gguf"))})
        print(f"parity: {json.dumps(results['parity'], indent=1)[:2000]}", file=sys.stderr)
    if "speed" in args.parts:  # the eager baseline always runs, so ratios come from one run
        sources = [("eager", "eager")] + [(f"onnx {q}", str(work / f"270m-{q}")) for q in wanted(("fp32", "int4b32", "gguf"))]
        if wanted(("int4b32",)):  # the same graph with fp32 compute in its MatMulNBits (the default before issue 9)
            from onnx_profile import with_accuracy_level

            sources.append(("onnx int4b32 accuracy_level 0", with_accuracy_level(str(work / "270m-int4b32"), 0)))
        results["speed"] = {name: speed(src, args.threads, args.repeats) for name, src in sources}
        print(f"speed: {results['speed']}", file=sys.stderr)
    if "binding" in args.parts:
        for name in ("int4b32", "int4b32-32k"):  # context 2048 and 32768: the cache is 28 MB and 217 MB
            stdout, _ = run_child(["--child-binding", str(work / f"270m-{name}"), str(args.threads)])
            results[f"cache_binding_{name}"] = json.loads(stdout.splitlines()[-1])
            print(f"binding {name}: {results[f'cache_binding_{name}']}", file=sys.stderr)
    if "fp16" in args.parts:
        results["fp16_headroom"] = json.loads(run_child(["--child-fp16"])[0].splitlines()[-1])
    results["load_average_at_end"] = os.getloadavg()
    out = ROOT / args.json
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2))
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
