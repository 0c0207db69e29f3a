"""The export pipeline: load -> quantize -> export for the target -> bundle -> validate.

Exporters and runtimes are registered by target name and imported lazily, so an ONNX user never pays
for coremltools. Every exporter has the same signature:

    export(model: Gemma3ForCausalLM, folder: Path, spec: ExportSpec, log) -> dict

It writes its artifact into `folder` and returns the manifest fields it owns: `artifact` (a path
relative to the folder), `inputs`, `outputs`, `cache_dtype`, `prefill_chunks` (the T values the
artifact accepts), plus anything target-specific under `target_info`.
"""

from __future__ import annotations

import functools
import importlib
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .bundle import Bundle, cache_layout, read_bundle, staged, write_manifest
from .config import VisionConfig, preset, vision_preset
from .errors import UserError
from .quant import SCHEMES, Scheme, check_scheme
from .tokenizer import CHAT_TEMPLATE, write_hf_tokenizer

if TYPE_CHECKING:
    from .fake_quant import QuantGrid

EXPORTERS = {
    "onnx": "gemma3_export.exporters.onnx:export",
    "executorch": "gemma3_export.exporters.executorch:export",
    "coreml": "gemma3_export.exporters.coreml:export",
}
RUNTIMES = {
    "eager": "gemma3_export.generate:EagerRunner",
    "onnx": "gemma3_export.runtimes.onnx:OnnxRunner",
    "executorch": "gemma3_export.runtimes.executorch:ExecuTorchRunner",
    "coreml": "gemma3_export.runtimes.coreml:CoreMLRunner",
}
VISION_RUNTIMES = {  # a bundle's vision artifact: pixels [N, 3, S, S] -> image embeddings
    "onnx": "gemma3_export.runtimes.onnx:OnnxVisionEncoder",
    "executorch": "gemma3_export.runtimes.executorch:ExecuTorchVisionEncoder",
    "coreml": "gemma3_export.runtimes.coreml:CoreMLVisionEncoder",
}
TARGETS = tuple(EXPORTERS)
# A QAT checkpoint's grid (fake_quant.QATScheme name) -> the export scheme that stores it exactly, per
# target. Core ML is absent: coremltools computes its own scales (docs/qat.md).
GRID_SCHEMES = {
    "onnx": {"int4": "int4", "int4b32": "int4b32", "int4b128": "int4b128", "fp8": "fp8"},
    "executorch": {"8da4w": "8da4w"},
}
DEFAULT_CONTEXT = 2048
DEFAULT_CHUNK = 128


def _resolve(registry: dict[str, str], name: str) -> Callable:
    if name not in registry:
        raise UserError(f"Unknown target {name!r}; choose one of {', '.join(registry)}.")
    module, attr = registry[name].split(":")
    return getattr(importlib.import_module(module), attr)


@dataclass(frozen=True)
class ExportSpec:
    """What every exporter needs besides the model: cache size, prefill chunk, quantization."""

    context: int
    chunk: int
    scheme: Scheme
    # A QAT checkpoint's codes and scales (fake_quant.QuantGrid), or for `gguf` the source GGUF's
    # blocks (gguf_grid.read_gguf_grid): stored as they are.
    grid: QuantGrid | dict | None = None
    # --vision: the bundle also holds the image encoder, and the decoder takes image_embeds
    vision: VisionConfig | None = None
    # --max-size (bytes): the least used rows of the tied table are rounded to int4 until the artifact
    # fits; `table_order()` ranks the rows (vocab_rows.row_order, most used first; computed when first
    # called), `table_ranking` says on what
    # On int4 schemes it raises the matrices whose rounding costs most to int8 while the artifact fits
    # (sensitivity.py), measured on `calibration()` (token sequences; computed when first called).
    max_size: int | None = None
    table_order: Callable[[], Any] | None = None
    table_ranking: str | None = None
    calibration: Callable[[], list[list[int]]] | None = None


# Targets that export the vision encoder (a second artifact, `export_vision` in the exporter) so far.
VISION_TARGETS = ("onnx", "executorch", "coreml")


def _vision_exporter(target: str):
    """The target's exporter module, which holds `export_vision`, `VISION_SCHEMES` (and `VISION_DEFAULT`)."""
    return importlib.import_module(EXPORTERS[target].split(":")[0])


def make_spec(model: str, target: str, quant: str | None, context: int | None, chunk: int | None,
              vision: bool = False, max_size: str | int | None = None) -> ExportSpec:
    """Check the request against the preset and the target's table before any work starts."""
    if target not in EXPORTERS:
        raise UserError(f"Unknown target {target!r}; choose one of {', '.join(EXPORTERS)}.")
    config = preset(model)
    vision_config = vision_preset(model) if vision else None
    if vision and target not in VISION_TARGETS:
        raise UserError(f"--vision exports to {', '.join(VISION_TARGETS)} so far, not {target}.")
    if vision:
        quant = quant or getattr(_vision_exporter(target), "VISION_DEFAULT", None)
    scheme = check_scheme(target, quant)
    if vision:
        schemes = _vision_exporter(target).VISION_SCHEMES
        if scheme.name not in schemes:
            raise UserError(f"--vision on {target} takes --quant {', '.join(schemes)}, not {scheme.name}.")
    context = context or min(DEFAULT_CONTEXT, config.max_position_embeddings)
    # An image block is never split across prefill chunks (docs/decisions.md): a vision chunk holds one.
    least = vision_config.mm_tokens_per_image if vision else 1
    chunk = chunk or min(max(DEFAULT_CHUNK, least), config.sliding_window, context)
    if vision and chunk < least:
        raise UserError(f"--chunk must be at least {least} with --vision: an image's tokens are prefilled in one chunk.")
    if not 1 <= context <= config.max_position_embeddings:
        raise UserError(f"--context must be between 1 and {config.max_position_embeddings} for {model}.")
    if not 1 <= chunk <= min(config.sliding_window, context):
        raise UserError(
            f"--chunk must be between 1 and {min(config.sliding_window, context)} "
            f"(the sliding window {config.sliding_window} and the context {context})."
        )
    budget = parse_size(max_size) if max_size is not None else None
    if budget is not None and (target, scheme.name) not in MAX_SIZE_SCHEMES:
        takers = ", ".join(f"--target {t} --quant {q}" for t, q in MAX_SIZE_SCHEMES)
        raise UserError(f"--max-size takes {takers}, not --target {target} --quant {scheme.name}.")
    if budget is not None and vision:
        raise UserError("--max-size splits the text table of text-only exports so far; drop --vision or --max-size.")
    return ExportSpec(context=context, chunk=chunk, scheme=scheme, vision=vision_config, max_size=budget)


# Where `--max-size` applies: the exports whose 8-bit tied table it can split by rows (`split_table` in
# exporters/onnx.py and exporters/coreml.py), and the int4 exports whose most sensitive matrices it
# raises to int8 (`mixed_packs` in exporters/onnx.py, sensitivity.py).
MAX_SIZE_SCHEMES = (("onnx", "gguf"), ("onnx", "int4b32"), ("onnx", "int4b32-asym"), ("coreml", "int8"),
                    ("coreml", "int8b32"))
_UNITS = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9}


def parse_size(text: str | int) -> int:
    """'260MB', '260 MB', '0.26GB', '260' (megabytes) -> bytes; decimal units, as the docs report sizes."""
    import re

    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([kmg]?b)?\s*", str(text).lower())
    if not m or float(m.group(1)) <= 0:
        raise UserError(f"--max-size takes a size such as 260MB or 0.25GB, not {text!r}.")
    return int(float(m.group(1)) * _UNITS[m.group(2) or "mb"])


def grid_spec(spec: ExportSpec, target: str, quant: str | None, grid: QuantGrid) -> ExportSpec:
    """The spec for a checkpoint that carries a QAT grid: its own scheme, imported exactly (the default),
    or a float scheme when asked for by name; anything else would round the trained grid again."""
    trained = grid.scheme.name
    if quant in ("fp32", "fp16"):
        return spec
    exact = GRID_SCHEMES.get(target, {}).get(trained)
    if exact is None:
        takers = [t for t, table in GRID_SCHEMES.items() if trained in table]
        raise UserError(
            f"This checkpoint was trained for {trained}, which the {target} target cannot store exactly; "
            f"export it to {' or '.join(takers)}, or with --quant fp32."
        )
    if quant is not None and quant != exact:
        raise UserError(f"This checkpoint was trained for {trained}; export it with --quant {exact} (or fp32).")
    return replace(spec, scheme=SCHEMES[exact], grid=grid)


def export(
    model: str,
    target: str,
    checkpoint: str | None = None,
    random_weights: bool = False,
    quant: str | None = None,
    context: int | None = None,
    chunk: int | None = None,
    out: str | Path | None = None,
    validate: bool = True,
    vision: bool = False,
    max_size: str | int | None = None,
    data: list[str] | None = None,
    log=print,
) -> Path:
    """Write one bundle folder for `target` and return its path (`vision`: with the image encoder).
    `max_size` ('260MB'): round the least used table rows to int4 until the artifact fits, ranked on
    `data` (text or JSONL files) or, without it, on text sampled from the float model."""
    from .load import load_model, load_vision
    from .qat_data import read_texts

    spec = make_spec(model, target, quant, context, chunk, vision, max_size)
    if data and spec.max_size is None:
        raise UserError("--data is the calibration text of --max-size; give --max-size too.")
    texts = read_texts(data) if data else None  # bad data stops us before the model loads
    exporter = _resolve(EXPORTERS, target)
    loaded = load_model(model, checkpoint=checkpoint, random_weights=random_weights, log=log)
    encoder = None
    if vision:
        encoder = load_vision(model, loaded.model.config.hidden_size, checkpoint, random_weights, log=log)
        loaded.model.model.image_token_id = spec.vision.image_token_index
    if loaded.grid is not None:
        if spec.max_size is not None:
            raise UserError("--max-size mixes or rounds the weights again; a QAT checkpoint's grid is stored as it is, "
                            "so export it without --max-size.")
        spec = grid_spec(spec, target, quant, loaded.grid)
        log(f"  the checkpoint's {loaded.grid.scheme.name} grid (QAT or GPTQ) is stored as it is ({spec.scheme.name})")
    elif spec.scheme.name == "gguf":
        spec = replace(spec, grid=gguf_grid(loaded))
    out = Path(out or f"bundles/gemma3-{model}-{target}-{spec.scheme.name}")  # the scheme a grid chose
    if spec.max_size is not None:
        spec = replace(spec, **_calibrate(loaded, model, data, texts, out.parent / "calibration", log))
    config = loaded.model.config
    with staged(out) as folder:
        log(f"exporting {model} to {target} ({spec.scheme.name}, context {spec.context}, chunk {spec.chunk})")
        info = exporter(loaded.model, folder, spec, log)
        if encoder is not None:
            info["vision"] = _export_vision(encoder, folder, spec, target, log)
        grid_imported = info.pop("grid_imported", "exactly")
        qat_grid = loaded.grid is not None and spec.grid is loaded.grid  # not with --quant fp32/fp16
        loaded.tokenizer.save(folder / "tokenizer.model")
        log("  writing the tokenizer as tokenizer.json (for the apps' runtimes)")
        hf_tokenizer = write_hf_tokenizer(loaded.tokenizer, folder)
        write_manifest(folder, {
            "target": target,
            "model": model,
            "weights": loaded.source,
            # how to rebuild the float model this bundle is validated against
            "source": {
                "model": model,
                "checkpoint": str(Path(checkpoint).resolve()) if checkpoint and Path(checkpoint).exists() else checkpoint,
                "random_weights": random_weights,
            },
            "config": config.to_hf(),
            "max_context": spec.context,
            "prefill_chunk": spec.chunk,
            "quant": {**asdict(spec.scheme), **({"grid": _grid_note(spec.grid, grid_imported)} if qat_grid else {})},
            "cache": cache_layout(config, spec.context, info.get("cache_dtype", "float32")),
            "tokenizer": "tokenizer.model",
            "hf_tokenizer": hf_tokenizer,
            "bos_id": loaded.tokenizer.bos_id,
            "stop_ids": list(loaded.tokenizer.stop_ids),
            "chat_template": CHAT_TEMPLATE,
            **info,
        })
    log(f"wrote {out}")
    if validate:
        from .validate import validate_bundle

        validate_bundle(out, log=log)
    return out


def _export_vision(encoder, folder: Path, spec: ExportSpec, target: str, log) -> dict:
    """The target's vision artifact beside the decoder; the manifest's `vision` entry (how a runner feeds images)."""
    from dataclasses import asdict

    from .images import PanAndScan

    v = spec.vision
    return {
        **_vision_exporter(target).export_vision(encoder, folder, spec.scheme.name, log),
        "vision_config": asdict(v.vision_config),
        "image_size": v.vision_config.image_size,
        "mm_tokens_per_image": v.mm_tokens_per_image,
        "image_token_id": v.image_token_index,
        "boi_id": v.boi_token_index,
        "eoi_id": v.eoi_token_index,
        "pan_and_scan": asdict(PanAndScan()),
    }


def gguf_grid(loaded) -> dict:
    """The source GGUF's blocks for `--quant gguf`; one sentence when the weights came from elsewhere."""
    from .gguf_grid import read_gguf_grid

    if loaded.gguf_path is None:
        raise UserError("--quant gguf keeps a GGUF's own blocks; load the weights from one "
                        "(--model 270m, or --checkpoint FILE.gguf).")
    return read_gguf_grid(loaded.gguf_path)


def _calibrate(loaded, model: str, data, texts, cache_dir: Path, log) -> dict:
    """The spec's `calibration` (a function: the calibration text as token sequences), `table_order`
    (the table's rows, most used first, by vocab_rows) and `table_ranking` (what both are measured on).
    The text is the user's, or text sampled from the float model (cached in `cache_dir`); each function
    runs at its first call, so an export that fits without them never samples the model (minutes)."""
    from .qat_data import self_generated
    from .vocab_rows import importance, row_order

    if texts:
        stream = [i for t in texts for i in loaded.tokenizer.encode(t, bos=True)][: CALIBRATION_MAX_TOKENS]
        how = f"{len(stream)} tokens of {', '.join(map(str, data))}"
    else:
        how = f"{CALIBRATION_SEQUENCES * CALIBRATION_SEQ_LEN} tokens sampled from the float model (seed 0)"

    @functools.cache
    def calibration() -> list[list[int]]:
        if texts:
            return [stream[i : i + CALIBRATION_SEQ_LEN] for i in range(0, len(stream), CALIBRATION_SEQ_LEN)]
        return self_generated(loaded.model, loaded.tokenizer, CALIBRATION_SEQUENCES, CALIBRATION_SEQ_LEN, 0,
                              cache_dir, f"{model}: {loaded.source}", log=log)[0].tolist()

    @functools.cache
    def table_order():
        tokens = calibration()
        log(f"ranking the table's rows on {how}")
        return row_order(loaded.tokenizer, importance(loaded.model, tokens, log=log))

    return {"calibration": calibration, "table_order": table_order, "table_ranking": how}


# Calibration text for `--max-size`'s ranking (benchmarks/gguf_vocab_split.py measured 16 x 96).
CALIBRATION_SEQUENCES, CALIBRATION_SEQ_LEN = 16, 96
CALIBRATION_MAX_TOKENS = 8192  # of the user's --data (teacher-forced: one forward per 96 tokens)


def _grid_note(grid: QuantGrid, imported: str) -> dict:
    from .fake_quant import GRID_FORMAT, GRID_JSON

    return {"source": GRID_JSON, "format": GRID_FORMAT, "trained_scheme": grid.scheme.name, "imported": imported}


def open_runner(bundle: str | Path | Bundle):
    """A Runner over the bundle's artifact, in the runtime its manifest names."""
    b = bundle if isinstance(bundle, Bundle) else read_bundle(bundle)
    return _resolve(RUNTIMES, b.target).from_bundle(b)


def open_vision_encoder(bundle: Bundle):
    """The bundle's vision artifact in its runtime: `encoder(pixels [N, 3, S, S]) -> [N, tokens, hidden]`."""
    if bundle.target not in VISION_RUNTIMES:
        raise UserError(f"Images run on {', '.join(VISION_RUNTIMES)} bundles so far, not {bundle.target}.")
    return _resolve(VISION_RUNTIMES, bundle.target).from_bundle(bundle)
