"""Spend the table's bits on the tokens that are used (issue 10): the 270M's tied 262k x 640
embedding / LM head is 189 of the `gguf` scheme's 304 MB. Most of its rows are tokens a given text
never produces or is never likely to produce, so rows are ranked by how much a calibration text uses
them, and the least used fraction is rounded again to int4 (blocks of 32) while the rest keep the
GGUF's Q8_0 blocks. Eager simulations of the `gguf` reference (gguf_mix.py's setup and scoring: int8
activations per block, 512 teacher-forced positions of the bundled validation text against the float
model).

    python benchmarks/gguf_vocab_split.py [--fractions ...] [--json docs/gguf_vocab_split.json]

Calibration: exactly what `--max-size` ranks on (pipeline._calibrate): 16 sequences of 96 tokens
sampled from the float model itself (temperature 1; qat_data.self_generated, cached under
bundles/calibration, shared with the export), disjoint from the scored text. A row's importance: the
largest probability the float model gives its token at any calibration
position, plus the number of times the token occurs there (as input: its embedding row is read).
"least used" is what `--max-size` does (vocab_rows.importance, ties broken by the tokenizer's order).
"tokenizer order": vocab_rows.prior_order alone (BPE merge rank; no calibration). Control: the same
fractions of rows chosen at random.

Size: `gguf_mix.size_mb` of the gguf scheme, less half a byte per weight of each int4 row (its fp32
scale per block of 32 stays); the embedding gathers from the head's table and scales (no copy).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from gguf_mix import EMBED, score, setup, size_mb, write  # noqa: E402  (the same reference and scoring)

from gemma3_export.exporters import onnx as ox  # noqa: E402
from gemma3_export.vocab_rows import prior_order  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
FRACTIONS = (0.3, 0.4, 0.5, 0.55, 0.6)
RANKINGS = ("least used", "tokenizer order", "random (control)")


def int4_rows(rows: torch.Tensor):
    """A rounding that puts `rows` of the table on int4 blocks of 32 and leaves the others as they are."""
    def rounding(w: torch.Tensor) -> torch.Tensor:
        w = w.clone()
        w[rows] = ox.fake_nbits(w[rows], 4, 32)
        return w
    return rounding


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--length", type=int, default=512)
    ap.add_argument("--fractions", type=float, nargs="+", default=FRACTIONS)
    ap.add_argument("--rankings", nargs="+", default=RANKINGS, choices=RANKINGS)
    ap.add_argument("--json")
    args = ap.parse_args()
    from gemma3_export.load import load_model
    from gemma3_export.pipeline import _calibrate

    grid, ids, ref, base = setup(args.length)
    loaded = load_model("270m", log=lambda *_: None)
    ranked = _calibrate(loaded, "270m", None, None, ROOT / "bundles/calibration", log=print)  # as --max-size ranks
    vocab, hidden = base.config.vocab_size, base.config.hidden_size
    orders = {"least used": torch.from_numpy(ranked["table_order"]()),
              "tokenizer order": torch.from_numpy(prior_order(loaded.tokenizer)),
              "random (control)": torch.randperm(vocab, generator=torch.Generator().manual_seed(0))}
    full = size_mb(base, grid, {})
    rows = []
    for frac in args.fractions:
        n4 = int(frac * vocab)
        for how in args.rankings:
            which = orders[how][vocab - n4:]
            if how.startswith("random") and frac not in (0.4, 0.55):
                continue
            rows.append({"int4_rows": round(frac, 2), "chosen": how, "size_mb": round(full - n4 * hidden / 2 / 1e6, 1),
                         **score(base, {EMBED: int4_rows(which)}, ids, ref)})
            print(rows[-1], flush=True)
    write(args.json, args.length, rows)


if __name__ == "__main__":
    main()
