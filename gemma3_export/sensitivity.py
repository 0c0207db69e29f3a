"""Mixed precision under a size budget (`--max-size` on int4 schemes, issue 10).

Each weight matrix's sensitivity is what rounding it alone costs: the mean KL divergence from the float
model's next-token distribution to the model's with only that matrix on the low-bit grid, over a
calibration text (the user's `--data`, or text sampled from the float model, as the table ranking uses).
`choose` / `plan` then raise what buys the most KL per extra byte to the high-bit form while the artifact
stays within the budget: a greedy knapsack that treats the matrices' KLs as additive (`plan` also takes
the tied table's rows in chunks, in their ranked order).

Only the weights are rounded in the measurement; the int8 activations some targets compute with are
left out of it (benchmarks/mix_choice.py scores the resulting choices with them).
"""

from __future__ import annotations

import functools
import math
import time
from collections.abc import Callable, Sequence

import torch
from torch import nn

# The calibration sequences (of 96 tokens) the sensitivities are measured on: a forward pass per matrix,
# whose cost the 262k-row head dominates (7 minutes on the 270M here, docs/quantization.md). The choice
# it makes on 4 is measured against hand rules on other text (benchmarks/mix_choice.py).
SENSITIVITY_SEQUENCES = 4


def matrices(model: nn.Module) -> dict[str, nn.Parameter]:
    """The 2-D weights by Hugging Face name, the tied embedding/head once."""
    return {name: p for name, p in model.named_parameters() if p.dim() == 2}


def tensor_kl(model: nn.Module, rounding: Callable[[str, torch.Tensor], torch.Tensor],
              tokens: Sequence[Sequence[int]], log=print) -> dict[str, float]:
    """{name: mean KL(float || model with only `name` rounded by `rounding(name, w)`)} over `tokens`."""
    variants = {name: (name, functools.partial(rounding, name)) for name in matrices(model)}
    return variant_kl(model, variants, tokens, log, "matrices")


def variant_kl(model: nn.Module, variants: dict[str, tuple[str, Callable[[torch.Tensor], torch.Tensor]]],
               tokens: Sequence[Sequence[int]], log=print, what: str = "variants") -> dict[str, float]:
    """{label: mean KL(float || model with matrix `name` replaced by `replace(w)`)} for each
    `label: (name, replace)`, one at a time, over `tokens`; the model is left as it was."""
    batches = [torch.tensor([list(map(int, row))]) for row in tokens]
    weights = matrices(model)
    start = time.perf_counter()
    with torch.no_grad():
        reference = [model(ids)[0].log_softmax(-1) for ids in batches]
        kl = {}
        for i, (label, (name, replace)) in enumerate(variants.items()):
            w = weights[name]
            kept = w.detach().clone()
            w.copy_(replace(kept))
            total = 0.0
            for ids, ref in zip(batches, reference):
                got = model(ids)[0].log_softmax(-1)
                total += float((ref.exp() * (ref - got)).sum(-1).mean())
            w.copy_(kept)
            kl[label] = total / len(batches)
            if (i + 1) % max(1, len(variants) // 8) == 0 or i + 1 == len(variants):
                elapsed = time.perf_counter() - start
                log(f"  sensitivity: {i + 1}/{len(variants)} {what} ({elapsed:.0f} s, "
                    f"~{elapsed / (i + 1) * (len(variants) - i - 1):.0f} s left)")
    return kl


def choose(kl: dict[str, float], extra_bytes: dict[str, int], room: int) -> list[str]:
    """The matrices to raise to the high-bit form: most KL saved per extra byte first, each one that
    still fits in `room` bytes (smaller ones may fill what a larger one could not)."""
    chosen = []
    for name in sorted(kl, key=lambda n: (-kl[n] / max(extra_bytes[n], 1), n)):
        if extra_bytes[name] <= room and kl[name] > 0:
            chosen.append(name)
            room -= extra_bytes[name]
    return chosen


def plan(kl: dict[str, float], extra: dict[str, int], table_kl: dict[int, float], row_bytes: int,
         split_bytes: int, room: int) -> tuple[list[str], int]:
    """`choose` over the matrices and the tied table's rows: `table_kl[n]` is the KL with the first n
    ranked rows raised (0 .. all rows, in chunks), each row costs `row_bytes`, and a table raised in part
    also pays `split_bytes` once (its row map). Returns the matrices to raise and how many table rows."""
    bounds = sorted(table_kl)
    units, costs = dict(kl), dict(extra)
    ratio = math.inf
    for i, (a, b) in enumerate(zip(bounds, bounds[1:])):  # chunks in their order: gains per byte made non-increasing
        label = f"\0table rows {i:04d}"  # sorts before any matrix at an equal ratio
        costs[label] = (b - a) * row_bytes + (0 if i else split_bytes)
        units[label] = max(0.0, min(table_kl[a] - table_kl[b], ratio * costs[label]))
        ratio = units[label] / costs[label]
    chosen = choose(units, costs, room)
    chunks = 0
    while f"\0table rows {chunks:04d}" in chosen:
        chunks += 1
    matrices = [n for n in chosen if n in kl]
    left = room - sum(costs[n] for n in matrices) - sum(costs[f"\0table rows {i:04d}"] for i in range(chunks))
    rows = bounds[chunks]
    if rows < bounds[-1] and table_kl[rows] > 0:  # what is left buys more rows, in their order
        rows = min(bounds[-1], rows + max(0, left - (0 if chunks else split_bytes)) // row_bytes)
    return matrices, rows

