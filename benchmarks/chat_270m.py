"""Two-turn chat on real 270M bundles, past the sliding window (docs/mobile.md).

    python benchmarks/chat_270m.py BUNDLE [BUNDLE ...] [--json docs/chat_270m.json] [--threads 2]

What `gemma3-export chat BUNDLE` does, scripted: turn one asks about a passage of the bundled text long
enough that turn two starts past the 512-token window; turn two feeds only its new tokens to the same
cache. Checks, per bundle: turn two's greedy reply equals that of a fresh runner that re-reads the whole
history, and how long turn two takes both ways (tokens fed, seconds).
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import time
from importlib import resources
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

NEW_TOKENS = 24
QUESTION = "Which two people does the passage mention? Answer in one sentence."


def passage(tokenizer, tokens: int) -> str:
    """The bundled English text, cut to about `tokens` tokens at a sentence end."""
    text = resources.files("gemma3_export").joinpath("data/validation.txt").read_text()
    while len(tokenizer.encode(text, bos=False)) < tokens:
        text += "\n\n" + text
    words = text.split(" ")
    lo, hi = 1, len(words)
    while lo < hi:  # the longest prefix of words within `tokens`
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if len(tokenizer.encode(" ".join(words[:mid]), bos=False)) <= tokens else (lo, mid - 1)
    return " ".join(words[:lo])


def two_turns(bundle: str, threads: int, passage_tokens: int | None = None) -> dict:
    import torch

    from gemma3_export.bundle import read_bundle
    from gemma3_export.chat import Conversation
    from gemma3_export.generate import Sampling, generate
    from gemma3_export.pipeline import open_runner
    from gemma3_export.tokenizer import Tokenizer

    torch.set_num_threads(threads)
    b = read_bundle(bundle)
    tok, window = Tokenizer(b.tokenizer_path), b.manifest["config"]["sliding_window"]
    conv = Conversation(open_runner(b), tok)
    first = "Read this passage:\n\n" + passage(tok, passage_tokens or window + 64) + "\n\nWhat is it about?"
    turn1_tokens = len(conv.next_ids(first))
    reply1, _ = conv.say(first, NEW_TOKENS, Sampling(), out=io.StringIO())
    before = conv.runner.pos
    ids = conv.next_ids(QUESTION)
    history = conv.fed + ids
    t = time.perf_counter()
    reply2, _ = conv.say(QUESTION, NEW_TOKENS, Sampling(), out=io.StringIO())
    reused_s = time.perf_counter() - t
    fresh = open_runner(b)
    t = time.perf_counter()
    replay = list(generate(fresh, history, NEW_TOKENS, tok.stop_ids, Sampling()))
    fresh_s = time.perf_counter() - t
    return {
        "bundle": bundle, "target": b.target, "scheme": b.manifest["quant"]["name"], "window": window,
        "turn1_prompt_tokens": turn1_tokens, "turn2_starts_at": before, "turn2_new_tokens": len(ids),
        "history_tokens": len(history), "turn2_s_reusing_cache": round(reused_s, 2),
        "turn2_s_fresh_runner": round(fresh_s, 2), "reply1": tok.decode(reply1), "reply2": tok.decode(reply2),
        "reply2_equals_fresh_replay": reply2 == replay,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("bundles", nargs="+")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--passage-tokens", type=int, help="turn one's passage (default: the window + 64)")
    p.add_argument("--json")
    args = p.parse_args()
    rows = []
    for bundle in args.bundles:
        rows.append(two_turns(bundle, args.threads, args.passage_tokens))
        print(json.dumps(rows[-1]), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
