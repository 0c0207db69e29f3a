"""QAT training data: token sequences [N, seq_len] and the order the trainer reads them in.

- The user's text: plain UTF-8 files, or JSONL files whose lines are objects with a "text" field.
  Each document gets a BOS and the documents are packed end to end into `seq_len` windows.
- None given: sequences sampled from the teacher itself (data-free QAT), seeded, and cached to a file
  whose name carries the settings, so a rerun or a resumed run reads the very same tokens.
- `Batches`: a seeded permutation per epoch; batch `step` is a pure function of the step, so a
  resumed run continues exactly where the interrupted one stopped.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from torch import Tensor

from .errors import UserError


def read_texts(paths: list[str | Path]) -> list[str]:
    """The documents in `paths`: one per plain file, one per JSONL line ("text" field)."""
    texts: list[str] = []
    for p in map(Path, paths):
        if not p.is_file():
            raise UserError(f"No data file at {p}.")
        raw = p.read_bytes()
        if b"\x00" in raw:
            raise UserError(f"{p} is not text (it holds NUL bytes); give UTF-8 text or JSONL files.")
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise UserError(f"{p} is not UTF-8 text; give UTF-8 text or JSONL files.") from None
        texts += _jsonl(p, text) if p.suffix == ".jsonl" else [text]
    texts = [t for t in texts if t.strip()]
    if not texts:
        raise UserError(f"The data in {', '.join(map(str, paths))} holds no text.")
    return texts


def _jsonl(path: Path, text: str) -> list[str]:
    docs = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError:
            raise UserError(f"{path} line {n} is not JSON (JSONL needs one object per line).") from None
        if not isinstance(obj, dict) or not isinstance(obj.get("text"), str):
            raise UserError(f"{path} line {n} has no string \"text\" field.")
        docs.append(obj["text"])
    return docs


def pack(texts: list[str], tokenizer, seq_len: int) -> Tensor:
    """BOS + tokens of every document, end to end, cut into rows of `seq_len` (the tail is dropped)."""
    stream: list[int] = []
    for t in texts:
        stream += tokenizer.encode(t, bos=True)
    n = len(stream) // seq_len
    if n == 0:
        raise UserError(f"The data holds {len(stream)} tokens, fewer than one --seq-len of {seq_len}.")
    return torch.tensor(stream[: n * seq_len], dtype=torch.long).view(n, seq_len)


def text_data(paths: list[str | Path], tokenizer, seq_len: int, texts: list[str] | None = None) -> tuple[Tensor, dict]:
    """Packed sequences of the user's files (`texts`: their documents, if already read) and a
    description (with a fingerprint) for the checkpoint."""
    tokens = pack(texts if texts is not None else read_texts(paths), tokenizer, seq_len)
    return tokens, {"kind": "text", "files": [str(p) for p in paths], "sequences": len(tokens),
                    "fingerprint": _fingerprint(tokens)}


def self_generated(
    teacher, tokenizer, samples: int, seq_len: int, seed: int, cache_dir: Path, source: str, log=print,
) -> tuple[Tensor, dict]:
    """`samples` sequences of `seq_len` tokens sampled from the teacher at temperature 1 (BOS first;
    a BOS follows any stop token), cached in `cache_dir` under a name derived from the settings."""
    from .generate import EagerRunner, Sampling

    settings = {"source": source, "samples": samples, "seq_len": seq_len, "seed": seed, "temperature": 1.0}
    key = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]
    path = Path(cache_dir) / f"self-generated-{key}.pt"
    if path.exists():
        cached = torch.load(path, weights_only=True)
        if cached["settings"] == json.dumps(settings, sort_keys=True):
            log(f"self-generated data: {samples} x {seq_len} tokens from {path}")
            return cached["tokens"], {"kind": "self-generated", "cache": str(path), **settings,
                                      "fingerprint": _fingerprint(cached["tokens"])}
    log(f"sampling {samples} sequences of {seq_len} tokens from the teacher (seed {seed})")
    runner = EagerRunner(teacher, max_context=seq_len, chunk=1)
    stops = set(tokenizer.stop_ids)
    rows = []
    try:
        for i in range(samples):
            sample = Sampling(temperature=1.0, top_k=0, top_p=1.0, seed=seed * 1_000_003 + i)
            runner.reset()
            ids = [tokenizer.bos_id]
            logits = runner.prefill(ids)
            while len(ids) < seq_len:
                token = tokenizer.bos_id if ids[-1] in stops else sample(logits)
                ids.append(token)
                if len(ids) < seq_len:
                    logits = runner.decode(token)
            rows.append(ids)
            if (i + 1) % max(1, samples // 10) == 0:
                log(f"  sampled {i + 1}/{samples}")
    finally:
        for layer in teacher.model.layers:  # leave the teacher as it was: no caches
            layer.self_attn.cache = None
    tokens = torch.tensor(rows, dtype=torch.long)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save({"tokens": tokens, "settings": json.dumps(settings, sort_keys=True)}, tmp)
    tmp.replace(path)
    return tokens, {"kind": "self-generated", "cache": str(path), **settings, "fingerprint": _fingerprint(tokens)}


def _fingerprint(tokens: Tensor) -> str:
    return hashlib.sha256(tokens.numpy().tobytes()).hexdigest()[:16]


class Batches:
    """Global batch `step` of `data`: epochs in a seeded random order, a pure function of the step."""

    def __init__(self, data: Tensor, batch_size: int, seed: int):
        self.data, self.batch_size, self.seed = data, batch_size, seed
        self._perms: dict[int, Tensor] = {}

    def _order(self, epoch: int) -> Tensor:
        if epoch not in self._perms:
            gen = torch.Generator().manual_seed(self.seed * 7919 + epoch)
            self._perms = {epoch: torch.randperm(len(self.data), generator=gen)}
        return self._perms[epoch]

    def position(self, step: int) -> int:
        """Sequences consumed before batch `step` (the data position a checkpoint records)."""
        return step * self.batch_size

    def __call__(self, step: int) -> Tensor:  # [batch_size, seq_len]
        n = len(self.data)
        idx = [self._order(i // n)[i % n] for i in range(self.position(step), self.position(step + 1))]
        return self.data[torch.stack(idx)]
