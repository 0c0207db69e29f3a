"""Which rows of the 262k-token table matter (issue 10): an order of the vocabulary, most used first.

The tied embedding / LM head is most of a small Gemma 3 (189 of the 270M's 305 MB in the `gguf`
scheme), and most of its rows are tokens a given text never reads or writes. `--max-size` rounds the
least used rows to int4 and keeps the rest as they were (exporters/onnx.py::split_head_rows).

A row matters when a text reads its token (the embedding) or when the model gives its token a high
probability (the head: a rounded row there changes the top of the softmax). `importance` measures both
on calibration text: the user's (`--data`), or text sampled from the float model itself; the
tokenizer's own order (`prior_order`) breaks ties among the many rows a calibration text never
touches. The tokenizer's order alone is a poor ranking (docs/gguf.md: 0.92 against 0.97 top-1 at 55%
of the rows): BPE merge order follows a multilingual training corpus, not what the model writes.
"""

from __future__ import annotations

import base64
from collections.abc import Iterable

import numpy as np

from .tokenizer import END_OF_TURN, START_OF_TURN, Tokenizer


def prior_order(tokenizer: Tokenizer) -> np.ndarray:
    """Token ids, most likely used first, from the tokenizer alone."""
    from sentencepiece import sentencepiece_model_pb2 as sp_pb2

    pieces = sp_pb2.ModelProto.FromString(tokenizer.model_proto).pieces
    n, piece = len(pieces), sp_pb2.ModelProto.SentencePiece
    kept = {tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id, tokenizer.id_of(START_OF_TURN),
            tokenizer.id_of(END_OF_TURN)}
    group = np.empty(n, np.int64)  # 0: always used, 1: ordinary pieces by score, 2: never produced
    score = np.empty(n, np.float64)
    for i, p in enumerate(pieces):
        score[i] = p.score
        if i in kept or p.type in (piece.BYTE, piece.USER_DEFINED):
            group[i] = 0
        elif p.type == piece.NORMAL:
            group[i] = 1
        else:  # CONTROL, UNUSED, UNKNOWN
            group[i] = 2
    return np.lexsort((np.arange(n), -score, group))  # last key first: group, then score, then id


def importance(model, tokens: Iterable[list[int]], log=None) -> np.ndarray:
    """[V] float64: for each token, the largest probability the model gives it at any position of
    `tokens` (sequences of ids, teacher-forced) plus the number of times it occurs there."""
    import torch

    vocab = model.config.vocab_size
    prob, count = torch.zeros(vocab, dtype=torch.float64), torch.zeros(vocab, dtype=torch.float64)
    rows = [list(map(int, r)) for r in tokens]
    with torch.no_grad():
        for i, row in enumerate(rows):
            ids = torch.tensor([row])
            prob = torch.maximum(prob, model(ids)[0].softmax(-1).amax(0).double())
            count.index_add_(0, ids[0], torch.ones(len(row), dtype=torch.float64))
            if log and (i + 1) % max(1, len(rows) // 4) == 0:
                log(f"  scored {i + 1}/{len(rows)} calibration sequences")
    return (prob + count).numpy()


def row_order(tokenizer: Tokenizer, scores: np.ndarray) -> np.ndarray:
    """Row ids, most used first: by `scores` (`importance`, one per row of the model's table; higher
    first), then `prior_order`. Rows past the tokenizer's vocabulary (the 4b+ tables' image rows) come
    last: no text produces them."""
    n = len(scores)
    prior_rank = np.arange(n, dtype=np.int64)  # rows the tokenizer lacks keep their place, after its own
    known = min(n, tokenizer.vocab_size)
    prior = prior_order(tokenizer)
    prior = prior[prior < known]
    prior_rank[prior] = np.arange(len(prior))
    return np.lexsort((prior_rank, -np.asarray(scores, np.float64)))


def split_rows(vocab: int, int4_rows: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The two row sets of a split table and the map back: (kept rows, int4 rows, slot), where slot[token]
    is the token's row in the two tables concatenated (kept first)."""
    mask = np.zeros(vocab, bool)
    mask[np.asarray(int4_rows, np.int64)] = True
    kept, rounded = np.flatnonzero(~mask), np.flatnonzero(mask)
    slot = np.empty(vocab, np.int64)
    slot[np.concatenate([kept, rounded])] = np.arange(vocab)
    return kept, rounded, slot


def split_record(budget: int, int4_rows: np.ndarray, vocab: int, block: int) -> dict:
    """The manifest's `target_info.table_split`: the budget, and which rows went to int4 (a bitmap)."""
    mask = np.zeros(vocab, bool)
    mask[int4_rows] = True
    return {"max_size_mb": budget / 1e6, "int4_rows": int(mask.sum()), "rows": int(vocab), "int4_block": block,
            "int4_row_bitmap": base64.b64encode(np.packbits(mask).tobytes()).decode()}


def int4_rows_of(split: dict) -> np.ndarray:
    """The row ids a manifest's `table_split` rounded to int4."""
    bits = np.unpackbits(np.frombuffer(base64.b64decode(split["int4_row_bitmap"]), np.uint8))[: split["rows"]]
    return np.flatnonzero(bits)
