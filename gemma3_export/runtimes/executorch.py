"""A Runner over a bundle's `.pte` in ExecuTorch's Python runtime (`executorch.runtime`), XNNPACK delegate.

The KV cache is the program's own mutable buffers, so `_step` passes only tokens and the position.
`reset()` clears nothing and needs nothing cleared: every mask is derived from positions inside the
graph, so after a restart at position 0 no slot written by the old conversation is ever attended
(global slots past the query are causal-masked, ring slots carry positions computed from input_pos),
and masked keys get probability exactly 0 against finite stale values. ExecuTorch's stock runner
resets the same way (it only rewinds its position). Tests check a reset conversation against a fresh one.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ..bundle import Bundle
from ..errors import UserError
from ..generate import Runner


def set_threads(threads: int) -> None:
    """Size ExecuTorch's shared CPU threadpool (XNNPACK uses it); process-wide."""
    from executorch.extension.pybindings.portable_lib import _unsafe_reset_threadpool

    _unsafe_reset_threadpool(threads)


class ExecuTorchRunner(Runner):
    """`forward(tokens[1, T], input_pos[1]) -> logits[1, vocab]` of a .pte, T up to `chunk`."""

    runtime_note = "executorch runtime (XNNPACK)"

    def __init__(self, path: Path, max_context: int, chunk: int, threads: int | None = None):
        super().__init__()
        import executorch.kernels.quantized  # noqa: F401  (registers the quantized embedding kernels)
        from executorch.extension.llm.custom_ops import custom_ops  # noqa: F401  (llama::update_cache, custom_sdpa)
        from executorch.runtime import Runtime

        if threads:
            set_threads(threads)
        self.path, self.max_context, self.chunk = Path(path), max_context, chunk
        try:
            self.program = Runtime.get().load_program(self.path)
            self.method = self.program.load_method("forward")
        except RuntimeError as e:
            raise UserError(f"ExecuTorch could not load {self.path} ({e}).") from None

    # Vision bundles' programs take image_embeds [1, T, hidden] as a third input (zeros for text steps).
    embed_width: int | None = None

    @classmethod
    def from_bundle(cls, bundle: Bundle, threads: int | None = None) -> ExecuTorchRunner:
        m = bundle.manifest
        runner = cls(bundle.artifact, m["max_context"], m["prefill_chunk"], threads)
        runner.embed_width = next((v["shape"][-1] for v in m["inputs"] if v["name"] == "image_embeds"), None)
        if "vision" in m:
            runner.image_token_id = m["vision"]["image_token_id"]
        return runner

    def metadata(self, name: str):
        """A constant method's value (`get_max_seq_len`, `get_eos_ids`, ...), as the stock runner reads it."""
        values = self.program.load_method(name).execute([])
        return list(values) if len(values) > 1 or name == "get_eos_ids" else values[0]

    def _step(self, tokens: np.ndarray, pos: int) -> np.ndarray:
        if self.embed_width is not None:
            return self._step_images(tokens, pos, np.zeros((1, tokens.shape[1], self.embed_width), np.float32))
        # tokens int64 [1, T]; the position is a one-element tensor, as the stock runner passes it
        (logits,) = self.method.execute([torch.from_numpy(np.ascontiguousarray(tokens)), torch.tensor([pos])])
        return logits[0].clone().numpy()  # [vocab]; the output buffer is reused by the next call

    def _step_images(self, tokens: np.ndarray, pos: int, image_embeds: np.ndarray) -> np.ndarray:
        inputs = [torch.from_numpy(np.ascontiguousarray(tokens, dtype=np.int64)), torch.tensor([pos]),
                  torch.from_numpy(np.ascontiguousarray(image_embeds, dtype=np.float32))]
        (logits,) = self.method.execute(inputs)
        return logits[0].clone().numpy()

    def _reset(self) -> None:
        pass  # masks come from positions; see the module docstring


class ExecuTorchVisionEncoder:
    """vision.pte in ExecuTorch's runtime: preprocessed pixels [N, 3, S, S] -> image embeddings
    [N, tokens, hidden], one image (or crop) per call."""

    def __init__(self, path: Path, threads: int | None = None):
        import executorch.kernels.quantized  # noqa: F401  (whatever quantized ops stay outside XNNPACK)
        from executorch.runtime import Runtime

        if threads:
            set_threads(threads)
        try:
            self.method = Runtime.get().load_program(Path(path)).load_method("forward")
        except RuntimeError as e:
            raise UserError(f"ExecuTorch could not load {path} ({e}).") from None

    @classmethod
    def from_bundle(cls, bundle: Bundle, threads: int | None = None) -> ExecuTorchVisionEncoder:
        return cls(bundle.vision_artifact, threads)

    def __call__(self, pixels: np.ndarray) -> np.ndarray:
        out = [self.method.execute([torch.from_numpy(np.ascontiguousarray(p[None], np.float32))])[0].clone().numpy()
               for p in pixels]
        return np.concatenate(out)
