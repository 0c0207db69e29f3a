"""Where an ExecuTorch bundle's time goes, from ExecuTorch's own profiler (ETDump; issue 9):

    python benchmarks/et_profile.py [--bundle bundles/compare/gemma3-270m-executorch-8da4w] [--threads 2]
        [--decode 32] [--json FILE]

The bundle's .pte is loaded with ETDump enabled (`_load_for_executorch(..., enable_etdump=True)`, the
same program and kernels as the bundle's runner), warmed up with one short prefill, then runs one
128-token prefill chunk and `--decode` decode steps. `executorch.devtools.Inspector` reads the dump; per
phase (the prefill call, the decode calls) the time of each event is summed by kind: inside the
XNNPACK delegate calls, its linears (Fully Connected, the LM head included) and its other ops (norms,
rope arithmetic, GELU); outside them, the portable kernels: the cache writes (`llama::update_cache*`),
attention (`llama::custom_sdpa`), the quantized embedding gather and the rest; plus the share of
`Method::execute` that neither delegate calls nor portable kernels account for. Then `custom_sdpa`'s
kernel alone on one local layer's prefill shapes, per path (`sdpa_paths`).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


# events that contain others (OPERATOR_CALL: one kernel call; DELEGATE_CALL: XNNPACK's ops) or load time
WRAPPERS = {"OPERATOR_CALL", "DELEGATE_CALL", "Method::execute", "Method::init", "Program::load_method"}


def kind(event) -> str | None:
    """The bucket of one ETDump event; None for wrappers counted through their parts."""
    name = event.name
    if event.is_delegated_op:  # XNNPACK's own ops, inside a DELEGATE_CALL
        return "xnnpack: linears (Fully Connected)" if name.startswith("Fully Connected") else "xnnpack: other ops"
    if name in WRAPPERS:
        return None
    if "update_cache" in name:
        return "portable: cache writes (update_cache)"
    if "sdpa" in name:
        return "portable: attention (custom_sdpa)"
    if "embedding" in name:
        return "portable: embedding gather"
    return "portable: other ops"


def sdpa_paths(threads: int, window_slots: int = 639, chunk: int = 128, heads: int = 4, dim: int = 256) -> dict:
    """`llama::custom_sdpa`'s kernel (its ATen build, as torch.export sees it) on one local layer's
    shapes, per path: the float mask our local layers pass, causal from a start position (our global
    layers), neither, and torch's own SDPA with the mask. Milliseconds per call, median of 10."""
    import statistics

    import torch

    torch.set_num_threads(threads)
    q, k, v = torch.randn(1, chunk, heads, dim), torch.randn(1, window_slots, 1, dim), torch.randn(1, window_slots, 1, dim)
    mask = torch.zeros(chunk, window_slots)
    scale = dim**-0.5
    qt, kt, vt = q.transpose(1, 2), k.expand(1, window_slots, heads, dim).transpose(1, 2), v.expand(1, window_slots, heads, dim).transpose(1, 2)
    paths = {"float mask": lambda: torch.ops.llama.custom_sdpa(q, k, v, 0, mask, 0.0, False, scale),
             "causal": lambda: torch.ops.llama.custom_sdpa(q, k, v, window_slots - chunk, None, 0.0, True, scale),
             "no mask": lambda: torch.ops.llama.custom_sdpa(q, k, v, 0, None, 0.0, False, scale),
             "torch sdpa, float mask": lambda: torch.nn.functional.scaled_dot_product_attention(qt, kt, vt, attn_mask=mask)}
    out = {}
    for name, run in paths.items():
        run()
        times = []
        for _ in range(10):
            start = time.perf_counter()
            run()
            times.append(1000 * (time.perf_counter() - start))
        out[name] = round(statistics.median(times), 3)
    return {"shapes": {"queries": chunk, "keys": window_slots, "heads": heads, "kv_heads": 1, "head_dim": dim},
            "ms_per_call": out}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bundle", default="bundles/compare/gemma3-270m-executorch-8da4w")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--decode", type=int, default=32)
    ap.add_argument("--json")
    args = ap.parse_args()
    import executorch.kernels.quantized  # noqa: F401  (the quantized embedding kernels)
    import torch
    from executorch.devtools import Inspector
    from executorch.extension.llm.custom_ops import custom_ops  # noqa: F401  (llama::update_cache, custom_sdpa)
    from executorch.extension.pybindings.portable_lib import _load_for_executorch

    from gemma3_export.bundle import read_bundle
    from gemma3_export.runtimes.executorch import set_threads
    from gemma3_export.tokenizer import Tokenizer
    from gemma3_export.validate import validation_ids

    b = read_bundle(args.bundle)
    set_threads(args.threads)
    prompt = validation_ids(Tokenizer(b.tokenizer_path), 128)
    warm = _load_for_executorch(str(b.artifact))
    warm.forward([torch.tensor([prompt[:8]]), torch.tensor([0])])
    module = _load_for_executorch(str(b.artifact), enable_etdump=True)
    walls = []
    start = time.perf_counter()
    (logits,) = module.forward([torch.tensor([prompt]), torch.tensor([0])])
    walls.append(time.perf_counter() - start)
    token = int(logits[0].argmax())
    for step in range(args.decode):
        start = time.perf_counter()
        (logits,) = module.forward([torch.tensor([[token]]), torch.tensor([len(prompt) + step])])
        walls.append(time.perf_counter() - start)
        token = int(logits[0].argmax())
    with tempfile.TemporaryDirectory() as tmp:
        dump = Path(tmp) / "etdump.etdp"
        module.write_etdump_result_to_file(str(dump))
        inspector = Inspector(etdump_path=str(dump))
        calls = args.decode + 1
        ms = [defaultdict(float) for _ in range(calls)]
        delegate, executes, biggest = [0.0] * calls, [0.0] * calls, defaultdict(float)
        for block in inspector.event_blocks:
            for event in block.events:
                times = list(event.perf_data.raw) if event.perf_data is not None else []
                if len(times) != calls:
                    continue  # load-time events
                if event.name == "Method::execute":
                    executes = times
                elif event.name == "DELEGATE_CALL":
                    delegate = [d + t for d, t in zip(delegate, times)]
                elif (bucket := kind(event)) is not None:
                    for call, t in enumerate(times):  # Inspector reports milliseconds
                        ms[call][bucket] += t
                    if event.is_delegated_op:
                        biggest[event.name] += sum(times[1:]) / (calls - 1)
    phases = {"prefill": (ms[:1], walls[:1], executes[:1], delegate[:1]),
              "decode": (ms[1:], walls[1:], executes[1:], delegate[1:])}
    result = {"bundle": args.bundle, "threads": args.threads, "prompt_tokens": len(prompt)}
    for phase, (rs, ws, ex, dg) in phases.items():
        total = defaultdict(float)
        for r in rs:
            for k, v in r.items():
                total[k] += v / len(rs)
        portable = sum(v for k, v in total.items() if k.startswith("portable"))
        execute = sum(ex) / len(ex)
        result[phase] = {"calls": len(rs), "python_wall_ms_per_call": 1000 * sum(ws) / len(ws),
                         "method_execute_ms_per_call": execute, "delegate_calls_ms_per_call": sum(dg) / len(dg),
                         "portable_ops_ms_per_call": portable,
                         "outside_ops_share": 1 - (sum(dg) / len(dg) + portable) / execute,
                         "ms_per_call": {k: round(v, 3) for k, v in sorted(total.items())}}
    result["decode"]["largest_delegated_ops_ms"] = {k: round(v, 3) for k, v in
                                                     sorted(biggest.items(), key=lambda kv: -kv[1])[:5]}
    result["sdpa_paths"] = sdpa_paths(args.threads)
    result["load_average_at_end"] = __import__("os").getloadavg()
    print(json.dumps(result, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
