"""`perplexity`: teacher-forced scoring of a text through a runner (the eager model or a bundle).

Every position is scored: the runner is fed the text one token at a time (its decode step, which
carries the cache across the sliding window and around the ring), and the logits after token i
predict token i + 1. Prints perplexity and top-1 accuracy; `dump` saves, per position, the token
ids, the top-20 logits and their ids, and the log-sum-exp of the logits (so top-20 probabilities
can be recovered exactly), which is how a quantized bundle is compared with the float model on a
user's own text.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import numpy as np

from .errors import UserError

TOP_K = 20


def score(runner, ids: list[int], log=print) -> dict:
    """Teacher-forced NLL and top-1 accuracy of ids[1:] given the prefix; top-20 logits per position."""
    runner.reset()
    n = len(ids)
    nll, hits = 0.0, 0
    top_ids = np.zeros((n, TOP_K), np.int64)
    top_logits = np.zeros((n, TOP_K), np.float32)
    lse = np.zeros(n, np.float64)
    start = time.perf_counter()
    for i, token in enumerate(ids):
        logits = runner.decode(token).astype(np.float64)  # [V]: predicts ids[i + 1]
        m = logits.max()
        lse[i] = m + math.log(np.exp(logits - m).sum())
        top = np.argpartition(-logits, TOP_K)[:TOP_K]
        top = top[np.argsort(-logits[top])]
        top_ids[i], top_logits[i] = top, logits[top]
        if i + 1 < n:
            nll += lse[i] - logits[ids[i + 1]]
            hits += int(top[0] == ids[i + 1])
        if (i + 1) % 256 == 0:
            log(f"  {i + 1}/{n} tokens, {(i + 1) / (time.perf_counter() - start):.1f} tokens/s")
    scored = n - 1
    return {
        "tokens": n,
        "scored": scored,
        "perplexity": math.exp(nll / scored),
        "top1": hits / scored,
        "ids": np.asarray(ids, np.int64),
        "top_ids": top_ids,
        "top_logits": top_logits,
        "logsumexp": lse,
    }


def perplexity(
    model: str | None = None,
    checkpoint: str | None = None,
    random_weights: bool = False,
    bundle: str | None = None,
    text: str | Path = "",
    dump: str | Path | None = None,
    log=print,
) -> dict:
    """Score the UTF-8 file `text` with the eager model (`model`) or a bundle; print and return
    perplexity and top-1 accuracy. A text longer than the context is scored up to the context."""
    from .chat import open_source

    path = Path(text)
    if not path.is_file():
        raise UserError(f"No text file at {path}.")
    try:
        content = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise UserError(f"{path} is not UTF-8 text.") from None
    runner, tokenizer = open_source(model, checkpoint, random_weights, bundle, None, log)
    ids = tokenizer.encode(content)
    if len(ids) < 2:
        raise UserError(f"{path} holds fewer than one token to score.")
    if len(ids) > runner.max_context:
        log(f"the text has {len(ids)} tokens; scoring the first {runner.max_context} (the context)")
        ids = ids[: runner.max_context]
    result = score(runner, ids, log)
    source = bundle or model
    log(f"{source}: perplexity {result['perplexity']:.3f}, top-1 accuracy {result['top1']:.3f} "
        f"over {result['scored']} tokens")
    if dump:
        np.savez_compressed(dump, **{k: result[k] for k in ("ids", "top_ids", "top_logits", "logsumexp")})
        log(f"wrote {dump}")
    return {k: v for k, v in result.items() if not isinstance(v, np.ndarray)}
