"""The eager model on the real 270M: load time and peak memory, cached vs uncached speed, and parity
with transformers' Gemma3ForCausalLM on the same weights.

    python benchmarks/foundation_bench.py [--threads 2] [--repeats 3] [--json out.json]

Each figure is a median of alternating runs; speeds are compared as ratios within the same run.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time

import torch

LOAD_PROBE = """
import json, resource, time, psutil
t = time.perf_counter()
from gemma3_export.load import load_model
loaded = load_model("270m", log=lambda *_: None)
elapsed = time.perf_counter() - t
params = sum(p.numel() for p in loaded.model.parameters())
print(json.dumps({"load_s": elapsed, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e3,
                  "fp32_weights_mb": params * 4 / 1e6}))
"""


def measure_load() -> dict:
    """Load in a fresh process: its peak RSS is the loading's, not this script's."""
    out = subprocess.run([sys.executable, "-c", LOAD_PROBE], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def cached_speed(model, ids: list[int], new: int, chunk: int) -> tuple[float, float]:
    from gemma3_export.generate import EagerRunner

    runner = EagerRunner(model, len(ids) + new + 1, chunk)
    t = time.perf_counter()
    logits = runner.prefill(ids)
    prefill = len(ids) / (time.perf_counter() - t)
    t = time.perf_counter()
    for _ in range(new):
        logits = runner.decode(int(logits.argmax()))
    return prefill, new / (time.perf_counter() - t)


@torch.no_grad()
def uncached_speed(model, ids: list[int], new: int) -> tuple[float, float]:
    x = torch.tensor([ids])
    last = lambda x: model.lm_head(model.model(x)[:, -1])  # noqa: E731  (no full-vocab logits per position)
    t = time.perf_counter()
    logits = last(x)
    prefill = len(ids) / (time.perf_counter() - t)
    t = time.perf_counter()
    for _ in range(new):  # no cache: every step re-reads the whole sequence
        x = torch.cat([x, logits.argmax(-1, keepdim=True)], dim=1)
        logits = last(x)
    return prefill, new / (time.perf_counter() - t)


@torch.no_grad()
def hf_parity(model, ids: list[int]) -> dict:
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    hf = Gemma3ForCausalLM(Gemma3TextConfig(**model.config.to_hf())).eval()
    hf.load_state_dict(model.state_dict(), strict=True)
    hf.model.embed_tokens.embed_scale.fill_(model.config.embed_scale)
    x = torch.tensor([ids])
    ours, ref = model(x)[0], hf(x).logits[0]
    return {
        "tokens": len(ids),
        "max_abs": float((ours - ref).abs().max()),
        "mean_abs": float((ours - ref).abs().mean()),
        "logit_scale": float(ref.abs().max()),
        "top1_agreement": float((ours.argmax(-1) == ref.argmax(-1)).float().mean()),
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--prompt", type=int, default=512)
    ap.add_argument("--new", type=int, default=32)
    ap.add_argument("--json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from gemma3_export.load import load_model
    from gemma3_export.validate import validation_ids

    loads = [measure_load() for _ in range(args.repeats)]
    load = {k: statistics.median(r[k] for r in loads) for k in loads[0]}
    print(f"load: {load['load_s']:.1f} s, peak RSS {load['peak_rss_mb']:.0f} MB "
          f"({load['peak_rss_mb'] / load['fp32_weights_mb']:.2f}x the fp32 weights, {load['fp32_weights_mb']:.0f} MB)")

    loaded = load_model("270m", log=lambda *_: None)
    model, tok = loaded.model, loaded.tokenizer
    ids = validation_ids(tok, args.prompt)
    runs = {"cached": [], "uncached": []}
    for _ in range(args.repeats):  # alternate the two systems run by run
        runs["cached"].append(cached_speed(model, ids, args.new, chunk=128))
        runs["uncached"].append(uncached_speed(model, ids, args.new))
    speed = {k: {"prefill_tok_s": statistics.median(r[0] for r in v), "decode_tok_s": statistics.median(r[1] for r in v)}
             for k, v in runs.items()}
    for k, v in speed.items():
        print(f"{k:9s} prefill {v['prefill_tok_s']:7.1f} tok/s   decode {v['decode_tok_s']:6.2f} tok/s")
    print(f"cached/uncached: prefill x{speed['cached']['prefill_tok_s'] / speed['uncached']['prefill_tok_s']:.2f}, "
          f"decode x{speed['cached']['decode_tok_s'] / speed['uncached']['decode_tok_s']:.2f}")

    parity = hf_parity(model, validation_ids(tok, 3 * model.config.sliding_window + 64))
    print(f"vs transformers over {parity['tokens']} tokens: max abs {parity['max_abs']:.2e} "
          f"(logits up to {parity['logit_scale']:.1f}), mean abs {parity['mean_abs']:.2e}, "
          f"top-1 agreement {parity['top1_agreement']:.4f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"load": load, "speed": speed, "parity": parity, "args": vars(args)}, f, indent=2)


if __name__ == "__main__":
    main()
