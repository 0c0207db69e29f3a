"""Vision encoder cost on this machine: the full-size SigLIP + projector (Gemma 3 4b/12b/27b, random
weights) exported to vision.onnx per scheme, then per image: latency and the peak memory (VmHWM) of a
fresh process that loads the artifact and encodes; and the image tokens per request with and without
Pan & Scan for common image shapes (no model needed).

    python benchmarks/vision_bench.py --out docs/vision_bench.json [--schemes fp32 int8] [--images 3]
    python benchmarks/vision_bench.py --target executorch --schemes 8da4w-pc fp32 --out docs/vision_bench.json

`--out` keeps what the file holds for other targets and replaces this target's entry.
"""

from __future__ import annotations

import argparse
import gc
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SHAPES = {"square 896x896": (896, 896), "photo 1024x768": (1024, 768), "wide 1920x1080": (1920, 1080),
          "tall 1080x1920": (1080, 1920), "panorama 3000x800": (3000, 800), "receipt 600x2400": (600, 2400)}


def token_counts(model: str) -> dict:
    """Image soft tokens and prompt tokens (with markers) per image, without and with Pan & Scan."""
    from gemma3_export.config import vision_preset
    from gemma3_export.images import PanAndScan, pan_and_scan_boxes

    v = vision_preset(model)
    block = v.mm_tokens_per_image + 2 + 4  # soft tokens, <start/end_of_image>, two "\n\n"
    out = {}
    for name, (w, h) in SHAPES.items():
        crops = len(pan_and_scan_boxes(w, h, PanAndScan()))
        out[name] = {"crops": crops, "soft_tokens": v.mm_tokens_per_image, "prompt_tokens": block,
                     "soft_tokens_pan_and_scan": v.mm_tokens_per_image * (1 + crops),
                     "prompt_tokens_pan_and_scan_at_least": block * (1 + crops)}
    return out


ENCODERS = {"onnx": "gemma3_export.runtimes.onnx:OnnxVisionEncoder",
            "executorch": "gemma3_export.runtimes.executorch:ExecuTorchVisionEncoder"}


def _measure(path: str, images: int, threads: int, target: str = "onnx") -> dict:
    """In a fresh process: load vision.onnx, encode `images` images one at a time. Memory is VmHWM /
    VmRSS from /proc/self/status: the child's own address space. ru_maxrss is NOT: Linux carries the
    parent's peak RSS across fork + exec into the child's ru_maxrss, which is why every scheme once
    read the same 6851 MiB (the parent's peak while it built and exported the 420M encoder)."""
    module, cls = ENCODERS[target].split(":")
    code = f"""
import json, time, numpy as np
from pathlib import Path
def mem():
    f = dict(l.split(":", 1) for l in Path("/proc/self/status").read_text().splitlines() if ":" in l)
    return {{k: int(f[k].split()[0]) / 1024 for k in ("VmRSS", "VmHWM")}}  # MiB
from {module} import {cls} as Encoder
base = mem()
t = time.perf_counter(); enc = Encoder(Path({path!r}), threads={threads}); load = time.perf_counter() - t
loaded = mem()
x = np.random.default_rng(0).uniform(-1, 1, (1, 3, 896, 896)).astype(np.float32)
times = []
for _ in range({images}):
    t = time.perf_counter(); enc(x); times.append(time.perf_counter() - t)
end = mem()
print(json.dumps({{"load_s": load, "per_image_s": times, "rss_before_load_mib": base["VmRSS"],
                   "rss_after_load_mib": loaded["VmRSS"], "peak_rss_load_mib": loaded["VmHWM"],
                   "peak_rss_mib": end["VmHWM"]}}))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="4b")
    p.add_argument("--target", choices=list(ENCODERS), default="onnx")
    p.add_argument("--schemes", nargs="+", default=["fp32", "int8"])
    p.add_argument("--images", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out")
    args = p.parse_args()

    import copy
    import importlib

    import torch

    from gemma3_export.config import preset, vision_preset
    from gemma3_export.weights import build_vision, random_vision_state

    v, hidden = vision_preset(args.model), preset(args.model).hidden_size
    print(f"building the {args.model} SigLIP encoder + projector with random weights", flush=True)
    vision = build_vision(v, hidden, random_vision_state(v, hidden), "random")
    params = sum(t.numel() for t in vision.state_dict().values())
    result = {"model": args.model, "params": params, "threads": args.threads, "torch_threads": torch.get_num_threads(),
              "tokens": token_counts(args.model), args.target: {}}
    export_vision = importlib.import_module(f"gemma3_export.exporters.{args.target}").export_vision
    with tempfile.TemporaryDirectory() as tmp:
        for scheme in args.schemes:
            folder = Path(tmp) / scheme
            folder.mkdir()
            start = time.perf_counter()
            info = export_vision(copy.deepcopy(vision), folder, scheme, log=lambda m: print(m, flush=True))
            export_s = time.perf_counter() - start
            gc.collect()  # the lowering's leftovers: the child's host must not run out of memory
            print(f"{scheme}: exported in {export_s:.0f} s; measuring {args.images} images", flush=True)
            m = _measure(str(folder / info["artifact"]), args.images, args.threads, args.target)
            m |= {"export_s": export_s, "weight_bytes": info["weight_bytes"],
                  "median_s": sorted(m["per_image_s"])[len(m["per_image_s"]) // 2]}
            result[args.target][scheme] = m
            print(f"{scheme}: {m['median_s']:.2f} s per image, peak RSS {m['peak_rss_mib']:.0f} MiB", flush=True)
    print(json.dumps(result, indent=2))
    if args.out:
        out = Path(args.out)
        kept = json.loads(out.read_text()) if out.exists() else {}
        Path(args.out).write_text(json.dumps(kept | result, indent=2) + "\n")


if __name__ == "__main__":
    main()
