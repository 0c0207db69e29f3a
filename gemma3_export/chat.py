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
    vision: bool = False,
) -> tuple[Runner, Tokenizer]:
    """A runner and its tokenizer: the eager model (`model`) or an exported bundle (`bundle`).
    `vision`: the runner also gets `encode_images(pixels)` and `vision_config` (images.prompt_images)."""
    if (model is None) == (bundle is None):
        raise UserError("Give either --model or --bundle.")
    if bundle is not None:
        from .bundle import read_bundle
        from .pipeline import open_runner

        b = read_bundle(bundle)
        runner = open_runner(b)
        if vision:
            _bundle_vision(runner, b)
        return runner, Tokenizer(b.tokenizer_path)
    from .load import load_model
    from .pipeline import make_spec

    spec = make_spec(model, "onnx", None, context, None, vision)  # the same context/chunk defaults as exports
    loaded = load_model(model, checkpoint=checkpoint, random_weights=random_weights, log=log)
    runner = EagerRunner(loaded.model, spec.context, spec.chunk)
    if vision:
        _eager_vision(runner, loaded, model, checkpoint, random_weights, log)
    return runner, loaded.tokenizer


def _eager_vision(runner: EagerRunner, loaded, model: str, checkpoint, random_weights: bool, log) -> None:
    import torch

    from .load import load_vision

    encoder = load_vision(model, loaded.model.config.hidden_size, checkpoint, random_weights, log=log)
    runner.vision_config = encoder.config
    runner.image_token_id = loaded.model.model.image_token_id = encoder.config.image_token_index

    @torch.no_grad()
    def encode(pixels):
        return encoder(torch.from_numpy(pixels)).numpy()

    runner.encode_images = encode


def _bundle_vision(runner: Runner, bundle) -> None:
    from .images import vision_config_of
    from .pipeline import open_vision_encoder

    encoder = open_vision_encoder(bundle)  # one sentence for a bundle without --vision
    runner.vision_config = vision_config_of(bundle.manifest["vision"])
    runner.encode_images = encoder


def _check_images(paths: list[str] | None) -> None:
    """A bad image file is reported before any model is loaded."""
    from .images import load_image

    for path in paths or []:
        load_image(path)


def with_images(ids: list[int], runner: Runner, tokenizer: Tokenizer, image: list[str], pan_and_scan: bool, chat: bool):
    """`ids` with the images' blocks placed before the prompt text (inside the user turn for chat),
    and their embeddings for the runner."""
    from .images import prompt_images

    image_ids, embeds = prompt_images(image, runner.vision_config, runner.encode_images, tokenizer, pan_and_scan)
    at = 1  # after <bos>
    if chat:  # after "<start_of_turn>user\n": where the chat of an empty message and of the prompt part
        empty = encode_chat(tokenizer, [{"role": "user", "content": ""}])
        at = next((i for i, (a, b) in enumerate(zip(empty, ids)) if a != b), len(empty))
    return ids[:at] + image_ids + ids[at:], embeds


def stream(runner: Runner, tokenizer: Tokenizer, ids: list[int], max_new_tokens: int, sampling: Sampling, out=None,
           images=None) -> tuple[list[int], float]:
    """Print the continuation as it comes; return the new ids and decode tokens/s."""
    out = out or sys.stdout
    decoder = StreamDecoder(tokenizer)
    new: list[int] = []
    first = time.perf_counter()
    for token in generate(runner, ids, max_new_tokens, tokenizer.stop_ids, sampling, images):
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
    image: list[str] | None = None,
    pan_and_scan: bool = False,
    log=print,
) -> list[int]:
    """Stream a continuation of `prompt` (after the `image` files, if any) to stdout; return the new ids."""
    _check_images(image)
    runner, tokenizer = open_source(model, checkpoint, random_weights, bundle, context, log, vision=bool(image))
    ids = encode_chat(tokenizer, [{"role": "user", "content": prompt}]) if chat else tokenizer.encode(prompt)
    images = None
    if image:
        ids, images = with_images(ids, runner, tokenizer, image, pan_and_scan, chat)
    sampling = Sampling(temperature=temperature, top_k=top_k, top_p=top_p, seed=seed)
    new, rate = stream(runner, tokenizer, ids, max_new_tokens, sampling, images=images)
    log(f"{len(ids)} prompt tokens, {len(new)} new tokens, decode {rate:.1f} tokens/s")
    return new


class Conversation:
    """A multi-turn chat over one runner whose cache carries the history: each turn prefills only the
    tokens that are new since the last one (closing the model's turn, then the user's message)."""

    def __init__(self, runner: Runner, tokenizer: Tokenizer, system: str | None = None,
                 image: list[str] | None = None, pan_and_scan: bool = False):
        self.runner, self.tokenizer, self.system = runner, tokenizer, system
        self.image, self.pan_and_scan = image, pan_and_scan  # shown with the first message
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
        ids, images = self.next_ids(text), None
        if self.image and not self.fed:
            ids, images = with_images(ids, self.runner, self.tokenizer, self.image, self.pan_and_scan, chat=True)
        if self.runner.pos + len(ids) + max_new_tokens > self.runner.max_context and self.fed:
            raise UserError("The conversation no longer fits the context; type /reset to start over.")
        if self.runner.pos != len(self.fed):
            raise RuntimeError("the runner was used outside this conversation")
        new, rate = stream(self.runner, self.tokenizer, ids, max_new_tokens, sampling, out, images)
        # A reply cut by max_new_tokens leaves its last token unfed; one ended by a stop id does not.
        self.fed += ids
        decoded = self.runner.pos - len(self.fed)
        self.fed += new[:decoded]
        self.pending = new[decoded] if decoded < len(new) else None
        return new, rate


def chat(bundle: str, max_new_tokens: int = 256, temperature: float = 0.0, seed: int = 0,
         image: list[str] | None = None, pan_and_scan: bool = False, log=print) -> None:
    """Interactive multi-turn chat; an empty line or end of input quits, /reset starts over.
    `image` files go with the first message (and again after /reset)."""
    import psutil

    _check_images(image)
    runner, tokenizer = open_source(bundle=bundle, log=log, vision=bool(image))
    conversation = Conversation(runner, tokenizer, image=image, pan_and_scan=pan_and_scan)
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
