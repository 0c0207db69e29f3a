"""Text in the terminal: `generate` (one prompt, streamed) and `chat` (multi-turn with a bundle).

Both run the shared loop of generate.py over whichever runner the source needs: the eager model for
`--model`, the bundle's own runtime for `--bundle`.
"""

from __future__ import annotations

import sys
import time

from .errors import UserError
from .generate import EagerRunner, Runner, Sampling, generate
from .tokenizer import StreamDecoder, Tokenizer, encode_chat


def open_source(
    model: str | None = None,
    checkpoint: str | None = None,
    random_weights: bool = False,
    bundle: str | None = None,
    context: int | None = None,
    log=print,
) -> tuple[Runner, Tokenizer]:
    """A runner and its tokenizer: the eager model (`model`) or an exported bundle (`bundle`)."""
    if (model is None) == (bundle is None):
        raise UserError("Give either --model or --bundle.")
    if bundle is not None:
        from .bundle import read_bundle
        from .pipeline import open_runner

        b = read_bundle(bundle)
        return open_runner(b), Tokenizer(b.tokenizer_path)
    from .load import load_model
    from .pipeline import make_spec

    spec = make_spec(model, "onnx", None, context, None)  # the same context/chunk defaults as exports
    loaded = load_model(model, checkpoint=checkpoint, random_weights=random_weights, log=log)
    return EagerRunner(loaded.model, spec.context, spec.chunk), loaded.tokenizer


def stream(runner: Runner, tokenizer: Tokenizer, ids: list[int], max_new_tokens: int, sampling: Sampling, out=None) -> tuple[list[int], float]:
    """Print the continuation as it comes; return the new ids and decode tokens/s."""
    out = out or sys.stdout
    decoder = StreamDecoder(tokenizer)
    new: list[int] = []
    first = time.perf_counter()
    for token in generate(runner, ids, max_new_tokens, tokenizer.stop_ids, sampling):
        if not new:
            first = time.perf_counter()
        new.append(token)
        out.write(decoder.push(token))
        out.flush()
    out.write(decoder.flush() + "\n")
    rate = (len(new) - 1) / (time.perf_counter() - first) if len(new) > 1 else 0.0
    return new, rate


def generate_text(
    prompt: str,
    model: str | None = None,
    checkpoint: str | None = None,
    random_weights: bool = False,
    bundle: str | None = None,
    chat: bool = False,
    max_new_tokens: int = 64,
    temperature: float = 0.0,
    top_k: int = 64,
    top_p: float = 0.95,
    seed: int = 0,
    context: int | None = None,
    log=print,
) -> list[int]:
    """Stream a continuation of `prompt` to stdout; return the new token ids."""
    runner, tokenizer = open_source(model, checkpoint, random_weights, bundle, context, log)
    ids = encode_chat(tokenizer, [{"role": "user", "content": prompt}]) if chat else tokenizer.encode(prompt)
    sampling = Sampling(temperature=temperature, top_k=top_k, top_p=top_p, seed=seed)
    new, rate = stream(runner, tokenizer, ids, max_new_tokens, sampling)
    log(f"{len(ids)} prompt tokens, {len(new)} new tokens, decode {rate:.1f} tokens/s")
    return new


class Conversation:
    """A multi-turn chat over one runner whose cache carries the history: each turn prefills only the
    tokens that are new since the last one (closing the model's turn, then the user's message)."""

    def __init__(self, runner: Runner, tokenizer: Tokenizer, system: str | None = None):
        self.runner, self.tokenizer, self.system = runner, tokenizer, system
        self.fed: list[int] = []  # every token the cache holds, in order
        self.pending: int | None = None  # the last reply token: sampled, not yet fed

    def reset(self) -> None:
        self.runner.reset()
        self.fed, self.pending = [], None

    def next_ids(self, text: str) -> list[int]:
        """What the cache still needs before the model answers `text`."""
        tok = self.tokenizer
        if not self.fed:
            messages = ([{"role": "system", "content": self.system}] if self.system else []) + [{"role": "user", "content": text}]
            return encode_chat(tok, messages)
        close = ([self.pending] if self.pending is not None else []) + [tok.id_of("<end_of_turn>")] + tok.encode("\n", bos=False)
        return close + encode_chat(tok, [{"role": "user", "content": text}])[1:]  # no second <bos>

    def say(self, text: str, max_new_tokens: int, sampling: Sampling, out=None) -> tuple[list[int], float]:
        """Stream the model's answer to `text`; returns its ids and decode tokens/s."""
        ids = self.next_ids(text)
        if self.runner.pos + len(ids) + max_new_tokens > self.runner.max_context and self.fed:
            raise UserError("The conversation no longer fits the context; type /reset to start over.")
        if self.runner.pos != len(self.fed):
            raise RuntimeError("the runner was used outside this conversation")
        new, rate = stream(self.runner, self.tokenizer, ids, max_new_tokens, sampling, out)
        # A reply cut by max_new_tokens leaves its last token unfed; one ended by a stop id does not.
        self.fed += ids
        decoded = self.runner.pos - len(self.fed)
        self.fed += new[:decoded]
        self.pending = new[decoded] if decoded < len(new) else None
        return new, rate


def chat(bundle: str, max_new_tokens: int = 256, temperature: float = 0.0, seed: int = 0, log=print) -> None:
    """Interactive multi-turn chat; an empty line or end of input quits, /reset starts over."""
    import psutil

    runner, tokenizer = open_source(bundle=bundle, log=log)
    conversation = Conversation(runner, tokenizer)
    sampling = Sampling(temperature=temperature, seed=seed)
    log("type a message; /reset starts over, an empty line quits")
    while True:
        try:
            text = input("> ").strip()
        except EOFError:
            return
        if not text:
            return
        if text == "/reset":
            conversation.reset()
            continue
        new, rate = conversation.say(text, max_new_tokens, sampling)
        rss = psutil.Process().memory_info().rss / 2**20
        log(f"[{len(new)} tokens, {rate:.1f} tokens/s, context {runner.pos}/{runner.max_context}, RSS {rss:.0f} MiB]")
