"""onnxruntime runner for ONNX bundles: the same interface as the eager one (generate.Runner).

The KV cache never passes through numpy: one OrtValue per cache, of the manifest's shape, is bound
with IOBinding as both the graph's cache input and its cache output, once. onnxruntime's
ScatterElements skips its input-to-output copy when the two are the same buffer, so a step writes
only the new positions, in place (the exporter orders every write after the reads it must follow).
Per step only `tokens` and `input_pos` are bound again; the logits land in a preallocated OrtValue.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..bundle import Bundle
from ..errors import UserError
from ..generate import Runner


def session_options(threads: int | None, spin: bool = True):
    """`threads` intra-op threads (None: onnxruntime's choice, one per physical core). `spin`: idle
    threads spin-wait for the next parallel section, onnxruntime's default and onnxruntime-genai's: on
    a quiet machine 1.11x decode on the 270M, prefill the same (docs/onnx.md); where the cores are busy
    with other work, spinning steals from it (it was 0.7x there), so pass spin=False."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spin else "0")
    if threads:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    return options


MADV_DONTNEED = 4  # Linux's madvise advice: drop these pages from the process (file pages return on the next read)


def release_mapped_weights(folder: Path) -> int:
    """Drop from this process the resident pages of its mappings of files in `folder` that hold no
    written page (Linux; elsewhere nothing). onnxruntime maps a bundle's model.onnx.data (private,
    copy-on-write) and reads most of it once, to pack the weights for its kernels; what stays mapped
    afterwards is either never read again (the head pieces' scales, which MatMulNBits keeps as inputs
    after copying them into its packed form) or read a few rows at a time (the embedding's aliases of
    the table). A mapping none of whose pages was written ("Anonymous: 0 kB" in /proc/self/smaps) holds
    clean copies of the file: dropping them loses nothing, and a later read faults them back in from the
    page cache. Returns the bytes advised."""
    import ctypes
    import os

    smaps = Path("/proc/self/smaps")
    if not smaps.exists():
        return 0
    folder = os.path.realpath(folder)
    mappings, current = [], None
    for line in smaps.read_text().splitlines():
        fields = line.split(maxsplit=5)
        if fields and "-" in fields[0] and not fields[0].endswith(":"):  # a mapping: address perms offset dev inode [path]
            inside = len(fields) == 6 and os.path.dirname(fields[5]) == folder
            current = [*(int(x, 16) for x in fields[0].split("-")), 0] if inside else None
            if current:
                mappings.append(current)
        elif current and fields[0] == "Anonymous:":
            current[2] = int(fields[1])
    madvise = ctypes.CDLL(None, use_errno=True).madvise
    madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    return sum(end - start for start, end, written in mappings
               if not written and madvise(start, end - start, MADV_DONTNEED) == 0)


class OnnxRunner(Runner):
    """Chunked prefill and decode over an ONNX artifact in onnxruntime (CPU)."""

    def __init__(self, path: Path, inputs: list[dict], outputs: list[dict], max_context: int, chunk: int,
                 threads: int | None = None, spin: bool = True):
        import onnxruntime as ort

        super().__init__()
        self.max_context, self.chunk = max_context, chunk
        try:
            self.session = ort.InferenceSession(str(path), session_options(threads, spin), providers=["CPUExecutionProvider"])
        except Exception as e:  # onnxruntime raises its own Fail/InvalidGraph types
            raise UserError(f"onnxruntime cannot load {path} ({type(e).__name__}); export the bundle again.") from None
        release_mapped_weights(Path(path).parent)  # the packed weights are onnxruntime's own now
        got = [v.name for v in self.session.get_inputs()], [v.name for v in self.session.get_outputs()]
        want = [v["name"] for v in inputs], [v["name"] for v in outputs]
        if got != want:
            raise UserError(f"{path} does not have the inputs and outputs its manifest lists; export the bundle again.")
        self.cache_specs = [(v["name"], tuple(v["shape"]), np.dtype(v["dtype"])) for v in inputs[2:] if v["name"] != "image_embeds"]
        # Vision bundles' decoders also take image_embeds [1, T, hidden] (zeros for text-only steps).
        self.embed_width = next((v["shape"][-1] for v in inputs if v["name"] == "image_embeds"), None)
        self.cache_out = want[1][1:]
        self.vocab = outputs[0]["shape"][-1]
        self.binding = self.session.io_binding()
        self.runtime_note = f"onnxruntime {ort.__version__} CPU, {threads or 'default'} threads{'' if spin else ', no spinning'}"
        self._alloc()

    @classmethod
    def from_bundle(cls, bundle: Bundle, threads: int | None = None, spin: bool = True) -> OnnxRunner:
        m = bundle.manifest
        runner = cls(bundle.artifact, m["inputs"], m["outputs"], m["max_context"], m["prefill_chunk"], threads, spin)
        if "vision" in m:
            runner.image_token_id = m["vision"]["image_token_id"]
        return runner

    def _alloc(self) -> None:
        """Fresh zeroed caches (np.zeros: pages become resident only once written), bound in place."""
        from onnxruntime import OrtValue

        # The OrtValues wrap these arrays without a copy: writing them writes the cache (memory.py).
        self.cache_numpy = [np.zeros(shape, dtype) for _, shape, dtype in self.cache_specs]
        self._caches = [OrtValue.ortvalue_from_numpy(a) for a in self.cache_numpy]
        for (name, _, _), out, value in zip(self.cache_specs, self.cache_out, self._caches):
            self.binding.bind_ortvalue_input(name, value)
            self.binding.bind_ortvalue_output(out, value)
        self._logits = OrtValue.ortvalue_from_numpy(np.zeros((1, self.vocab), np.float32))
        self.binding.bind_ortvalue_output("logits", self._logits)

    def _step(self, tokens: np.ndarray, pos: int) -> np.ndarray:
        if self.embed_width is not None:
            return self._step_images(tokens, pos, np.zeros((1, tokens.shape[1], self.embed_width), np.float32))
        self.binding.bind_cpu_input("tokens", np.ascontiguousarray(tokens, dtype=np.int64))
        self.binding.bind_cpu_input("input_pos", np.array([pos], dtype=np.int64))
        self.session.run_with_iobinding(self.binding)
        return self._logits.numpy()[0].copy()  # the buffer is reused next step

    def _step_images(self, tokens: np.ndarray, pos: int, image_embeds: np.ndarray) -> np.ndarray:
        self.binding.bind_cpu_input("image_embeds", np.ascontiguousarray(image_embeds, dtype=np.float32))
        self.binding.bind_cpu_input("tokens", np.ascontiguousarray(tokens, dtype=np.int64))
        self.binding.bind_cpu_input("input_pos", np.array([pos], dtype=np.int64))
        self.session.run_with_iobinding(self.binding)
        return self._logits.numpy()[0].copy()

    def _reset(self) -> None:
        self._alloc()

    def cache_arrays(self) -> list[np.ndarray]:
        """The current cache contents (copies), in input order: for tests and memory checks."""
        return [v.numpy() for v in self._caches]


class OnnxVisionEncoder:
    """vision.onnx in onnxruntime: preprocessed pixels [N, 3, S, S] -> image embeddings [N, tokens, hidden]."""

    def __init__(self, path: Path, threads: int | None = None):
        import onnxruntime as ort

        try:
            self.session = ort.InferenceSession(str(path), session_options(threads), providers=["CPUExecutionProvider"])
        except Exception as e:  # onnxruntime raises its own Fail/InvalidGraph types
            raise UserError(f"onnxruntime cannot load {path} ({type(e).__name__}); export the bundle again.") from None

    @classmethod
    def from_bundle(cls, bundle: Bundle, threads: int | None = None) -> OnnxVisionEncoder:
        return cls(bundle.vision_artifact, threads)

    def __call__(self, pixels: np.ndarray) -> np.ndarray:
        out = [self.session.run(["image_embeds"], {"pixels": np.ascontiguousarray(p[None], np.float32)})[0] for p in pixels]
        return np.concatenate(out)  # one image at a time: peak memory of one, any number of crops

