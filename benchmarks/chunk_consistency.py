"""Does a bundle compute the same logits whether tokens come as one prefill chunk or as decode steps?

    python benchmarks/chunk_consistency.py BUNDLE [BUNDLE ...]

Prefills 150 tokens of the bundled text, then the next 10 either as one chunk or as 10 decode steps,
and compares the last logits. A runtime whose kernels round differently for one row than for many
(dynamic activation quantization) shows it here; docs/executorch.md.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gemma3_export.bundle import read_bundle  # noqa: E402
from gemma3_export.pipeline import open_runner  # noqa: E402
from gemma3_export.tokenizer import Tokenizer  # noqa: E402
from gemma3_export.validate import validation_ids  # noqa: E402


def compare(path: str) -> tuple[float, bool]:
    b = read_bundle(path)
    ids = validation_ids(Tokenizer(b.tokenizer_path), 160)
    runner = open_runner(b)
    runner.prefill(ids[:150])
    chunked = runner.prefill(ids[150:160])
    runner.reset()
    runner.prefill(ids[:150])
    for token in ids[150:160]:
        stepped = runner.decode(token)
    return float(np.abs(chunked - stepped).max()), int(chunked.argmax()) == int(stepped.argmax())


if __name__ == "__main__":
    for path in sys.argv[1:]:
        diff, same = compare(path)
        print(f"{path}: max abs logit difference {diff:.3g}, same argmax: {same}")
