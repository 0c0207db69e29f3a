"""Fake quantization for QAT and the integer grid a QAT checkpoint carries.

- `prepare(model, scheme)`: torchao's `QATConfig(base, step="prepare")` swaps every `nn.Linear`
  (the LM head included) for a `FakeQuantizedLinear`; fp8 uses the same module with `float8_fake_quantizer()`
  (torchao's Float8FakeQuantizer and Float8WeightOnlyConfig run on CPU but give NaN for an all-zero row;
  its fp8 activation configs need a GPU).
- The tied embedding / LM head: one Parameter, fake-quantized on one grid (per row or per block of a
  row) by both users. The LM head is torchao's `FakeQuantizedLinear`; the embedding is
  `RowFakeQuantizedEmbedding`, which gathers the looked-up rows first and fake-quantizes only those: the
  same values, because every scale belongs to one row.
- `convert(model, scheme)`: `QATConfig(base, step="convert")`: real torchao quantized tensors.
- `grid(model, scheme)`: integer codes + scales (+ zero points) of every quantized weight; they
  dequantize bitwise to what the fake quantizer trained on. `write_grid` / `read_grid` store them;
  `quantize_from_grid` rebuilds the torchao-quantized model from a stored grid without re-rounding.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from .errors import UserError

if TYPE_CHECKING:  # torch is imported inside functions: the CLI reads QAT_SCHEMES without it
    from torch import Tensor, nn

GRID_FORMAT = "gemma3-export-qat-grid/1"
# The tensors live in a subfolder: the loader reads every *.safetensors at the top of a checkpoint.
GRID_JSON, GRID_TENSORS = "quantization.json", "quantization/codes.safetensors"
FP8_MAX = 448.0  # torch.finfo(torch.float8_e4m3fn).max


@dataclass(frozen=True)
class QATScheme:
    name: str
    description: str
    dtype: str  # "int4" or "float8_e4m3fn"
    block_size: int | None  # None: one scale per output channel (row)
    dynamic_activations: bool = False  # 8da4w: int8 per-token asymmetric activations, dynamic

    @property
    def granularity(self) -> str:
        return "per_channel" if self.block_size is None else "per_group"

    def linear_config(self):
        """torchao's PTQ base config for the linear layers (None for fp8: `float8_fake_quantizer()`)."""
        import torch
        from torchao.quantization import Int8DynamicActivationIntxWeightConfig, IntxWeightOnlyConfig

        if self.dtype != "int4":
            return None
        if self.dynamic_activations:
            return Int8DynamicActivationIntxWeightConfig(weight_dtype=torch.int4, weight_granularity=self._granularity())
        return IntxWeightOnlyConfig(weight_dtype=torch.int4, granularity=self._granularity())

    def weight_only_config(self):
        """The weight grid alone (for the embedding, which takes no activation quantization)."""
        import torch
        from torchao.quantization import IntxWeightOnlyConfig

        return IntxWeightOnlyConfig(weight_dtype=torch.int4, granularity=self._granularity())

    def _granularity(self):
        from torchao.quantization.granularity import PerAxis, PerGroup

        return PerAxis(0) if self.block_size is None else PerGroup(self.block_size)


QAT_SCHEMES: dict[str, QATScheme] = {
    s.name: s
    for s in [
        QATScheme("int4", "per-channel int4 weights (Core ML, ONNX)", "int4", None),
        QATScheme("int4b32", "int4 weights in blocks of 32 (Core ML, ONNX)", "int4", 32),
        QATScheme("int4b128", "int4 weights in blocks of 128 (ONNX)", "int4", 128),
        QATScheme("8da4w", "int8 dynamic activations x int4 weights in blocks of 32 (ExecuTorch XNNPACK)", "int4", 32, True),
        QATScheme("fp8", "float8 e4m3 weights with per-channel scales (ONNX)", "float8_e4m3fn", None),
    ]
}


def qat_scheme(name: str) -> QATScheme:
    """The named QAT scheme; an unknown name lists the choices."""
    try:
        return QAT_SCHEMES[name]
    except KeyError:
        raise UserError(f"Unknown QAT scheme {name!r}; choose one of {', '.join(QAT_SCHEMES)}.") from None


# -- fp8 ------------------------------------------------------------------------------------------


def fp8_quantize(w: Tensor) -> tuple[Tensor, Tensor]:
    """e4m3 codes [N, K] and per-row scales [N, 1]: scale = max|row| / 448 (1 for an all-zero row)."""
    import torch

    amax = w.detach().float().abs().amax(dim=-1, keepdim=True)  # [N, 1]
    scale = torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax))
    codes = (w.detach().float() / scale).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return codes, scale


def fp8_dequantize(codes: Tensor, scale: Tensor) -> Tensor:
    return codes.float() * scale


@functools.cache
def _float8_fake_quantizer_cls():
    from torch import nn

    class Float8RowFakeQuantizer(nn.Module):
        """Round weights through float8 e4m3 with per-row scales; straight-through gradient."""

        config = None  # torchao's convert step looks for range-learning settings here

        def forward(self, w: Tensor) -> Tensor:  # [N, K]
            dq = fp8_dequantize(*fp8_quantize(w)).to(w.dtype)
            return w + (dq - w).detach()

    return Float8RowFakeQuantizer


def float8_fake_quantizer() -> nn.Module:
    """A fresh `float8_fake_quantizer()` (the class is built on first use: torch is imported lazily)."""
    return _float8_fake_quantizer_cls()()


# -- the tied embedding ---------------------------------------------------------------------------


@functools.cache
def _fake_quantized_embedding_cls():
    import torch.nn.functional as F
    from torchao.quantization.qat import FakeQuantizedEmbedding

    class RowFakeQuantizedEmbedding(FakeQuantizedEmbedding):
        """Gather rows, then fake-quantize only those (scales are per row or per block of a row)."""

        def forward(self, x: Tensor) -> Tensor:
            rows = F.embedding(x, self.weight)  # [..., D]
            shape = rows.shape
            return self.weight_fake_quantizer(rows.reshape(-1, shape[-1])).reshape(shape)

    return RowFakeQuantizedEmbedding


def _embedding_fake_quantizer(scheme: QATScheme) -> nn.Module:
    if scheme.dtype != "int4":
        return float8_fake_quantizer()
    from torchao.quantization.qat import IntxFakeQuantizeConfig, IntxFakeQuantizer
    from torchao.quantization.quant_primitives import MappingType

    base = scheme.weight_only_config()  # the same inference torchao's QATConfig does for a linear
    return IntxFakeQuantizer(IntxFakeQuantizeConfig(
        dtype=base.weight_dtype, granularity=base.granularity, mapping_type=MappingType.SYMMETRIC,
        scale_precision=base.scale_dtype,
    ))


# -- prepare / convert ----------------------------------------------------------------------------


def prepare(model: nn.Module, scheme: QATScheme | str) -> nn.Module:
    """Swap in fake quantization, in place: every linear (the LM head too) and the tied embedding."""
    import torch
    from torch import nn
    from torchao.quantization import quantize_
    from torchao.quantization.qat import FakeQuantizedLinear, QATConfig

    scheme = qat_scheme(scheme) if isinstance(scheme, str) else scheme
    _check_shapes(model, scheme)
    base = scheme.linear_config()
    if base is not None:
        quantize_(model, QATConfig(base, step="prepare"))
    else:
        for parent in list(model.modules()):
            for name, child in list(parent.named_children()):
                if type(child) is nn.Linear:
                    fq = FakeQuantizedLinear.from_linear(child)
                    fq.weight_fake_quantizer = float8_fake_quantizer()
                    setattr(parent, name, fq)
    text = model.model
    old = text.embed_tokens
    with torch.device("meta"):
        emb = _fake_quantized_embedding_cls()(old.num_embeddings, old.embedding_dim)
    emb.weight = old.weight  # the Parameter the LM head shares
    emb.weight_fake_quantizer = _embedding_fake_quantizer(scheme)
    text.embed_tokens = emb
    assert model.lm_head.weight is emb.weight
    return model


def _check_shapes(model: nn.Module, scheme: QATScheme) -> None:
    from torch import nn

    if scheme.block_size is None:
        return
    for name, mod in model.named_modules():
        if isinstance(mod, (nn.Linear, nn.Embedding)) and mod.weight.shape[-1] % scheme.block_size:
            raise UserError(f"{name} has {mod.weight.shape[-1]} inputs, not a multiple of the {scheme.name} block of {scheme.block_size}.")


def convert(model: nn.Module, scheme: QATScheme | str) -> nn.Module:
    """Prepared -> quantized, in place (`QATConfig(base, step="convert")`): torchao tensors whose
    integer codes are exactly the grid the fake quantizer trained on. The tie is not kept."""
    import torch
    from torch import nn
    from torchao.quantization import quantize_
    from torchao.quantization.qat import FakeQuantizedEmbedding, QATConfig

    scheme = qat_scheme(scheme) if isinstance(scheme, str) else scheme
    with torch.no_grad():
        if scheme.dtype == "int4":
            quantize_(model, QATConfig(scheme.linear_config(), step="convert"))
            quantize_(model, QATConfig(scheme.weight_only_config(), step="convert"),
                      filter_fn=lambda m, _: isinstance(m, FakeQuantizedEmbedding))
            return model
        quantize_(model, QATConfig(step="convert"), filter_fn=lambda m, _: hasattr(m, "weight_fake_quantizer"))
        for mod in model.modules():
            if isinstance(mod, (nn.Linear, nn.Embedding)):
                mod.weight = nn.Parameter(_float8_tensor(*fp8_quantize(mod.weight)), requires_grad=False)
    return model


def _float8_tensor(codes: Tensor, scale: Tensor) -> Tensor:
    import torch
    from torchao.quantization import Float8Tensor

    return Float8Tensor(codes, scale, block_size=[1, codes.shape[-1]], dtype=torch.float32)


# -- the grid -------------------------------------------------------------------------------------


@dataclass
class QuantGrid:
    """Codes + scales (+ zero points) per weight, in Hugging Face names (`model.layers.0.mlp.up_proj.weight`)."""

    scheme: QATScheme
    codes: dict[str, Tensor]  # int8 holding int4 values, or float8_e4m3fn
    scales: dict[str, Tensor]  # fp32 [N, K / block] (per channel: [N, 1])
    zero_points: dict[str, Tensor]  # int8, same shape as scales (int schemes; all 0: symmetric)

    def dequantize(self, name: str) -> Tensor:
        codes, scale = self.codes[name], self.scales[name]
        if self.scheme.dtype != "int4":
            return fp8_dequantize(codes, scale)
        return dequantize_int4(codes, scale, self.zero_points[name])

    def torchao_tensor(self, name: str, activations: bool = True, scale_dtype=None) -> Tensor:
        """The weight as the tensor `convert` makes (IntxUnpackedToInt8Tensor / Float8Tensor);
        `scale_dtype` stores the int scales in another dtype (XNNPACK keeps int4 scales as bf16)."""
        codes, scale = self.codes[name], self.scales[name]
        if self.scheme.dtype != "int4":
            return _float8_tensor(codes, scale)
        import torch
        from torchao.quantization import IntxUnpackedToInt8Tensor

        act = "int8_asym_per_token" if activations and self.scheme.dynamic_activations else None
        block = (1, codes.shape[-1] // scale.shape[-1])
        scale = scale if scale_dtype is None else scale.to(scale_dtype)
        return IntxUnpackedToInt8Tensor(codes, scale, self.zero_points[name], torch.int4, block, torch.float32, act)


def dequantize_int4(codes: Tensor, scale: Tensor, zero_point: Tensor | None = None) -> Tensor:
    """w [N, K] from int codes [N, K] and scales (zero points) [N, K / block]."""
    block = codes.shape[-1] // scale.shape[-1]
    q = codes.float().view(codes.shape[0], -1, block)  # [N, K / block, block]
    if zero_point is not None:
        q = q - zero_point.float()[..., None]
    return (q * scale[..., None]).view(codes.shape)


def grid(model: nn.Module, scheme: QATScheme | str) -> QuantGrid:
    """The integer grid of a prepared (or float) model's weights, as `convert` would store it."""
    import torch
    from torchao.quantization import IntxUnpackedToInt8Tensor
    from torchao.quantization.quant_primitives import MappingType

    scheme = qat_scheme(scheme) if isinstance(scheme, str) else scheme
    out = QuantGrid(scheme, {}, {}, {})
    for name, w in _quantized_weights(model).items():
        w = w.detach().float()
        if scheme.dtype == "int4":
            block = scheme.block_size or w.shape[-1]
            t = IntxUnpackedToInt8Tensor.from_hp(w, (1, block), torch.int4, mapping_type=MappingType.SYMMETRIC)
            out.codes[name], out.scales[name], out.zero_points[name] = t.qdata, t.scale, t.zero_point
        else:
            out.codes[name], out.scales[name] = fp8_quantize(w)
    return out


def _quantized_weights(model: nn.Module) -> dict[str, Tensor]:
    """Every linear/embedding weight once, the tied LM head under the embedding's name."""
    from torch import nn

    seen, out = set(), {}
    for name, mod in model.named_modules():
        if isinstance(mod, (nn.Linear, nn.Embedding)) and id(mod.weight) not in seen:
            seen.add(id(mod.weight))
            out[f"{name}.weight"] = mod.weight
    return out


def write_grid(g: QuantGrid, folder: Path, extra: dict | None = None) -> None:
    """quantization/codes.safetensors (codes, scales, zero points) + quantization.json describing them."""
    from safetensors.torch import save_file

    tensors = {}
    for name in g.codes:
        tensors[f"{name}.codes"] = g.codes[name].contiguous()
        tensors[f"{name}.scale"] = g.scales[name].contiguous()
        if name in g.zero_points:
            tensors[f"{name}.zero_point"] = g.zero_points[name].contiguous()
    (folder / GRID_TENSORS).parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, folder / GRID_TENSORS, metadata={"format": GRID_FORMAT})
    s = g.scheme
    meta = {
        "format": GRID_FORMAT,
        "scheme": s.name,
        "description": s.description,
        "dtype": s.dtype,
        "granularity": s.granularity,
        "block_size": s.block_size,
        "symmetric": True,
        "qmin": -8 if s.dtype == "int4" else -FP8_MAX,
        "qmax": 7 if s.dtype == "int4" else FP8_MAX,
        "activations": "int8 per-token asymmetric, dynamic" if s.dynamic_activations else None,
        "dequantize": (
            "w[n, k] = (codes[n, k] - zero_point[n, k // block]) * scale[n, k // block]"
            if s.dtype == "int4" else "w[n, k] = float(codes[n, k]) * scale[n, 0]"
        ),
        "tensors_file": GRID_TENSORS,
        "tensors": sorted(g.codes),
        "tied": {"lm_head.weight": "model.embed_tokens.weight"},
        **(extra or {}),
    }
    (folder / GRID_JSON).write_text(json.dumps(meta, indent=2))


def read_grid(folder: str | Path) -> QuantGrid | None:
    """The grid of a QAT checkpoint folder, or None when the folder has no quantization.json."""
    from safetensors.torch import load_file

    folder = Path(folder)
    if not (folder / GRID_JSON).exists():
        return None
    try:
        meta = json.loads((folder / GRID_JSON).read_text())
        tensors = load_file(folder / meta["tensors_file"])
    except (OSError, ValueError, KeyError) as e:
        raise UserError(f"{folder / GRID_JSON} or its tensors cannot be read ({e}).") from None
    if meta.get("format") != GRID_FORMAT:
        raise UserError(f"{folder / GRID_JSON} has format {meta.get('format')!r}, not {GRID_FORMAT}.")
    g = QuantGrid(qat_scheme(meta["scheme"]), {}, {}, {})
    for name in meta["tensors"]:
        g.codes[name], g.scales[name] = tensors[f"{name}.codes"], tensors[f"{name}.scale"]
        if f"{name}.zero_point" in tensors:
            g.zero_points[name] = tensors[f"{name}.zero_point"]
    return g


def quantize_from_grid(model: nn.Module, g: QuantGrid, linear_scale_dtype=None) -> nn.Module:
    """Give a float model's linears and embedding the grid's torchao tensors (no re-rounding), in place.
    The LM head gets its own tensor (with the scheme's activation quantization); the tie is not kept.
    `linear_scale_dtype`: the linears' scales in another dtype (XNNPACK keeps int4 scales as bf16)."""
    import torch
    from torch import nn

    weights = _quantized_weights(model)
    missing = sorted(set(weights) - set(g.codes))
    if missing:
        raise UserError(f"The quantization grid lacks {', '.join(missing[:3])}; it belongs to another model.")
    tied = id(model.model.embed_tokens.weight)
    with torch.no_grad():
        for name, mod in model.named_modules():
            if not isinstance(mod, (nn.Linear, nn.Embedding)):
                continue
            key = "model.embed_tokens.weight" if id(mod.weight) == tied else f"{name}.weight"
            if tuple(g.codes[key].shape) != tuple(mod.weight.shape):
                raise UserError(f"The quantization grid's {key} is {tuple(g.codes[key].shape)}, the model's {tuple(mod.weight.shape)}.")
            act = isinstance(mod, nn.Linear)
            scale_dtype = linear_scale_dtype if act else None
            mod.weight = nn.Parameter(g.torchao_tensor(key, activations=act, scale_dtype=scale_dtype), requires_grad=False)
    return model
