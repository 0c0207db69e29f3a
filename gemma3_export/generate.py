"""The generation loop every runtime shares: chunked prefill, decode, sampling, stop tokens.

A runner (eager here; onnxruntime, ExecuTorch and Core ML ones in `runtimes/`) implements `_step`:
one call of the exported forward over tokens[1, T] at absolute position `pos`, returning the last
token's logits. Everything else (chunk plans, the context limit, sampling, streaming) is here once.

numpy in, numpy out: this module never imports torch at import time, so a bundle's runner
(runtimes/onnx.py) loads and generates without it (`import torch` alone adds ~220 MB of peak RSS).
Only EagerRunner, handed a torch model, uses torch.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from .errors import UserError

if TYPE_CHECKING:
    import torch


class Runner:
    """Chunked prefill and decode over a cached forward; subclasses implement `_step` and `_reset`."""

    max_context: int
    chunk: int  # the largest prefill chunk the artifact takes

    def __init__(self) -> None:
        self.pos = 0

    def _step(self, tokens: np.ndarray, pos: int) -> np.ndarray:
        """Run tokens int64[1, T] starting at `pos`; return float32 logits [vocab] of the last one."""
        raise NotImplementedError

    def _reset(self) -> None:
        raise NotImplementedError

    def reset(self) -> None:
        """Forget the conversation: the next token goes to position 0."""
        self._reset()
        self.pos = 0

    def chunk_plan(self, n: int, image_runs: list[tuple[int, int]] = ()) -> list[int]:
        """Sizes of the forward calls that prefill n tokens: full chunks, then the rest. A chunk never
        cuts an image block (`image_runs`: [start, end) of each run of soft tokens): it ends before
        the block instead, so the block's bidirectional attention sees all of it in one call."""
        sizes, start = [], 0
        while start < n:
            end = min(start + self.chunk, n)
            cut = next(((a, b) for a, b in image_runs if a < end < b), None)
            if cut is not None:
                if cut[1] - cut[0] > self.chunk:
                    raise UserError(
                        f"An image of {cut[1] - cut[0]} tokens does not fit the prefill chunk of {self.chunk}; "
                        "export with a --chunk of at least the image's token count."
                    )
                end = cut[0] if cut[0] > start else cut[1]
            sizes.append(end - start)
            start = end
        return sizes

    def prefill(self, ids: list[int], images: np.ndarray | None = None) -> np.ndarray:
        """Feed `ids` after what is already in the cache; returns the last token's logits.
        `images` float32 [N, tokens, hidden] (the vision encoder's output) fill the image soft tokens
        of `ids`, in order."""
        if not ids:
            raise UserError("The prompt is empty.")
        self._check_room(len(ids))
        tokens = np.asarray(ids, dtype=np.int64)[None]
        embeds, runs = self._place_images(tokens[0], images)
        start = 0
        for size in self.chunk_plan(len(ids), runs):
            part = tokens[:, start : start + size]
            if embeds is None:
                logits = self._step(part, self.pos)
            else:
                logits = self._step_images(part, self.pos, embeds[None, start : start + size])
            self.pos += size
            start += size
        return logits

    image_token_id: int | None = None  # set by runners whose model takes images

    def _place_images(self, tokens: np.ndarray, images: np.ndarray | None):
        """[T, hidden] rows aligned with tokens (image rows filled, the rest zero) and the image runs."""
        if images is None or len(images) == 0:
            return None, []
        if self.image_token_id is None:
            raise UserError("This model reads text only; it takes no images.")
        from .images import image_runs

        runs = image_runs(tokens.tolist(), self.image_token_id)
        flat = np.asarray(images, dtype=np.float32).reshape(-1, images.shape[-1])
        if sum(b - a for a, b in runs) != len(flat):
            raise UserError(f"The prompt has {sum(b - a for a, b in runs)} image tokens for {len(flat)} image embeddings.")
        embeds = np.zeros((len(tokens), flat.shape[1]), np.float32)
        embeds[tokens == self.image_token_id] = flat
        return embeds, runs

    def _step_images(self, tokens: np.ndarray, pos: int, image_embeds: np.ndarray) -> np.ndarray:
        """`_step` with image_embeds float32[1, T, hidden] standing where tokens hold the image token."""
        raise UserError("This runtime takes no images.")

    def decode(self, token: int) -> np.ndarray:
        self._check_room(1)
        logits = self._step(np.asarray([[token]], dtype=np.int64), self.pos)
        self.pos += 1
        return logits

    def _check_room(self, n: int) -> None:
        if self.pos + n > self.max_context:
            raise UserError(
                f"{self.pos + n} tokens do not fit the context of {self.max_context}; "
                "shorten the prompt or export with a larger --context."
            )


class EagerRunner(Runner):
    """The PyTorch model with its static caches: the reference every artifact is compared with."""

    def __init__(self, model: torch.nn.Module, max_context: int, chunk: int, image_token_id: int | None = None):
        super().__init__()
        if chunk > model.config.sliding_window:
            raise UserError(f"The prefill chunk {chunk} is larger than the sliding window {model.config.sliding_window}.")
        self.model, self.max_context, self.chunk = model.eval(), max_context, chunk
        model.setup_caches(max_context)
        self.image_token_id = image_token_id

    def _step(self, tokens: np.ndarray, pos: int) -> np.ndarray:
        return self._forward(tokens, pos)

    def _step_images(self, tokens: np.ndarray, pos: int, image_embeds: np.ndarray) -> np.ndarray:
        return self._forward(tokens, pos, image_embeds)

    def _forward(self, tokens: np.ndarray, pos: int, *image_embeds: np.ndarray) -> np.ndarray:
        import torch  # already loaded with the model; imported here so bundle runners never load it

        with torch.no_grad():
            logits = self.model(torch.from_numpy(tokens), torch.tensor([pos]), *map(torch.from_numpy, image_embeds))
        return logits[0].float().numpy()

    def _reset(self) -> None:
        self.model.reset_caches()


@dataclass
class Sampling:
    """temperature 0 is greedy; otherwise sample from the top_k / top_p filtered distribution.
    Draws come from numpy's PCG64 seeded with `seed`: reproducible, the same on every runtime."""

    temperature: float = 0.0
    top_k: int = 64
    top_p: float = 0.95
    seed: int = 0

    def __post_init__(self) -> None:
        if self.temperature < 0 or not 0 < self.top_p <= 1 or self.top_k < 0:
            raise UserError("Sampling needs temperature >= 0, 0 < top_p <= 1 and top_k >= 0.")
        self._rng = np.random.default_rng(self.seed)

    def __call__(self, logits: np.ndarray) -> int:
        if self.temperature == 0:
            return int(np.argmax(logits))
        x = np.asarray(logits, dtype=np.float32) / np.float32(self.temperature)  # [vocab]
        ids = np.arange(x.size)  # the candidates
        if self.top_k:
            k = min(self.top_k, x.size)
            ids = np.flatnonzero(x >= np.partition(x, -k)[-k])  # ties at the k-th value are all kept
        probs = np.exp(x[ids] - x[ids].max())
        probs /= probs.sum()
        if self.top_p < 1:
            order = np.argsort(-probs, kind="stable")
            sorted_p = probs[order]
            drop = np.cumsum(sorted_p) - sorted_p > self.top_p  # keep the smallest set reaching top_p
            probs[order[drop]] = 0
        p = probs.astype(np.float64)
        return int(ids[self._rng.choice(ids.size, p=p / p.sum())])


def generate(
    runner: Runner,
    prompt_ids: list[int],
    max_new_tokens: int,
    stop_ids: tuple[int, ...] | list[int] = (1, 106),
    sampling: Sampling | None = None,
    images: np.ndarray | None = None,
) -> Iterator[int]:
    """Yield new token ids after the prompt until a stop id (not yielded) or `max_new_tokens`.
    `images` [N, tokens, hidden]: the image embeddings for the prompt's soft tokens (Runner.prefill)."""
    sampling = sampling or Sampling()
    logits = runner.prefill(prompt_ids, images)
    for i in range(max_new_tokens):
        token = sampling(logits)
        if token in stop_ids:
            return
        yield token
        if i + 1 == max_new_tokens or runner.pos >= runner.max_context:
            return  # done, or the context is full
        logits = runner.decode(token)
