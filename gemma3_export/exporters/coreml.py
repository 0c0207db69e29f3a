"""Core ML export: one stateful, multifunction `.mlpackage` for iOS 18+ (coremltools 9).

- The KV cache is Core ML state (`ct.StateType`, fp16): the model's mutable cache buffers, global
  layers `context` slots, local layers their ring of `sliding_window` slots.
- Two functions over one copy of the weights: `prefill` (T = chunk) and `decode` (T = 1), both
  `(tokens int32[1, T], input_pos int32[1]) -> logits float32[1, vocab]` (the last token's).
- fp16 compute by default with fp32 islands chosen by `numerics.check_fp16` on the bundled text;
  `--quant fp32` computes in fp32. The states are fp16 either way.
- int8 / int4 per-channel and int8 / int4 blocks of 32 through `coremltools.optimize` on every linear
  weight and the tied embedding; `simulate` puts the eager model on the same grid for `validate`.
- gguf: each linear and the tied embedding as its GGUF tensor's own blocks, a
  `constexpr_blockwise_shift_scale` per weight (exporters/coreml_gguf.py says what is exact).
- `--max-size` (int8, int8b32): the least used rows of the tied table go to int4 blocks of 32 until the
  package fits (`split_table`: two tables, the head's logits gathered back to vocabulary order).
"""

from __future__ import annotations

import contextlib
import copy
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from ..cache import KVCache, RingKVCache
from ..errors import UserError
from ..model import Gemma3ForCausalLM
from ..vocab_rows import split_record, split_rows

ARTIFACT = "model.mlpackage"
MASK_FILL = -32752.0  # half of fp16's lowest value: finite, and softmax still gives it probability 0
# scheme -> (bits, block sizes over a [rows, cols] weight: 1 = per row, 0 = whole axis)
COMPRESSION = {"int8": (8, [1, 0]), "int8b32": (8, [1, 32]), "int4": (4, [1, 0]), "int4b32": (4, [1, 32]),
               "int4b32-asym": (4, [1, 32])}
# coremltools' mode per scheme: "linear" stores an int4 zero point per block (constexpr_blockwise_shift_scale's
# offset). int4b32-asym keeps the tied table symmetric, as on ONNX (quant.py: one meaning per scheme name).
MODES = {"int4b32-asym": "linear"}


# -- the exportable model: cache swaps --------------------------------------------------------------

class _CoreMLWrite:
    """Why: Core ML states are fp16 only, and coremltools converts neither `index_copy` nor an
    `index_put` of several positions; T > 1 writes the cache with a scatter-free one-hot update."""

    def update(self, input_pos: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        # Writes cast implicitly (an explicit cast before a slice update does not convert); reads
        # come back in the compute dtype.
        keys, values, key_pos = super().update(input_pos, k, v)
        return keys.to(k.dtype), values.to(v.dtype), key_pos

    def _write(self, slots: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        if k.shape[2] == 1:  # decode: a single-position slice update
            self.k[:, :, slots] = k
            self.v[:, :, slots] = v
            return self.k, self.v
        onehot = (slots[:, None] == torch.arange(self.slots)[None, :]).to(k.dtype)  # [T, S]
        keep = 1.0 - onehot.sum(0)[:, None]  # [S, 1]: 0 where the chunk writes
        new_k = self.k.to(k.dtype) * keep + onehot.t() @ k  # [1, H, S, D]; exact: one term per slot
        new_v = self.v.to(v.dtype) * keep + onehot.t() @ v
        self.k.copy_(new_k)
        self.v.copy_(new_v)
        return new_k, new_v


class CoreMLKVCache(_CoreMLWrite, KVCache):
    """Global layers' cache for Core ML (see `_CoreMLWrite`)."""


class CoreMLRingKVCache(_CoreMLWrite, RingKVCache):
    """Local layers' ring for Core ML (see `_CoreMLWrite`)."""


def prepare(model: Gemma3ForCausalLM, context: int) -> Gemma3ForCausalLM:
    """Give `model` fp16 Core ML caches of `context` slots (rings for local layers), in place."""
    model.float().eval().requires_grad_(False)
    model.setup_caches(context, torch.float16)
    for layer in model.model.layers:
        old = layer.self_attn.cache
        if isinstance(old, RingKVCache):
            new = CoreMLRingKVCache(old.k.shape[1], old.window, old.k.shape[3], torch.float16)
        else:
            new = CoreMLKVCache(old.k.shape[1], old.slots, old.k.shape[3], torch.float16)
        layer.self_attn.cache = new
    return model


def _where_scalar_other(cond: Tensor, x: Tensor, other: float) -> Tensor:
    """Why: coremltools has no converter for `where.ScalarOther`; the fill (the attention mask's
    dtype minimum) is also made finite in fp16."""
    return torch.ops.aten.where.self(cond, x, torch.ops.aten.full_like.default(x, max(other, MASK_FILL)))


def trace(model: Gemma3ForCausalLM, T: int, image_embeds: bool = False):
    """torch.export of one cached step over tokens[1, T] (and image_embeds [1, T, hidden] for a vision
    bundle); decomposed the way coremltools converts."""
    args = (torch.zeros(1, T, dtype=torch.int64), torch.zeros(1, dtype=torch.int64))
    if image_embeds:
        args += (torch.zeros(1, T, model.config.hidden_size),)
    with torch.no_grad():
        ep = torch.export.export(model, args, strict=False)
    return ep.run_decompositions({torch.ops.aten.where.ScalarOther: _where_scalar_other})


# -- conversion ---------------------------------------------------------------------------------

def convert(ep, T: int, fp16: bool, fp32_blocks: list[str], target: str = "iOS18", image_embeds: int | None = None):
    """ct.convert one traced step: states from the cache buffers, named int32 inputs, fp32 logits;
    `image_embeds` (the text width): a third input, image_embeds float32[1, T, width]."""
    import coremltools as ct

    from ..numerics import op_selector, tag_precision

    if not hasattr(ct.target, target):
        raise UserError(f"Unknown Core ML deployment target {target!r}; use iOS18 (or macOS15) or later.")
    if getattr(ct.target, target) < ct.target.iOS18:
        raise UserError(f"The KV cache is Core ML state, which needs iOS 18 or later; {target} has no states.")
    tag_precision(ep, fp32_blocks)
    precision = ct.transform.FP16ComputePrecision(op_selector=op_selector) if fp16 else ct.precision.FLOAT32
    with _lean_fp16_overflow_check():
        return ct.convert(
            ep,
            minimum_deployment_target=getattr(ct.target, target),
            compute_precision=precision,
            inputs=[ct.TensorType(name="tokens", shape=(1, T), dtype=np.int32),
                    ct.TensorType(name="input_pos", shape=(1,), dtype=np.int32),
                    *([ct.TensorType(name="image_embeds", shape=(1, T, image_embeds), dtype=np.float32)]
                      if image_embeds else [])],
            outputs=[ct.TensorType(name="logits", dtype=np.float32)],
            skip_model_load=True,
        )


def _fp16_overflow(op) -> bool:
    """coremltools' test (a const input with a finite |value| above 65504 keeps an op in fp32), in
    blocks of 2^20 elements."""
    for inputs in op.inputs.values():
        for var in inputs if isinstance(inputs, (list, tuple)) else [inputs]:
            if var.op is None or var.op.op_type != "const" or not var.is_tensor_or_scalar_of(dtype="fp32"):
                continue
            flat = np.ravel(np.asarray(var.op.val.val))
            for start in range(0, flat.size, 1 << 20):
                block = np.abs(flat[start : start + (1 << 20)])
                if np.max(block, where=block < 1e38, initial=0.0) > 65504:
                    return True
    return False


@contextlib.contextmanager
def _lean_fp16_overflow_check():
    """Why: coremltools' own test indexes every element of every fp32 const (np.where: ~30 bytes per
    element), 5.6 GB for the 270M's embedding; the same test in blocks, while one conversion runs."""
    from coremltools.converters.mil.mil.passes.defs.quantization import FP16ComputePrecision

    original = FP16ComputePrecision.__dict__["fp16_overflow"]
    FP16ComputePrecision.fp16_overflow = staticmethod(_fp16_overflow)
    try:
        yield
    finally:
        FP16ComputePrecision.fp16_overflow = original


def _program(mlmodel):
    """The pymil program of a converted or a loaded MLModel."""
    if mlmodel._mil_program is not None:
        return mlmodel._mil_program
    from coremltools.converters.mil.frontend.milproto.load import load

    spec = mlmodel.get_spec()
    return load(spec, spec.specificationVersion, mlmodel.weights_dir)


def weight_consts(mlmodel) -> list[str]:
    """Names of the const ops that feed a linear's weight or the embedding's gather."""
    names = []
    for op in (op for f in _program(mlmodel).functions.values() for op in f.operations):
        var = op.inputs.get("weight") if op.op_type == "linear" else op.inputs.get("x") if op.op_type == "gather" else None
        if var is not None and var.op is not None and var.op.op_type == "const" and var.rank == 2:
            names.append(var.op.name)
    return sorted(set(names))


def compress(mlmodel, scheme: str):
    """Linear-symmetric int8/int4 weights (per row, or blocks of 32) through coremltools.optimize."""
    from coremltools.optimize.coreml import OpLinearQuantizerConfig, OptimizationConfig, linear_quantize_weights

    def op_config(scheme: str):
        bits, blocks = COMPRESSION[scheme]
        return OpLinearQuantizerConfig(mode=MODES.get(scheme, "linear_symmetric"), dtype=f"int{bits}",
                                       granularity="per_block", block_size=blocks, weight_threshold=1)

    config = OptimizationConfig(op_name_configs={name: op_config(weight_scheme(name, scheme))
                                                 for name in weight_consts(mlmodel)})
    return linear_quantize_weights(mlmodel, config=config)


def weight_scheme(name: str, scheme: str) -> str:
    """The grid of one weight (a const or a parameter name): the split table's int4 rows
    (`SplitTable.rows4`) are int4b32, int4b32-asym's tied table is int4b32, the rest `scheme`."""
    if "rows4" in name:  # const names: p_..._table_rows4[_to_fp16]
        return SPLIT_SCHEME
    table = any(t in name for t in ("lm_head", "embed_tokens", "table"))
    return "int4b32" if scheme == "int4b32-asym" and table else scheme


def _grid(weight: Tensor, scheme: str) -> Tensor:
    """`weight` on coremltools' grid for `scheme` (quantized from its fp16 value, as in the package)."""
    from coremltools.optimize.coreml._quantization_passes import linear_quantize_weights as lq  # the pass

    bits, blocks = COMPRESSION[scheme]
    w16 = weight.detach().to(torch.float16).numpy()
    mode = MODES.get(scheme, "linear_symmetric").upper()
    params = lq.blockwise_compress(w16, nbits=bits, mode=mode, signed=True, block_sizes=blocks)
    return torch.from_numpy(np.asarray(lq.decompress(params), dtype=np.float32))


def simulate(model: Gemma3ForCausalLM, scheme: str, int4_rows: np.ndarray | None = None,
             grid: dict | None = None) -> Gemma3ForCausalLM:
    """The eager model with this target's weights for `scheme`: fp16-rounded weights, or the int grid.
    `int4_rows` (`--max-size`): the table split as the export splits it, those rows on int4b32.
    gguf: `grid` (gguf_grid.read_gguf_grid) dequantized as the package's constexpr ops compute it."""
    sim = copy.deepcopy(model)
    if scheme == "gguf":
        from .coreml_gguf import GGUFImport

        imported = GGUFImport(sim, grid)
        with torch.no_grad():
            for name, w in sim.named_parameters():  # the tied table once
                if w.dim() == 2:
                    w.copy_(torch.from_numpy(imported.forms[name].dequantize()))
        return sim
    if int4_rows is not None:
        split_table(sim, int4_rows)
    with torch.no_grad():
        for name, w in sim.named_parameters():  # the tied table once
            if w.dim() == 2:
                w.copy_(_grid(w, weight_scheme(name, scheme)) if scheme in COMPRESSION else w.to(torch.float16).float())
    return sim


def save_function(mlmodel, scheme: str, path: Path, imported=None) -> Path:
    """Compress a converted (or loaded) function for `scheme` and save it as its own package; gguf:
    the weights of `imported` (coreml_gguf.GGUFImport) as their GGUF blocks."""
    if scheme in COMPRESSION:
        mlmodel = compress(mlmodel, scheme)
    elif scheme == "gguf":
        mlmodel = imported.apply(mlmodel, weight_consts(mlmodel))
    mlmodel.save(str(path))
    return path


def save_package(paths: dict[str, Path], out: Path) -> None:
    """One multifunction package of the functions saved at `paths`; identical weights stored once."""
    import coremltools as ct

    desc = ct.utils.MultiFunctionDescriptor()
    for name, path in paths.items():
        desc.add_function(str(path), src_function_name="main", target_function_name=name)
    desc.default_function_name = "decode"
    ct.utils.save_multifunction(desc, str(out))


def _default_tokenizer(config):
    from ..load import _tokenizer_for

    return _tokenizer_for(config)


# -- the table split by rows (`--max-size`, issue 10) ---------------------------------------------

SPLIT_SCHEME = "int4b32"  # what the least used rows become
SPLIT_BLOCK = COMPRESSION[SPLIT_SCHEME][1][1]
# What a package holds besides its weights and scales (two MIL programs, metadata, blob alignment,
# small float constants), from above: measured 1.75 MB on the 18-layer 270M at context 2048 (int8 and
# int4b32, docs/coreml_bench.json) and 0.40 MB on the 6-layer tiny model at context 64.
PACKAGE_BYTES_PER_LAYER, PACKAGE_BYTES = 100_000, 256_000


class SplitTable(torch.nn.Module):
    """The tied embedding / LM head as two tables by rows: `rows8` (kept at the scheme's grid) and
    `rows4` (int4b32); `slot[token]` is the token's row in (rows8, rows4) order."""

    def __init__(self, weight: Tensor, int4_rows: np.ndarray):
        super().__init__()
        rows8, rows4, slot = (torch.from_numpy(a) for a in split_rows(weight.shape[0], int4_rows))
        self.rows8 = torch.nn.Parameter(weight.detach()[rows8].clone(), requires_grad=False)
        self.rows4 = torch.nn.Parameter(weight.detach()[rows4].clone(), requires_grad=False)
        self.register_buffer("slot", slot)
        self.n8 = len(rows8)

    def embed(self, tokens: Tensor) -> Tensor:
        slot = self.slot[tokens]
        kept = torch.nn.functional.embedding(slot.clamp(max=self.n8 - 1), self.rows8)
        rounded = torch.nn.functional.embedding((slot - self.n8).clamp(min=0), self.rows4)
        return torch.where((slot < self.n8)[..., None], kept, rounded)

    def head(self, x: Tensor) -> Tensor:
        logits = torch.cat([torch.nn.functional.linear(x, self.rows8), torch.nn.functional.linear(x, self.rows4)], -1)
        return logits.index_select(-1, self.slot)


class _SplitEmbedding(torch.nn.Module):
    def __init__(self, table: SplitTable):
        super().__init__()
        self.table = table

    def forward(self, tokens: Tensor) -> Tensor:
        return self.table.embed(tokens)


class _SplitHead(_SplitEmbedding):
    def forward(self, x: Tensor) -> Tensor:
        return self.table.head(x)


def split_table(model: Gemma3ForCausalLM, int4_rows: np.ndarray) -> Gemma3ForCausalLM:
    """Swap the tied embedding and head for one SplitTable (in place)."""
    table = SplitTable(model.model.embed_tokens.weight, int4_rows)
    model.model.embed_tokens, model.lm_head = _SplitEmbedding(table), _SplitHead(table)
    return model


def package_bytes(model: Gemma3ForCausalLM, scheme: str, int4: int = 0) -> int:
    """The package's size for `scheme` with `int4` of the table's rows at int4b32, from above: int
    codes and fp16 scales of every weight, fp16 norms, the slot map (int32) when split, and the rest
    (PACKAGE_BYTES_PER_LAYER, PACKAGE_BYTES)."""
    def matrix(n: int, k: int, scheme: str) -> int:
        bits, (_, block) = COMPRESSION[scheme]
        return n * k * bits // 8 + n * (k // block if block else 1) * 2

    table = model.model.embed_tokens.weight
    total = model.config.num_hidden_layers * PACKAGE_BYTES_PER_LAYER + PACKAGE_BYTES
    for p in model.parameters():  # the tied table once
        if p is table:
            v, k = p.shape
            total += matrix(v - int4, k, scheme) + (matrix(int4, k, SPLIT_SCHEME) + 4 * v if int4 else 0)
        else:
            total += matrix(*p.shape, scheme) if p.dim() == 2 else 2 * p.numel()
    return total


def rows_within(model: Gemma3ForCausalLM, scheme: str, budget: int, order, log) -> np.ndarray | None:
    """The fewest least used rows (the end of `order()`, called only when a split is needed) whose int4
    rounding fits the package in `budget`."""
    vocab, hidden = model.model.embed_tokens.weight.shape
    size = package_bytes(model, scheme)
    if size <= budget:
        log(f"  about {size / 1e6:.1f} MB: fits --max-size {budget / 1e6:g} MB without rounding table rows")
        return None
    saved = package_bytes(model, scheme) - package_bytes(model, scheme, 1) + 4 * vocab  # per row, the map aside
    n4 = -(-(size + 4 * vocab - budget) // saved)
    if n4 > vocab:
        least = package_bytes(model, scheme, vocab)
        raise UserError(f"--max-size {budget / 1e6:g} MB is below the smallest this export reaches "
                        f"({least / 1e6:.1f} MB with every table row at int4).")
    log(f"  about {size / 1e6:.1f} MB > --max-size {budget / 1e6:g} MB: the {n4} least used of {vocab} table rows "
        f"({n4 / vocab:.0%}) to int4, blocks of {SPLIT_BLOCK}")
    return np.sort(np.asarray(order())[vocab - n4:])


# -- the exporter -------------------------------------------------------------------------------

def export(model: Gemma3ForCausalLM, folder: Path, spec, log=print, tokenizer=None) -> dict:
    """Write `model.mlpackage` into `folder`; see the module doc.

    The model's caches are replaced by fp16 Core ML caches (in place). `tokenizer` encodes the check
    text (default: the preset's vocabulary)."""
    from ..runtimes.coreml import describe_package

    start = time.perf_counter()
    scheme, C = spec.scheme.name, spec.chunk
    tokenizer = tokenizer or _default_tokenizer(model.config)
    split, imported = {}, None
    if scheme == "gguf":  # before any swap: the model's weights are the GGUF's, by name
        from .coreml_gguf import GGUFImport

        imported = GGUFImport(model, spec.grid)
        for name, fate in imported.notices().items():  # never silently: each tensor rounded again
            log(f"  notice: {name}: {fate}")
    if spec.max_size:
        rows = rows_within(model, scheme, spec.max_size, spec.table_order, log)
        if rows is not None:
            split_table(model, rows)
            split = {**split_record(spec.max_size, rows, model.config.vocab_size, SPLIT_BLOCK), "ranking": spec.table_ranking}
    prepare(model, spec.context)
    width = model.config.hidden_size if spec.vision else None  # vision bundles: image_embeds in
    programs = {"prefill": trace(model, C, bool(width)), "decode": trace(model, 1, bool(width))}
    log(f"  traced prefill (T={C}) and decode (T=1) in {time.perf_counter() - start:.1f} s")
    report = check_numerics(programs, scheme, tokenizer, spec.context, C, log, imported)
    log(f"  fp16 check over {report.tokens} tokens: fp32 blocks {report.fp32_blocks or 'none'}")
    with tempfile.TemporaryDirectory() as tmp:
        paths = {}
        for name, T in (("prefill", C), ("decode", 1)):
            t0 = time.perf_counter()
            mlmodel = convert(programs.pop(name), T, scheme != "fp32", report.fp32_blocks, image_embeds=width)
            paths[name] = save_function(mlmodel, scheme, Path(tmp) / f"{name}.mlpackage", imported)
            del mlmodel  # one function's weights in memory at a time
            log(f"  converted {name} in {time.perf_counter() - t0:.1f} s")
        save_package(paths, folder / ARTIFACT)
    package = describe_package(folder / ARTIFACT)
    log(f"  wrote {ARTIFACT} ({package['size_bytes'] / 2**20:.1f} MiB) in {time.perf_counter() - start:.1f} s")
    if split and package["size_bytes"] > spec.max_size:
        raise RuntimeError(f"the package is {package['size_bytes']} bytes, over --max-size {spec.max_size}: "
                           "package_bytes underestimates it")
    fields = _manifest_fields(package, report, scheme, C)
    fields["target_info"]["export_seconds"] = round(time.perf_counter() - start, 1)
    if imported is not None:
        fields["target_info"]["tensors"] = imported.tensors
        fields["target_info"]["compression"] = _gguf_compression_info(imported)
    if split:
        fields["target_info"]["table_split"] = split
        fields["target_info"]["compression"]["weights"] += (
            f"; {split['int4_rows']} least used of the table's {split['rows']} rows at int4 blocks of {SPLIT_BLOCK} (--max-size)")
    return fields


def check_numerics(programs: dict, scheme: str, tokenizer, context: int, chunk: int, log=print, imported=None):
    """`numerics.check_fp16` over the bundled text, on the weights the package will hold (gguf: those
    of `imported`, coreml_gguf.GGUFImport)."""
    from ..numerics import GraphProxy, check_fp16
    from ..validate import validation_ids

    params = None
    if scheme in COMPRESSION or imported is not None:
        params, grids = {}, {}
        for name, value in programs["prefill"].state_dict.items():  # the tied embedding once
            if value.dim() == 2 and value.data_ptr() not in grids:
                grids[value.data_ptr()] = imported.values(value) if imported else _grid(value, weight_scheme(name, scheme))
            params[name] = grids[value.data_ptr()] if value.dim() == 2 else value
    n_layers = len(programs["prefill"].graph_signature.buffers_to_mutate) // 2  # a k and a v per layer
    ids = validation_ids(tokenizer, min(len(tokenizer.encode(_check_text(), bos=False)) + 1, context))
    fp16 = scheme != "fp32"
    return check_fp16(lambda blocks: GraphProxy(programs, params, fp16, blocks, round_weights=False),
                      ids, chunk, n_layers, fp16=fp16, log=log)


def _manifest_fields(package: dict, report, scheme: str, C: int) -> dict:
    decode = package["functions"]["decode"]
    return {
        "artifact": ARTIFACT,
        "inputs": [{**i, "shape": [1, "T", *i["shape"][2:]]} if i["name"] in ("tokens", "image_embeds") else i
                   for i in decode["inputs"]],
        "outputs": decode["outputs"],
        "cache_dtype": "float16",
        "prefill_chunks": sorted({C, 1}, reverse=True),
        "target_info": {
            "minimum_deployment_target": "iOS18",
            "functions": {"prefill": {"T": C}, "decode": {"T": 1}},
            "compute_precision": "fp32" if scheme == "fp32" else "fp16",
            "compression": _compression_info(scheme),
            "numerics": report.as_dict(),
            "package": {**package, "functions": {  # states: see the manifest's `cache`
                name: {**f, "states": len(f["states"])} for name, f in package["functions"].items()}},
        },
    }


def _compression_info(scheme: str) -> dict | None:
    if scheme not in COMPRESSION:
        return None
    bits, blocks = COMPRESSION[scheme]
    weights = "every linear and the tied embedding"
    if scheme in MODES:
        weights = "every linear; the tied embedding/head table linear_symmetric"
    return {"tool": "coremltools.optimize.coreml.linear_quantize_weights", "mode": MODES.get(scheme, "linear_symmetric"),
            "dtype": f"int{bits}", "block_sizes": blocks, "weights": weights}


def _gguf_compression_info(imported) -> dict:
    forms = imported.forms.values()
    return {"tool": "constexpr_blockwise_shift_scale from the GGUF's blocks (exporters/coreml_gguf.py)",
            "dtypes": sorted({f.dtype for f in forms}),
            "weights": "every linear and the tied embedding, each as its GGUF tensor's own blocks "
                       "(target_info.tensors: what each was imported as, and how exactly)"}


def _check_text() -> str:
    from importlib import resources

    return resources.files("gemma3_export").joinpath("data/validation.txt").read_text()


# -- the vision encoder (issue 8) -------------------------------------------------------------------

VISION_ARTIFACT = "vision.mlpackage"
VISION_SCHEMES = ("fp16", "fp32", "int8")  # int8: per-channel weights of every linear and the projector
VISION_REFERENCE = {"fp16": "fp16", "int8": "fp16"}  # validate's reference kind (the fp16 proxy on Linux)


def trace_vision(vision) -> object:
    """torch.export of the encoder + projector over one image, pixels [1, 3, S, S]."""
    size = vision.config.vision_config.image_size
    with torch.no_grad():
        ep = torch.export.export(vision.float().eval().requires_grad_(False), (torch.zeros(1, 3, size, size),), strict=False)
    return ep.run_decompositions({})


def vision_weight_consts(mlmodel) -> list[str]:
    """Names of the rank-2 const ops that feed a linear's weight or a matmul's second operand."""
    names = []
    for op in (op for f in _program(mlmodel).functions.values() for op in f.operations):
        var = op.inputs.get("weight") if op.op_type == "linear" else op.inputs.get("y") if op.op_type == "matmul" else None
        if var is not None and var.op is not None and var.op.op_type == "const" and var.rank == 2:
            names.append(var.op.name)
    return sorted(set(names))


def export_vision(vision, folder: Path, scheme: str, log=print) -> dict:
    """Write vision.mlpackage: `pixels float32[1, 3, S, S] -> image_embeds float32[1, tokens, hidden]`,
    fp16 compute (the projector's RMSNorm fp32, as `numerics.tag_precision` picks) or fp32; int8: every
    linear's and the projector's weights per channel through coremltools' linear_quantize_weights (the
    patch convolution stays fp16). Returns the manifest's `vision` fields."""
    import coremltools as ct
    from coremltools.optimize.coreml import OpLinearQuantizerConfig, OptimizationConfig, linear_quantize_weights

    from ..numerics import op_selector, tag_precision
    from ..runtimes.coreml import describe_package

    if scheme not in VISION_SCHEMES:
        raise UserError(f"The vision encoder exports as {', '.join(VISION_SCHEMES)} on coreml, not {scheme}.")
    start = time.perf_counter()
    size = vision.config.vision_config.image_size
    ep = trace_vision(vision)
    tag_precision(ep)
    precision = ct.precision.FLOAT32 if scheme == "fp32" else ct.transform.FP16ComputePrecision(op_selector=op_selector)
    with _lean_fp16_overflow_check():
        mlmodel = ct.convert(ep, minimum_deployment_target=ct.target.iOS18, compute_precision=precision,
                             inputs=[ct.TensorType(name="pixels", shape=(1, 3, size, size), dtype=np.float32)],
                             outputs=[ct.TensorType(name="image_embeds", dtype=np.float32)], skip_model_load=True)
    if scheme == "int8":
        op = OpLinearQuantizerConfig(mode="linear_symmetric", dtype="int8", granularity="per_channel", weight_threshold=1)
        names = vision_weight_consts(mlmodel)
        mlmodel = linear_quantize_weights(mlmodel, config=OptimizationConfig(op_name_configs={n: op for n in names}))
    mlmodel.save(str(folder / VISION_ARTIFACT))
    package = describe_package(folder / VISION_ARTIFACT)
    main = package["functions"]["main"]
    log(f"  wrote {VISION_ARTIFACT} ({package['size_bytes'] / 2**20:.1f} MiB, {scheme}) in {time.perf_counter() - start:.0f} s")
    return {"artifact": VISION_ARTIFACT, "inputs": main["inputs"], "outputs": main["outputs"], "scheme": scheme,
            "weight_bytes": package["weight_file_bytes"], "weight_elements": package["weight_elements"],
            "compute_precision": "fp32" if scheme == "fp32" else "fp16"}


def simulate_vision(vision, scheme: str):
    """The eager encoder + projector with the package's weights: on coremltools' int8 grid (per
    channel, from the fp16 value), or fp16-rounded. validate compares the fp16 proxy against it."""
    sim = copy.deepcopy(vision).float()
    with torch.no_grad():
        for module in sim.modules():
            if isinstance(module, torch.nn.Linear):
                w = module.weight
                w.copy_(_vision_grid(w, scheme))
        proj = sim.multi_modal_projector.mm_input_projection_weight  # [K, N], used as x @ w
        proj.copy_(_vision_grid(proj.t(), scheme).t())
    return sim


def _vision_grid(weight: Tensor, scheme: str) -> Tensor:
    """[N, K] weight as the vision package holds it (int8 per output channel, or fp16-rounded)."""
    if scheme == "int8":
        return _grid_per_channel(weight, 8)
    return weight.to(torch.float16).float() if scheme == "fp16" else weight


def _grid_per_channel(weight: Tensor, bits: int) -> Tensor:
    """coremltools' linear-symmetric per-channel grid of weight [N, K] (from its fp16 value)."""
    from coremltools.optimize.coreml._quantization_passes import linear_quantize_weights as lq

    w16 = weight.detach().to(torch.float16).numpy()
    params = lq.blockwise_compress(w16, nbits=bits, mode="LINEAR_SYMMETRIC", signed=True, block_sizes=[1, 0])
    return torch.from_numpy(np.asarray(lq.decompress(params), dtype=np.float32))
