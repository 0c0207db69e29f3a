"""Peak memory in a 4k-token conversation (issue 9's memory goal, "in a 4k-token conversation too"):
our bundles exported for a longer context beside llama.cpp given the same context, each in a fresh
process on 2 threads. The workload: a ~4000-token prompt (the bundled validation text, cycled) prefilled
in the system's chunks, then 64 greedy decode steps; VmHWM after loading and at the end.

    python benchmarks/long_context_memory.py [--contexts 4096 32768] [--systems ...] [--json docs/long_context_memory.json]

Our local layers keep their window at any context (ExecuTorch: a ring of 512 + 127 slots; ONNX:
onnxruntime's windowed cache of 512 + 128 rows) and only the global layers (3 of 18) grow with it; llama-cpp-python 0.3 keeps a full-size cache for its sliding-window layers ("using
full-size SWA cache" in its log) in f16. Bundles are exported once into bundles/long-context/.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
from executorch_bench import EXPORT, child  # noqa: E402

PROMPT_TOKENS, DECODE = 4000, 64
# name -> (target, quant, --max-size)
OURS = {"onnx-gguf-260mb": ("onnx", "gguf", "260MB"), "onnx-int4b32": ("onnx", "int4b32", None),
        "et-8da4w": ("executorch", "8da4w", None), "onnx-int4b128-gptq": ("onnx", "int4b128", None)}
# exported from a checkpoint instead of the embedded weights: `gemma3-export gptq --model 270m --scheme
# int4b128 --out bundles/gptq/270m-int4b128-s64` first (docs/quantization.md)
CHECKPOINTS = {"onnx-int4b128-gptq": "bundles/gptq/270m-int4b128-s64"}
EXPORT_CHECKPOINT = """
import sys
from gemma3_export import pipeline
pipeline.export(model="270m", target="onnx", checkpoint=sys.argv[1], context=int(sys.argv[2]), chunk=128,
                out=sys.argv[3], validate=False, log=lambda m: None)
"""
SYSTEMS = (*OURS, "llama.cpp-q4km")

RUN = """
import json, sys, time
sys.path.insert(0, sys.argv[1])
import numpy as np
from compare import LlamaCpp, Ours
from onnx_bench import peak_rss_gb
name, path, context = sys.argv[2], sys.argv[3], int(sys.argv[4])
ids = json.loads(open(sys.argv[5]).read())  # tokenized by the parent: gguf-py's vocabulary is not ours to count
start = time.perf_counter()
s = LlamaCpp(path, 2, n_ctx=context) if name.startswith("llama.cpp") else Ours(path, 2)
loaded = peak_rss_gb()
token = int(np.argmax(s.prefill(ids)))
prefill_s = time.perf_counter() - start
for _ in range(%d):
    token = int(np.argmax(s.decode(token)))
print(json.dumps({"load_gb": loaded, "peak_gb": peak_rss_gb(), "prompt_tokens": len(ids), "seconds": time.perf_counter() - start}))
""" % DECODE


def bundle(name: str, context: int, log) -> Path:
    """Our bundle for `context`: reused when valid, else exported (a fresh process)."""
    import shutil

    from compare import valid_bundle

    from gemma3_export.bundle import read_bundle

    target, quant, max_size = OURS[name]
    out = ROOT / f"bundles/long-context/{name}-{context}"
    if out.exists() and not valid_bundle(out, target, quant, max_size) and read_bundle(out).manifest["max_context"] == context:
        return out
    shutil.rmtree(out, ignore_errors=True)
    log(f"[{name}] exporting for context {context} to {out}")
    if name in CHECKPOINTS:
        import subprocess

        subprocess.run([sys.executable, "-c", EXPORT_CHECKPOINT, str(ROOT / CHECKPOINTS[name]), str(context), str(out)],
                       check=True, cwd=ROOT)
        return out
    child(EXPORT, "270m", quant, str(context), "128", str(out), "0", target, *([max_size] if max_size else []))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--contexts", type=int, nargs="+", default=[4096, 32768])
    ap.add_argument("--systems", nargs="+", choices=SYSTEMS, default=list(SYSTEMS))
    ap.add_argument("--json")
    args = ap.parse_args()
    from compare import gguf_path

    from gemma3_export.tokenizer import load_gguf_tokenizer
    from gemma3_export.validate import validation_ids

    prompt = ROOT / "bundles/long-context/prompt.json"
    prompt.parent.mkdir(parents=True, exist_ok=True)
    prompt.write_text(json.dumps(validation_ids(load_gguf_tokenizer(gguf_path()), PROMPT_TOKENS)))
    rows = []
    for context in args.contexts:
        for name in args.systems:
            path = gguf_path() if name.startswith("llama.cpp") else bundle(name, context, print)
            load = os.getloadavg()[0]
            row = {"system": name, "context": context, "load_average": load,
                   **child(RUN, str(ROOT / "benchmarks"), name, str(path), str(context), str(prompt))}
            rows.append(row)
            print(row, flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps({"command": " ".join(["python", *sys.argv]), "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
