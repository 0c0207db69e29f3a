"""Named quantization schemes and the table of which target takes which (DESIGN.md, STACK.md).

A request outside the table is refused before any work starts. The schemes themselves are applied by
each target's exporter through its own library (onnxruntime.quantization, torchao, coremltools).
"""

from __future__ import annotations

from dataclasses import dataclass

from .errors import UserError


@dataclass(frozen=True)
class Scheme:
    name: str
    description: str
    weight_bits: int  # storage bits per linear weight (16 / 32 for float), for memory estimates
    block_size: int | None = None  # None: per-channel (or float)


SCHEMES: dict[str, Scheme] = {
    s.name: s
    for s in [
        Scheme("fp32", "float32 weights", 32),
        Scheme("fp16", "float16 weights", 16),
        Scheme("int8", "per-channel int8 weights", 8),
        Scheme("int4", "per-channel int4 weights (the report's Int4)", 4),
        Scheme("int4b32", "int4 weights in blocks of 32 (the report's Int4 blocks=32)", 4, 32),
        Scheme("int4b128", "int4 weights in blocks of 128 (a quarter of int4b32's scales: decodes faster; "
                           "best rounded by `gemma3-export gptq`)", 4, 128),
        Scheme("int4b32-asym", "int4 weights in blocks of 32 with a zero point per block (the tied table symmetric)", 4, 32),
        Scheme("int8b32", "int8 weights in blocks of 32 (Q8_0's grid)", 8, 32),
        Scheme("8da4w", "int8 dynamic activations x int4 weights in blocks of 32 (XNNPACK)", 4, 32),
        Scheme("8da4w-pc", "int8 dynamic activations x per-channel int4 weights (XNNPACK)", 4),
        Scheme("8da8w", "int8 dynamic activations x per-channel int8 weights (XNNPACK)", 8),
        Scheme("fp8", "float8 e4m3 weights with per-channel scales (the report's 8-bit column)", 8),
        Scheme("gguf", "the source GGUF's own blocks per tensor, not rounded again (4 to 8 bits)", 8),
    ]
}

# Which scheme each target lowers correctly on this stack. ExecuTorch refuses weight-only schemes:
# they lower to XNNPACK with silently wrong numbers (STACK.md); its int8/int4 are the 8da forms.
TARGET_SCHEMES: dict[str, tuple[str, ...]] = {
    "onnx": ("fp32", "fp16", "int8", "int4", "int4b32", "int4b128", "int4b32-asym", "fp8", "gguf"),
    "executorch": ("fp32", "8da4w", "8da4w-pc", "8da8w"),
    "coreml": ("fp16", "fp32", "int8", "int8b32", "int4", "int4b32", "int4b32-asym", "gguf"),
}

# What `gemma3-export gptq` rounds to: the int4 weight-only grids ONNX stores exactly (QAT's schemes of the same names).
GPTQ_SCHEMES = ("int4", "int4b32", "int4b128")

DEFAULT_SCHEME = {"onnx": "fp32", "executorch": "8da4w", "coreml": "fp16"}

_WHY_NOT = {
    ("executorch", "int8"): "weight-only linears lower to XNNPACK with wrong numbers; use 8da8w",
    ("executorch", "int4"): "weight-only linears lower to XNNPACK with wrong numbers; use 8da4w-pc",
    ("executorch", "int4b32"): "weight-only linears lower to XNNPACK with wrong numbers; use 8da4w",
    ("executorch", "int4b32-asym"): "XNNPACK lowers int4 blocks with zero points to wrong numbers (it keeps only the scales); use 8da4w",
    ("executorch", "int4b128"): "weight-only linears lower to XNNPACK with wrong numbers; use 8da4w",
    ("coreml", "int4b128"): "its blocks of 128 are measured on onnxruntime's MatMulNBits only so far; use int4b32",
    ("executorch", "fp8"): "fp8 weights do not lower to ExecuTorch",
    ("executorch", "fp16"): "this stack's XNNPACK path is measured in fp32 only",
    ("coreml", "fp8"): "Core ML has no fp8 weight type",
    ("onnx", "int8b32"): "8-bit MatMulNBits in blocks of 32 is what gguf stores for Q8_0 tensors; use int8 or gguf",
    ("executorch", "int8b32"): "weight-only linears lower to XNNPACK with wrong numbers; use 8da8w",
    ("executorch", "gguf"): "the GGUF's blocks map onto Core ML's constexpr_blockwise_shift_scale and "
                            "onnxruntime's MatMulNBits only so far",
}


def check_scheme(target: str, scheme: str | None) -> Scheme:
    """The scheme for `target` (its default when None); one sentence when the target cannot take it."""
    name = scheme or DEFAULT_SCHEME[target]
    if name not in SCHEMES:
        raise UserError(f"Unknown quantization scheme {name!r}; choose one of {', '.join(SCHEMES)}.")
    if name not in TARGET_SCHEMES[target]:
        why = _WHY_NOT.get((target, name), "this stack does not lower it correctly")
        raise UserError(
            f"The {target} target does not take {name} ({why}); it takes {', '.join(TARGET_SCHEMES[target])}."
        )
    return SCHEMES[name]
