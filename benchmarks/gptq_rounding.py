"""GPTQ against round to nearest on the real 270M (issue 9): what `gemma3-export gptq` wins back.

A decode step reads every weight once, and the LM head most of all (41% of the int4b32 bundle's kernel
time, onnx_profile.py): int4 in blocks of 128 reads a quarter of int4b32's scales, but rounded to
nearest it costs agreement (docs/agreement_head_block_128.json, docs/agreement_int4.json). GPTQ rounds
each matrix so that its outputs on calibration text move least (gemma3_export/gptq.py).

Eager simulation of the ONNX bundles (`onnx.simulate`: the grid's weights, each matrix's input rounded to
int8 per weight block as accuracy_level 4 does), 512 teacher-forced positions of the bundled validation
text against the float model: top-1 agreement and mean KL. GPTQ's calibration is what `gemma3-export
gptq` uses (`--samples` x 96 tokens sampled from the float model, seed 0; cached where `gemma3-export
gptq --out bundles/gptq/...` caches them): the validation text stays held out. GPTQ with its columns in natural order and in activation order (`--act-order`). Last rows:
GPTQ on the tied table itself, as the LM head (it is also the embedding).

    python benchmarks/gptq_rounding.py [--length 512] [--samples 64] [--json docs/gptq_rounding.json]
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from gemma3_export import gptq  # noqa: E402
from gemma3_export.exporters import onnx as ox  # noqa: E402
from gemma3_export.fake_quant import dequantize_int4  # noqa: E402


def score(model, ids, ref) -> dict:
    with torch.no_grad():
        got = model(ids)[0].log_softmax(-1)
    return {"top1": round(float((got.argmax(-1) == ref.argmax(-1)).float().mean()), 4),
            "kl": round(float((ref.exp() * (ref - got)).sum(-1).mean()), 4)}


def with_table(sim, head: torch.Tensor, block: int, embedding: torch.Tensor | None = None):
    """`sim` with its tied table replaced by `head` (its inputs rounded per `block`); `embedding`: the
    embedding looks up another table (untied)."""
    model = copy.deepcopy(sim)
    with torch.no_grad():
        model.model.embed_tokens.weight.copy_(head)
        if embedding is not None:
            model.lm_head.weight = torch.nn.Parameter(head.clone())
            model.model.embed_tokens.weight.copy_(embedding)
    model.lm_head._forward_pre_hooks.clear()
    model.lm_head.register_forward_pre_hook(ox._int8_activations(block))
    return model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--length", type=int, default=512)
    ap.add_argument("--samples", type=int, default=gptq.SEQUENCES, help="calibration sequences (gptq's --samples)")
    ap.add_argument("--json")
    args = ap.parse_args()
    torch.set_num_threads(2)
    from gemma3_export.load import load_model
    from gemma3_export.validate import validation_ids

    loaded = load_model("270m", log=lambda *_: None)
    float_model = loaded.model
    ids = torch.tensor([validation_ids(loaded.tokenizer, args.length)])
    with torch.no_grad():
        ref = float_model(ids)[0].log_softmax(-1)
    tokens, how = gptq.calibration_tokens(loaded, None, ROOT / "bundles/gptq/calibration", samples=args.samples)
    rows = []

    def row(label: str, model, **extra):
        rows.append({"rounding": label, **extra, **score(model, ids, ref)})
        print(json.dumps(rows[-1]), flush=True)

    for scheme in ("int4b128", "int4b32", "int4"):
        row(f"{scheme}, round to nearest", ox.simulate(float_model, scheme), scheme=scheme)
        for act_order in (False, True):
            model = copy.deepcopy(float_model)
            start = time.perf_counter()
            grid = gptq.quantize(model, tokens, scheme, act_order=act_order, log=lambda *_: None)
            row(f"{scheme}, GPTQ{' with activation order' if act_order else ''} (the table round to nearest)",
                ox.simulate(model, scheme, grid=grid), scheme=scheme, act_order=act_order,
                gptq_s=round(time.perf_counter() - start, 1))

    # The tied table by GPTQ too, for its use as the LM head (the Hessian of the head's inputs in the int4b32 bundle)
    sim = ox.simulate(float_model, "int4b32")
    seen = []
    hook = sim.model.norm.register_forward_hook(lambda m, a, out: seen.append(out.reshape(-1, out.shape[-1]).double()))
    with torch.no_grad():
        sim(tokens)
    hook.remove()
    x = torch.cat(seen)
    table = float_model.model.embed_tokens.weight.detach()
    for block in (128, 32):
        head = dequantize_int4(*gptq.gptq(table, x.T @ x / len(x), block))
        row(f"int4b32 layers; table in blocks of {block} by GPTQ (tied: the embedding too)", with_table(sim, head, block),
            scheme="int4b32")
        if block == 128:
            row("int4b32 layers; table in blocks of 128 by GPTQ as the head, the embedding int4b32 (untied)",
                with_table(sim, head, block, ox.fake_nbits(table, 4, 32)), scheme="int4b32")
            row("int4b32 layers; table in blocks of 128 round to nearest as the head, the embedding int4b32 (untied)",
                with_table(sim, ox.fake_nbits(table, 4, 128), block, ox.fake_nbits(table, 4, 32)), scheme="int4b32")
    if args.json:
        Path(args.json).write_text(json.dumps({"command": " ".join(["python", *sys.argv]), "length": args.length,
                                               "calibration": how, "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
