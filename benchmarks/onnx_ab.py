"""Two ONNX decoders of the same model, step against step in one process (docs/benchmarks.md, issue 9):

    python benchmarks/onnx_ab.py A B [--steps 200] [--block 1] [--skip 0] [--threads 2] [--spin 0|1] [--json FILE]
    python benchmarks/onnx_ab.py A B --prefill 1024 --steps 20 [--json FILE]     # prefill instead of decode

A and B are each a bundle of this project's or an onnxruntime-genai model folder (genai_config.json):
onnxruntime-genai loads the same onnxruntime library, so both run in this one process.

Process-level rounds on a shared 2-core machine move by 10% from one minute to the next, more than a
graph change is worth. Here both decoders are made in one process, prefill the same 128-token prompt,
and then decode in turns, `--block` steps of A, then of B (which goes first swapped every pair of
turns), so slow spells of the machine fall on both. Each step is what compare.py times: the step and
the argmax of its logits. With threads spinning (onnxruntime's default, and onnxruntime-genai's, which
cannot turn it off) the side that just stopped keeps its threads spinning for a while: run in blocks
(e.g. --block 16) and leave each turn's first steps out (--skip 3); `*_ms_by_place` shows how many.
Everything runs twice, with A made first and with B made first (the decoder made second was faster in
every run, the same bundle against itself included), and `ratio_b_over_a` is the geometric mean of
the two orders' median per-pair ratios. Also reported per order: the median and mean step time of
each, the share of pairs in which B was faster, and for this project's runner the median time per
step spent outside `run_with_iobinding` (binding the inputs, copying the logits out, the argmax).
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


class Timed:
    """Wraps a session's run_with_iobinding to add up the time spent inside it."""

    def __init__(self, session):
        self.run, self.inside = session.run_with_iobinding, 0.0

    def __call__(self, binding):
        start = time.perf_counter()
        self.run(binding)
        self.inside += time.perf_counter() - start


def open_decoder(path: str, threads: int, spin: bool):
    if (Path(path) / "genai_config.json").exists():
        if not spin:  # its config has no key for onnxruntime's config entries; its threads spin (the default)
            raise SystemExit("onnxruntime-genai's threads always spin: compare with it at --spin 1")
        from compare import Genai  # compare.py's: the same session settings there and here

        return Genai(path, threads), None
    from gemma3_export.bundle import read_bundle
    from gemma3_export.runtimes.onnx import OnnxRunner

    runner = OnnxRunner.from_bundle(read_bundle(path), threads=threads, spin=spin)
    timed = Timed(runner.session)
    runner.session = type("TimedSession", (), {"run_with_iobinding": timed})()  # only _step uses the session
    return runner, timed


def measure(decoders: list, prompt: list[int], args) -> dict:
    """Both decoders prefill `prompt`, then decode in turns; step times of A and B, as compare.py times them."""
    import numpy as np

    tokens = []
    for d, _ in decoders:
        d.prefill(prompt[:8])  # warm-up
        d.reset()
        tokens.append(int(np.argmax(d.prefill(prompt))))
    # turns[i]: side i's turns, `block` step times each; a turn of A and one of B make a pair, the order
    # swapped every pair
    turns: list[list[list[float]]] = [[], []]
    outside: list[list[float]] = [[], []]
    for pair in range(args.steps // args.block):
        for i in ((0, 1) if pair % 2 == 0 else (1, 0)):
            d, timed = decoders[i]
            turns[i].append([])
            for _ in range(args.block):
                inside = timed.inside if timed else 0.0
                start = time.perf_counter()
                tokens[i] = int(np.argmax(d.decode(tokens[i])))
                turns[i][-1].append(time.perf_counter() - start)
                if timed:
                    outside[i].append(turns[i][-1][-1] - (timed.inside - inside))
    return summary(turns, outside, args)


def measure_prefill(decoders: list, prompt: list[int], args) -> dict:
    """Both decoders prefill `prompt` from an empty cache in turns (a reset before each), `--steps` each."""
    for d, _ in decoders:  # warm-up: every chunk shape the prompt needs
        d.prefill(prompt)
        d.reset()
    turns: list[list[list[float]]] = [[], []]
    for pair in range(args.steps):
        for i in ((0, 1) if pair % 2 == 0 else (1, 0)):
            d, _ = decoders[i]
            start = time.perf_counter()
            d.prefill(prompt)
            turns[i].append([time.perf_counter() - start])
            d.reset()
    return summary(turns, [[], []], args)


def summary(turns: list[list[list[float]]], outside: list[list[float]], args) -> dict:
    kept = [[t for turn in side for t in turn[args.skip:]] for side in turns]
    ratios = [statistics.median(b[args.skip:]) / statistics.median(a[args.skip:]) for a, b in zip(*turns)]
    return {**{f"{k}_ms": {"median": 1000 * statistics.median(t), "mean": 1000 * statistics.mean(t)}
               for k, t in zip("ab", kept)},
            **{f"{k}_outside_run_ms": 1000 * statistics.median(o) for k, o in zip("ab", outside) if o},
            "median_ratio_b_over_a": statistics.median(ratios),
            "b_faster_share": sum(r < 1 for r in ratios) / len(ratios),
            # the median step time by its place in the turn: what a turn's first steps pay for the other
            # side's threads still spinning (--skip leaves them out of everything above)
            **{f"{k}_ms_by_place": [round(1000 * statistics.median(turn[j] for turn in side), 2)
                                    for j in range(args.block)] for k, side in zip("ab", turns) if args.block > 1},
            "load_average_at_end": os.getloadavg()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("a")
    ap.add_argument("b")
    ap.add_argument("--steps", type=int, default=200, help="decode steps of each side, in each creation order")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--spin", type=int, default=1, help="threads spin-wait (the runner's default)")
    ap.add_argument("--block", type=int, default=1, help="steps per turn (one side decodes `block` steps, then the other)")
    ap.add_argument("--skip", type=int, default=0, help="steps at the start of each turn left out of the timings")
    ap.add_argument("--prefill", type=int, default=0,
                    help="time prefills of this many tokens instead of decode steps (--steps prefills of each, "
                    "one per turn, each from an empty cache)")
    ap.add_argument("--tokenizer", help="tokenizer.model for the prompt (default: the first bundle's)")
    ap.add_argument("--json")
    args = ap.parse_args()
    if not 0 <= args.skip < args.block <= args.steps:
        ap.error("need 0 <= --skip < --block <= --steps")
    if args.prefill and (args.block, args.skip) != (1, 0):
        ap.error("--prefill times one prefill per turn: no --block or --skip")
    from gemma3_export.bundle import read_bundle
    from gemma3_export.tokenizer import Tokenizer
    from gemma3_export.validate import validation_ids

    bundle = next((p for p in (args.a, args.b) if (Path(p) / "manifest.json").exists()), None)
    tokenizer = args.tokenizer or (bundle and read_bundle(bundle).tokenizer_path)
    if not tokenizer:
        ap.error("neither side is a bundle of this project's: pass --tokenizer")
    prompt = validation_ids(Tokenizer(tokenizer), args.prefill or 128)
    result = {"a": args.a, "b": args.b, "steps": args.steps, "block": args.block, "skip": args.skip, "prefill": args.prefill,
              "threads": args.threads, "spin": bool(args.spin)}
    # The decoder made second ran faster than the first in every run so far, the same bundle against
    # itself included (by 1-2%): so both creation orders run, and their ratios are combined.
    for order, paths in (("a_made_first", (args.a, args.b)), ("b_made_first", (args.b, args.a))):
        made = [open_decoder(p, args.threads, bool(args.spin)) for p in paths]
        pair = made if order == "a_made_first" else made[::-1]
        result[order] = measure_prefill(pair, prompt, args) if args.prefill else measure(pair, prompt, args)
        del made, pair  # the first order's sessions go before the second's are made
        gc.collect()
    result["ratio_b_over_a"] = math.sqrt(result["a_made_first"]["median_ratio_b_over_a"]
                                         * result["b_made_first"]["median_ratio_b_over_a"])
    print(json.dumps(result, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
