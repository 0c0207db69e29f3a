"""How far a scheme's own eager model moves when its activations are nudged by one part in a million.

    python benchmarks/noise_floor.py [--length 512] [--schemes fp32 executorch:8da4w onnx:gguf onnx:int4b32]
        [--json docs/noise_floor.json]

Schemes that quantize activations at run time (ExecuTorch's 8da4w: int8 per token; onnxruntime's
MatMulNBits with accuracy_level 4, which `--quant gguf` uses: int8 per weight block) round every
linear's input to 256 levels. A change in the last digits of an input, such as a different
summation order in another runtime's kernel, moves some values across a rounding boundary, and the
next layers amplify it. This script measures that floor: the real 270M on the scheme's eager
simulation (the reference `validate` uses), teacher-forced over the bundled validation text, once as
is and once with the embedding output multiplied by (1 + 1e-6 * N(0, 1)), and reports next-token
agreement, mean KL and max abs logit difference between the two runs. An artifact cannot be expected
to agree with its reference better than the reference agrees with itself.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gemma3_export.load import load_model  # noqa: E402
from gemma3_export.validate import validation_ids  # noqa: E402


def reference(model, target: str, scheme: str, loaded):
    if scheme == "fp32":
        return model
    exporter = importlib.import_module(f"gemma3_export.exporters.{target}")
    grid = None
    if scheme == "gguf":
        from gemma3_export.gguf_grid import read_gguf_grid

        grid = read_gguf_grid(loaded.gguf_path)
    return exporter.simulate(model, scheme, grid) if grid is not None else exporter.simulate(model, scheme)


def logits(model, ids: list[int], nudge: float, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    hook = None
    if nudge:
        hook = model.model.embed_tokens.register_forward_hook(
            lambda m, a, out: out * (1 + nudge * torch.randn(out.shape, generator=g)))
    try:
        with torch.no_grad():
            return model(torch.tensor([ids]))[0].float()
    finally:
        if hook is not None:
            hook.remove()


def floor(a: torch.Tensor, b: torch.Tensor) -> dict:
    la, lb = a.log_softmax(-1), b.log_softmax(-1)
    kl = (la.exp() * (la - lb)).sum(-1)
    return {"top1": float((a.argmax(-1) == b.argmax(-1)).float().mean()), "kl_mean": float(kl.mean()),
            "kl_max": float(kl.max()), "max_abs": float((a - b).abs().max())}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--length", type=int, default=512)
    ap.add_argument("--schemes", nargs="+", default=["fp32", "executorch:8da4w", "onnx:gguf", "onnx:int4b32"])
    ap.add_argument("--nudge", type=float, default=1e-6)
    ap.add_argument("--json")
    args = ap.parse_args()
    torch.set_num_threads(2)
    results = {}
    for spec in args.schemes:
        target, _, scheme = spec.rpartition(":")
        loaded = load_model("270m", log=lambda *_: None)
        ids = validation_ids(loaded.tokenizer, args.length)
        model = reference(loaded.model.eval(), target or "onnx", scheme, loaded)
        results[spec] = floor(logits(model, ids, 0.0), logits(model, ids, args.nudge))
        print(spec, json.dumps(results[spec]), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps({"command": " ".join(sys.argv), "length": args.length,
                                               "nudge": args.nudge, "results": results}, indent=1) + "\n")


if __name__ == "__main__":
    main()
