"""Bundles: one folder per export, holding the artifact, `tokenizer.model` and `manifest.json`.

The manifest describes everything a runner needs (DESIGN.md, Bundles); nothing is recovered from file
names. A bundle is written into a temporary sibling folder and renamed into place, so an interrupted
export leaves nothing half-written.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import platform
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

from . import __version__
from .config import Gemma3Config
from .contract import check_manifest
from .errors import UserError

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
_DEPENDENCIES = ("torch", "executorch", "torchao", "coremltools", "onnx", "onnxruntime", "sentencepiece", "gguf")


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def file_hashes(folder: Path) -> dict[str, str]:
    """sha256 of every file below `folder` (an .mlpackage is a folder), by relative path."""
    return {
        str(p.relative_to(folder)): sha256(p)
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name != MANIFEST
    }


def versions() -> dict[str, str]:
    out = {"gemma3-export": __version__, "python": platform.python_version()}
    for name in _DEPENDENCIES:
        with contextlib.suppress(metadata.PackageNotFoundError):
            out[name] = metadata.version(name)
    return out


def cache_layout(config: Gemma3Config, max_context: int, dtype: str, window_rows: int | None = None) -> list[dict]:
    """One entry per layer: which cache it has, how many slots, and the buffer shape. Local layers keep a
    ring of `sliding_window` slots, or with `window_rows` (ONNX's GroupQueryAttention) that many rows in
    onnxruntime's windowed layout; either only where it is smaller than the context."""
    layers = []
    for i, kind in enumerate(config.layer_types):
        rows = config.sliding_window if window_rows is None else window_rows
        local = config.is_local(i) and rows < max_context
        slots = rows if local else max_context
        layers.append({
            "layer": i,
            "type": kind,
            "window": config.sliding_window if config.is_local(i) else None,
            "cache": ("ring" if window_rows is None else "window") if local else "full",
            "slots": slots,
            "shape": [1, config.num_key_value_heads, slots, config.head_dim],
            "dtype": dtype,
        })
    return layers


def check_out(out: Path, marker: str = MANIFEST, what: str = "a bundle") -> Path:
    """`out` resolved; one sentence when it is a file, or a non-empty folder without `marker` (something
    else's, never replaced)."""
    out = Path(out).resolve()
    if out.exists() and (not out.is_dir() or (not (out / marker).exists() and any(out.iterdir()))):
        raise UserError(f"{out} exists and is not {what}; choose another --out.")
    return out


@contextlib.contextmanager
def staged(out: Path, marker: str = MANIFEST, what: str = "a bundle") -> Iterator[Path]:
    """Yield a temporary folder beside `out`; on success it replaces `out`, on failure it vanishes.
    `out` may be replaced only if it is empty or holds `marker` (`check_out`)."""
    out = check_out(out, marker, what)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    umask = os.umask(0)
    os.umask(umask)
    tmp.chmod(0o777 & ~umask)  # mkdtemp's folder is private; the result is an ordinary folder
    try:
        yield tmp
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        if out.exists():
            out.rename(old)
        tmp.rename(out)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def write_manifest(folder: Path, manifest: dict) -> dict:
    """Complete the manifest with checksums and versions, check it against the schema, write it into `folder`."""
    manifest = {"format_version": FORMAT_VERSION, **manifest, "files": file_hashes(folder), "versions": versions()}
    check_manifest(manifest, name="The manifest being written")
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=2))
    return manifest


@dataclass
class Bundle:
    path: Path
    manifest: dict

    @property
    def artifact(self) -> Path:
        return self.path / self.manifest["artifact"]

    @property
    def vision_artifact(self) -> Path:
        """The vision encoder's artifact; a bundle exported without --vision is refused in one sentence."""
        if "vision" not in self.manifest:
            raise UserError(f"{self.path} was exported without --vision; it takes no images.")
        return self.path / self.manifest["vision"]["artifact"]

    @property
    def tokenizer_path(self) -> Path:
        return self.path / self.manifest["tokenizer"]

    @property
    def target(self) -> str:
        return self.manifest["target"]

    @property
    def artifact_bytes(self) -> int:
        """Bytes of the model itself (the artifact, its external data or package contents), tokenizers
        and manifest excluded."""
        m = self.manifest
        other = {m["tokenizer"], *m.get("hf_tokenizer", [])}
        return sum((self.path / name).stat().st_size for name in m["files"] if name not in other)

    @property
    def config(self) -> Gemma3Config:
        return Gemma3Config.from_hf(self.manifest["config"])

    def update_manifest(self, **fields) -> None:
        """Rewrite manifest.json with `fields` changed (validation summaries), atomically."""
        self.manifest.update(fields)
        tmp = self.path / f".{MANIFEST}.tmp"
        tmp.write_text(json.dumps(self.manifest, indent=2))
        tmp.replace(self.path / MANIFEST)


def read_bundle(path: str | Path, verify: bool = False) -> Bundle:
    """Open a bundle folder; one sentence for anything wrong with it."""
    path = Path(path)
    if not path.is_dir():
        raise UserError(f"No bundle folder at {path}.")
    try:
        manifest = json.loads((path / MANIFEST).read_text())
    except FileNotFoundError:
        raise UserError(f"{path} is not a bundle: it has no {MANIFEST}.") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path / MANIFEST} is not valid JSON ({e}).") from None
    version = manifest.get("format_version") if isinstance(manifest, dict) else None
    if not isinstance(version, int):
        raise UserError(f"{path / MANIFEST} has no format_version.")
    if version > FORMAT_VERSION:
        raise UserError(
            f"{path} was written by a newer gemma3-export (bundle format {version}, this one reads "
            f"up to {FORMAT_VERSION}); upgrade gemma3-export."
        )
    check_manifest(manifest, name=str(path / MANIFEST))
    for name, digest in manifest["files"].items():
        f = path / name
        if not f.is_file():
            raise UserError(f"{path} is incomplete: {name} is missing.")
        if verify and sha256(f) != digest:
            raise UserError(f"{path / name} does not match its checksum in the manifest.")
    return Bundle(path, manifest)
