"""Quality of exported artifacts against the float model, beside llama.cpp's Q4_K_M file, in one run
(issue 10's table): any bundles (Core ML through its fp16 eager proxy on Linux) and llama.cpp through
llama-cpp-python. No speed figures: the proxy is not Core ML's runtime (compare.py measures speed).

    python benchmarks/agreement.py BUNDLE ... [--llama-cpp] [--positions 512] [--json docs/agreement_260mb.json]

Two measurements per system, both teacher-forced one token at a time through the system's own
prefill/decode:
- compare.py's steps: 4 prompts of 64 tokens from the bundled validation text, 32 greedy steps of the
  float (dequantized GGUF) model each; a step agrees when the system's argmax is the float model's token
  (the float continuations are compare.py's cache in bundles/compare/);
- the bundled validation text's first `--positions` tokens: top-1 agreement with the float model's
  argmax, mean KL(float || system) and the system's perplexity of the text (the float model's is printed
  as its own row).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
from compare import LlamaCpp, float_reference, gguf_path, prompts, steps_agreement  # noqa: E402


def log_softmax(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, np.float64)
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def text_metrics(system, ids: list[int], float_logp: np.ndarray) -> dict:
    """Top-1 vs float, mean KL(float || system) and perplexity over ids[1:], one token at a time."""
    system.reset()
    logits = system.prefill(ids[:1])
    top1 = kl = nll = 0.0
    for i, token in enumerate(ids[1:]):
        logp, ref = log_softmax(logits), float_logp[i]
        top1 += int(np.argmax(logp)) == int(np.argmax(ref))
        kl += float((np.exp(ref) * (ref - logp)).sum())
        nll -= logp[token]
        if i + 2 < len(ids):
            logits = system.decode(token)
    n = len(ids) - 1
    return {"top1": round(top1 / n, 4), "kl": round(kl / n, 4), "perplexity": round(math.exp(nll / n), 2)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("bundles", nargs="*")
    ap.add_argument("--llama-cpp", action="store_true", help="also llama.cpp on the embedded Q4_K_M file")
    ap.add_argument("--positions", type=int, default=512)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json")
    args = ap.parse_args()
    import torch

    from gemma3_export.bundle import read_bundle
    from gemma3_export.load import load_model
    from gemma3_export.pipeline import open_runner
    from gemma3_export.validate import validation_ids

    torch.set_num_threads(args.threads)
    reference = float_reference(prompts(False), args.threads, print)
    loaded = load_model("270m", log=lambda *_: None)
    ids = validation_ids(loaded.tokenizer, args.positions)
    with torch.no_grad():
        float_logp = loaded.model(torch.tensor([ids]))[0, :-1].log_softmax(-1).numpy()  # float32: 0.5 GB
    nll = -float_logp[np.arange(len(ids) - 1), ids[1:]].mean()
    rows = [{"system": "float (the GGUF dequantized, eager)", "size_mb": None, "steps_agreement": 1.0,
             "top1": 1.0, "kl": 0.0, "perplexity": round(math.exp(nll), 2), "runtime": "torch"}]
    del loaded
    print(rows[-1], flush=True)
    systems = [(str(b), lambda b=b: open_runner(read_bundle(b))) for b in args.bundles]
    if args.llama_cpp:
        systems.append(("llama.cpp Q4_K_M", lambda: LlamaCpp(str(gguf_path()), args.threads)))
    for name, opened in systems:
        start = time.perf_counter()
        system = opened()
        size = read_bundle(name).artifact_bytes if Path(name).is_dir() else gguf_path().stat().st_size
        rows.append({"system": name, "size_mb": round(size / 1e6, 1), "steps_agreement": round(steps_agreement(system, reference)[0], 4),
                     **text_metrics(system, ids, float_logp), "runtime": getattr(system, "runtime_note", None) or "its own",
                     "seconds": round(time.perf_counter() - start, 1)})
        print(rows[-1], flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps({"command": " ".join(["python", *sys.argv]), "positions": args.positions,
                                               "steps": sum(len(c) for _, c in reference), "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
