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
        from executorch.runtime import Runtime

        if threads:
            set_threads(threads)
        self.path, self.max_context, self.chunk = Path(path), max_context, chunk
        try:
            self.program = Runtime.get().load_program(self.path)
            self.method = self.program.load_method("forward")
        except RuntimeError as e:
            raise UserError(f"ExecuTorch could not load {self.path} ({e}).") from None

    @classmethod
    def from_bundle(cls, bundle: Bundle, threads: int | None = None) -> ExecuTorchRunner:
        m = bundle.manifest
        return cls(bundle.artifact, m["max_context"], m["prefill_chunk"], threads)

    def metadata(self, name: str):
        """A constant method's value (`get_max_seq_len`, `get_eos_ids`, ...), as the stock runner reads it."""
        values = self.program.load_method(name).execute([])
        return list(values) if len(values) > 1 or name == "get_eos_ids" else values[0]

    def _step(self, tokens: np.ndarray, pos: int) -> np.ndarray:
        # tokens int64 [1, T]; the position is a one-element tensor, as the stock runner passes it
        (logits,) = self.method.execute([torch.from_numpy(np.ascontiguousarray(tokens)), torch.tensor([pos])])
        return logits[0].clone().numpy()  # [vocab]; the output buffer is reused by the next call

    def _reset(self) -> None:
        pass  # masks come from positions; see the module docstring
