"""ExecuTorch exporter: one `forward` program lowered to XNNPACK, loadable by ExecuTorch's stock LLM runner.

    forward(tokens int64[1, T], input_pos int64[1]) -> logits float32[1, vocab]   T = 1 .. chunk

The KV cache lives in the program as mutable buffers (global layers `context` slots, local layers their
ring), initialised to zero (`InitializedMutableBufferPass`: without it their first contents are
undefined, and 0 * NaN survives the mask). One method, not prefill + decode: the stock C++ runner does
not share mutable buffers between methods (STACK.md). The constant methods are the metadata the stock
runner reads (`extension/llm/runner/constants.h`): `get_max_seq_len` (its prefill chunk),
`get_max_context_len`, `get_vocab_size`, `get_bos_id`, `get_eos_ids`, `use_kv_cache`,
`enable_dynamic_shape`.

Quantization (`quantize`, also `simulate` for validate) goes through torchao's configs that XNNPACK
lowers correctly: every linear, the LM head included, as int8 dynamic activations x int4/int8 weights
(`Int8DynamicActivationIntxWeightConfig`), and the embedding as weight-only int4/int8 rows or blocks
(`IntxWeightOnlyConfig`, run by ExecuTorch's quantized embedding kernels, not XNNPACK). Each module gets
its own quantized tensor, so the tied embedding / LM head are stored twice (a gather table and a
matmul weight). Int4 scales are bf16 because XNNPACK stores them so: the eager model then sits on the
exact grid the .pte computes with.
"""

from __future__ import annotations

import math
import time
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from ..model import MLP, Gemma3ForCausalLM
from ..quant import SCHEMES
from .executorch_cache import cache_layout, use_custom_ops

if TYPE_CHECKING:
    from ..pipeline import ExportSpec

ARTIFACT = "model.pte"
GRID_SCALE_DTYPE = torch.bfloat16  # a QAT grid's linear int4 scales in the .pte (XNNPACK stores them so)
STOP_IDS = (1, 106)  # Gemma 3's <eos> and <end_of_turn> (GEMMA3.md): an artifact carries both
CACHE_BUFFERS = "self_attn_cache_"  # placeholder names b_model_layers_{i}_self_attn_cache_{k,v}


class TanhGeluMLP(nn.Module):
    """XNNPACK lowers gelu(approximate="tanh") as the exact erf GELU (up to 4.7e-4 off): spell tanh out."""

    def __init__(self, mlp: MLP):
        super().__init__()
        self.gate_proj, self.up_proj, self.down_proj = mlp.gate_proj, mlp.up_proj, mlp.down_proj

    def forward(self, x: Tensor) -> Tensor:
        g = self.gate_proj(x)
        gelu = 0.5 * g * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (g + 0.044715 * g * g * g)))
        return self.down_proj(gelu * self.up_proj(x))


def quant_configs(scheme: str) -> tuple[object, object] | None:
    """torchao configs (linears, embedding) for `scheme`; None for fp32."""
    from torchao.quantization import Int8DynamicActivationIntxWeightConfig, IntxWeightOnlyConfig, PerAxis, PerGroup

    s = SCHEMES[scheme]
    if s.name == "fp32":
        return None
    dtype = {4: torch.int4, 8: torch.int8}[s.weight_bits]
    granularity = PerGroup(s.block_size) if s.block_size else PerAxis(0)
    linear = Int8DynamicActivationIntxWeightConfig(
        weight_dtype=dtype,
        weight_granularity=granularity,
        weight_scale_dtype=torch.bfloat16 if s.weight_bits == 4 else None,  # what XNNPACK keeps
    )
    return linear, IntxWeightOnlyConfig(weight_dtype=dtype, granularity=granularity)


def quantize(model: nn.Module, scheme: str, grid=None) -> nn.Module:
    """Quantize `model` IN PLACE for `scheme` (see the module docstring) and return it. With a QAT
    checkpoint's `grid`, its codes and scales as they are (the linears' int4 scales in bf16, as XNNPACK
    keeps them; the embedding's stay fp32: ExecuTorch's quantized embedding reads bf16 scales wrongly)."""
    if grid is not None:
        from ..fake_quant import quantize_from_grid

        return quantize_from_grid(model, grid, linear_scale_dtype=GRID_SCALE_DTYPE).requires_grad_(False)
    configs = quant_configs(scheme)
    if configs is None:
        return model
    from torchao.quantization import quantize_

    linear, embedding = configs
    quantize_(model, linear, filter_fn=lambda m, _: isinstance(m, nn.Linear))
    quantize_(model, embedding, filter_fn=lambda m, _: isinstance(m, nn.Embedding))
    return model.requires_grad_(False)


def simulate(model: Gemma3ForCausalLM, scheme: str, grid=None) -> Gemma3ForCausalLM:
    """The eager model on the .pte's quantization grid (validate's reference). Modifies `model`."""
    return quantize(model, scheme, grid)


def metadata(model: Gemma3ForCausalLM, context: int, chunk: int) -> dict[str, object]:
    """The constant methods ExecuTorch's stock LLM runner reads."""
    c = model.config
    return {
        "get_max_seq_len": chunk,  # the runner's prefill chunk
        "get_max_context_len": context,
        "get_vocab_size": c.vocab_size,
        "get_bos_id": c.bos_token_id,
        "get_eos_ids": sorted({*STOP_IDS, c.eos_token_id}),
        "use_kv_cache": True,
        "enable_dynamic_shape": chunk > 1,
    }


def to_program(model: Gemma3ForCausalLM, context: int, chunk: int, log=print, image_embeds: bool = False):
    """torch.export -> XNNPACK -> ExecuTorch program (`.buffer` is the .pte). Modifies `model`: in-place
    caches and custom-op attention (executorch_cache), the tanh GELU spelled out.
    `image_embeds`: forward takes a third input, image_embeds float32[1, T, hidden] (vision bundles)."""
    from torch.export import Dim

    use_custom_ops(model, context, chunk)
    for layer in model.model.layers:
        if isinstance(layer.mlp, MLP):
            layer.mlp = TanhGeluMLP(layer.mlp)
    example = (torch.zeros(1, chunk, dtype=torch.long), torch.tensor([0]))
    # Dim("T", min=1) fails: the solver cannot prove view-contiguity guards that hold for every T >= 1.
    # DYNAMIC accepts them (range [2, chunk], the usual 0/1 specialization); T = 1 still runs (tested).
    dynamic = ({1: Dim.DYNAMIC(min=1, max=chunk)} if chunk > 1 else None, None)
    if image_embeds:
        example += (torch.zeros(1, chunk, model.config.hidden_size),)
        dynamic += (dynamic[0],)
    start = time.perf_counter()
    with torch.no_grad(), warnings.catch_warnings():
        # executorch's custom-op meta functions still call torch._check_is_size, once per layer and op
        warnings.filterwarnings("ignore", "_check_is_size will be removed", FutureWarning)
        ep = torch.export.export(model, example, dynamic_shapes=dynamic, strict=False)
    if chunk > 1:
        _check_dynamic(ep, chunk)
    log(f"  torch.export in {time.perf_counter() - start:.0f} s; lowering to XNNPACK (slow: minutes for 1b)")
    program = lower(ep, metadata(model, context, chunk), init_buffers=[CACHE_BUFFERS])
    log(f"  lowered and emitted in {time.perf_counter() - start:.0f} s")
    return program


def lower(ep, constant_methods: dict | None = None, init_buffers: list[str] = ()):
    """An exported program -> XNNPACK-delegated ExecuTorch program, with this target's settings."""
    import executorch.kernels.quantized  # noqa: F401  (out variants of the quantized embedding ops)
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import ExecutorchBackendConfig, to_edge_transform_and_lower
    from executorch.exir.passes.init_mutable_pass import InitializedMutableBufferPass

    with torch.no_grad():
        edge = to_edge_transform_and_lower(ep, partitioner=[XnnpackPartitioner()], constant_methods=constant_methods)
        return edge.to_executorch(ExecutorchBackendConfig(
            passes=[InitializedMutableBufferPass(list(init_buffers))] if init_buffers else [],
            do_quant_fusion_and_const_prop=True,  # dequantize + embedding -> quantized_decomposed kernels
        ))


def _check_dynamic(ep, chunk: int) -> None:
    """Fail loudly if export pinned T to one value instead of keeping it dynamic up to `chunk`."""
    uppers = {int(r.upper) for r in ep.range_constraints.values() if r.upper.is_Integer}  # positions: unbounded (oo)
    if chunk not in uppers:
        raise RuntimeError(f"torch.export did not keep T dynamic up to {chunk}: {ep.range_constraints}")


def initialized_buffers(program) -> list[str]:
    """Names of the mutable buffers the program initialises (zeros), from the emitted graph."""
    gm = program.exported_program().graph_module
    return [n.name for n in gm.graph.nodes if n.op == "placeholder" and n.meta.get("et_init_buffer")]


def export(model: Gemma3ForCausalLM, folder: Path, spec: ExportSpec, log=print) -> dict:
    """Write `model.pte` into `folder`; return the manifest fields. Modifies `model` (quantized, cached)."""
    config = model.config
    start = time.perf_counter()
    if spec.scheme.name != "fp32":
        log(f"  quantizing with torchao ({spec.scheme.description})")
    quantize(model, spec.scheme.name, spec.grid)
    program = to_program(model, spec.context, spec.chunk, log, image_embeds=spec.vision is not None)
    initialized = initialized_buffers(program)
    if len(initialized) != 2 * config.num_hidden_layers:
        raise RuntimeError(f"expected every k/v cache buffer to be initialised, got {initialized}")
    path = folder / ARTIFACT
    path.write_bytes(program.buffer)
    log(f"  wrote {ARTIFACT} ({path.stat().st_size / 2**20:.1f} MiB) in {time.perf_counter() - start:.0f} s")
    return {
        "artifact": ARTIFACT,
        "inputs": [
            {"name": "tokens", "shape": [1, "T"], "dtype": "int64"},
            {"name": "input_pos", "shape": [1], "dtype": "int64"},
            *([{"name": "image_embeds", "shape": [1, "T", config.hidden_size], "dtype": "float32"}] if spec.vision else []),
        ],
        "outputs": [{"name": "logits", "shape": [1, config.vocab_size], "dtype": "float32"}],
        "cache_dtype": "float32",
        "cache": cache_layout(config, spec.context, spec.chunk),
        "prefill_chunks": list(range(1, spec.chunk + 1)),
        "target_info": {
            "method": "forward",
            "backend": "XNNPACK",
            "metadata": metadata(model, spec.context, spec.chunk),
            "cache": "mutable buffers [1, slots, n_kv, head_dim] in the program, zero-initialised, written in place "
                     "(llama::update_cache); local rings of window + chunk - 1 slots",
            "attention": ("local layers with one kv head: batched matmuls and softmax under a float mask, in XNNPACK; "
                          "the others: llama::custom_sdpa (ExecuTorch's custom_ops kernels, which the runtime must link)"),
            "tied_head": "one table per use: weight-only embedding gather, 8da LM-head linear"
            if spec.scheme.name != "fp32" else "float embedding gather and float LM-head linear",
            "gelu": "tanh form spelled out (XNNPACK's gelu op is the erf form)",
        },
        **({"grid_imported": "codes exactly; the linears' int4 scales rounded to bfloat16, as XNNPACK stores them"}
           if spec.grid is not None else {}),
    }


# -- the vision encoder (issue 8) -------------------------------------------------------------------

VISION_ARTIFACT = "vision.pte"
# 8da8w (per-channel int8) only: XNNPACK takes int4 weights in groups of a multiple of 32, per channel
# counting as one group of K, and SigLIP's MLP width 4304 is not one ("requires group_size to be a
# multiple of 32, but got 4304"). Weight-only configs lower to XNNPACK with wrong numbers (STACK.md).
VISION_SCHEMES = ("fp32", "8da8w")
VISION_DEFAULT = "8da8w"  # --vision without --quant (the decoder's default 8da4w cannot take it)
VISION_REFERENCE = {"8da8w": "dynamic int8"}  # validate's limit for it (validate.VISION_LIMITS)


def quantize_vision(vision: nn.Module, scheme: str) -> nn.Module:
    """The encoder's linears IN PLACE as int8 dynamic activations x per-channel int8 weights (the patch
    convolution and the projector's matmul stay fp32); the eager reference runs the same."""
    if scheme == "fp32":
        return vision.requires_grad_(False)
    from torchao.quantization import quantize_

    linear, _ = quant_configs(scheme)
    quantize_(vision, linear, filter_fn=lambda m, _: isinstance(m, nn.Linear))
    return vision.requires_grad_(False)


def export_vision(vision: nn.Module, folder: Path, scheme: str, log=print) -> dict:
    """Write vision.pte: `forward(pixels float32[1, 3, S, S]) -> image_embeds float32[1, tokens, text
    hidden]`, one image (or crop) per call, lowered to XNNPACK; return the manifest's `vision` fields.
    Its own program: a second method in model.pte would break the stock runner (STACK.md). Modifies
    `vision` (quantized)."""
    from ..errors import UserError

    if scheme not in VISION_SCHEMES:
        raise UserError(f"The vision encoder exports as {', '.join(VISION_SCHEMES)} on executorch, not {scheme}.")
    start = time.perf_counter()
    c = vision.config
    size, tokens = c.vision_config.image_size, c.mm_tokens_per_image
    hidden = vision.multi_modal_projector.mm_input_projection_weight.shape[1]
    quantize_vision(vision.eval(), scheme)
    with torch.no_grad():
        ep = torch.export.export(vision, (torch.zeros(1, 3, size, size),), strict=False)
    program = lower(ep)
    path = folder / VISION_ARTIFACT
    path.write_bytes(program.buffer)
    log(f"  wrote {VISION_ARTIFACT} ({path.stat().st_size / 2**20:.1f} MiB, {scheme}) in {time.perf_counter() - start:.0f} s")
    return {
        "artifact": VISION_ARTIFACT,
        "inputs": [{"name": "pixels", "shape": [1, 3, size, size], "dtype": "float32"}],
        "outputs": [{"name": "image_embeds", "shape": [1, tokens, hidden], "dtype": "float32"}],
        "scheme": scheme,
        "weight_bytes": path.stat().st_size,
        "method": "forward",
    }


def simulate_vision(vision: nn.Module, scheme: str) -> nn.Module:
    """A copy of the eager encoder + projector with vision.pte's torchao quantization (validate's reference)."""
    import copy

    return quantize_vision(copy.deepcopy(vision), scheme)
