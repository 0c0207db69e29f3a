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


def chat(bundle: str, max_new_tokens: int = 256, temperature: float = 0.0, seed: int = 0, log=print) -> None:
    """Interactive multi-turn chat; an empty line or end of input quits, /reset starts over."""
    runner, tokenizer = open_source(bundle=bundle, log=log)
    sampling = Sampling(temperature=temperature, seed=seed)
    messages: list[dict] = []
    log("type a message; /reset starts over, an empty line quits")
    while True:
        try:
            text = input("> ").strip()
        except EOFError:
            return
        if not text:
            return
        if text == "/reset":
            messages.clear()
            runner.reset()
            continue
        messages.append({"role": "user", "content": text})
        ids = encode_chat(tokenizer, messages)
        runner.reset()  # re-prefill the whole conversation: simple and exact
        new, rate = stream(runner, tokenizer, ids, max_new_tokens, sampling)
        messages.append({"role": "assistant", "content": tokenizer.decode(new)})
        log(f"[{len(new)} tokens, {rate:.1f} tokens/s, context {runner.pos}/{runner.max_context}]")
