"""GPTQ (Frantar et al., 2022, arXiv 2210.17323): int4 rounding that keeps each matrix's outputs close.

Round to nearest rounds every weight alone. GPTQ rounds a matrix column by column and spreads each
column's rounding error over the columns not yet rounded, weighted by the inverse Hessian of the
matrix's inputs (H = X^T X over calibration text), so that X W^T moves as little as it can. The layers
are done in order, each group of matrices fed by the already-rounded ones before it ("true sequential":
q/k/v, then o, then gate/up, then down). The tied embedding / LM head is also the embedding, whose rows
are looked up, not multiplied: it is rounded to nearest.

`gemma3-export gptq` writes a checkpoint in the QAT checkpoint's format (the dequantized weights + the
grid, quantization.json), which the exporters then store exactly, as they store a QAT grid. The scale
of each block follows onnxruntime's MatMulNBits quantizer (`onnx.nbits_codes`): a plain `--quant`
export and this rounding differ only in the codes.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch
from torch import Tensor, nn

from .bundle import check_out, staged
from .errors import UserError
from .exporters.onnx import nbits_codes, nbits_scale
from .fake_quant import QuantGrid, dequantize_int4, qat_scheme, write_grid
from .quant import GPTQ_SCHEMES

# Calibration: sequences of tokens, the user's text (--data) or sampled from the float model (seed 0).
# 64 x 96: on the 270M in blocks of 128, 16 sequences agreed on 0.719 of greedy steps, 64 on 0.742
# (docs/quantization.md); sampling 64 takes about 10 minutes on 2 cores.
SEQUENCES, SEQ_LEN = 64, 96
DAMP = 0.01  # of the Hessian's mean diagonal, added to it (GPTQ's default)
# Each group of matrices that read the same input, in the order a layer computes them.
GROUPS = (("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), ("self_attn.o_proj",),
          ("mlp.gate_proj", "mlp.up_proj"), ("mlp.down_proj",))
TABLE = "model.embed_tokens.weight"
GPTQ_JSON = "gptq.json"  # the checkpoint's GPTQ summary (and what marks a folder as one)


def gptq(w: Tensor, hessian: Tensor, block: int, damp: float = DAMP, act_order: bool = False,
         rows: int = 16384) -> tuple[Tensor, Tensor]:
    """Signed int4 codes [N, K] (int8) and scales [N, K / block] of w [N, K], rounded by GPTQ for inputs
    whose second moment is `hessian` [K, K]. Columns in their order, each block's scale taken from its
    columns as they are when the rounding reaches it; or, `act_order`, the columns with the largest
    inputs first and every block's scale fixed beforehand from the unrounded weights (GPTQ's "static
    groups": the blocks stay contiguous along K, as MatMulNBits stores them). Rows are independent given
    the Hessian: done `rows` at a time."""
    n, k = w.shape
    if k % block:
        raise ValueError(f"K={k} is not a multiple of the block {block}")
    h = hessian.double().clone()
    dead = h.diagonal() == 0  # inputs that never fire: their weights do not matter
    h[dead, dead] = 1
    h += damp * h.diagonal().mean() * torch.eye(k, dtype=h.dtype)
    perm = torch.argsort(h.diagonal(), descending=True, stable=True) if act_order else torch.arange(k)
    h = h[perm][:, perm]
    hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True).float()
    group = (perm // block).tolist()  # each (permuted) column's block along K
    codes = torch.empty(n, k, dtype=torch.int8)
    scales = torch.empty(n, k // block)
    for r0 in range(0, n, rows):
        w0 = w[r0 : r0 + rows].float().clone()
        w0[:, dead] = 0
        if act_order:
            scales[r0 : r0 + rows] = nbits_scale(w0.reshape(-1, block), 4).view(len(w0), -1)
        wr = w0[:, perm]
        for b0 in range(0, k, block):  # GPTQ's lazy batches: `block` columns, then one update of the rest
            b1 = b0 + block
            if not act_order:
                scales[r0 : r0 + rows, b0 // block] = nbits_scale(wr[:, b0:b1], 4)[:, 0]
            err = torch.empty(wr.shape[0], block)
            for j in range(b0, b1):
                scale = scales[r0 : r0 + rows, group[j] : group[j] + 1]
                col = wr[:, j : j + 1]
                q = torch.round(col / torch.where(scale == 0, 1, scale)).clamp(-8, 7)
                codes[r0 : r0 + rows, perm[j]] = q[:, 0].to(torch.int8)
                e = (col - q * scale) / hinv[j, j]
                wr[:, j:b1] -= e * hinv[j, j:b1]  # the batch's later columns take the error now,
                err[:, j - b0 : j - b0 + 1] = e
            wr[:, b1:] -= err @ hinv[b0:b1, b1:]  # the rest once per batch
    return codes, scales


def round_to_nearest(w: Tensor, block: int) -> tuple[Tensor, Tensor]:
    """The same grid without GPTQ (the table), exactly as onnxruntime's quantizer rounds:
    codes [N, K] int8, scales [N, K / block]."""
    codes, scales = nbits_codes(w, 4, block)
    return codes.flatten(1).to(torch.int8), scales[..., 0]


def block_of(scheme: str, k: int) -> int:
    return qat_scheme(scheme).block_size or k


def check_shapes(model: nn.Module, scheme: str) -> None:
    """One sentence when a matrix's input width is not a whole number of the scheme's blocks."""
    for name, p in model.named_parameters():
        if p.dim() == 2 and p.shape[1] % block_of(scheme, p.shape[1]):
            raise UserError(f"{scheme} needs every matrix's input width to be a multiple of "
                            f"{block_of(scheme, p.shape[1])}; {name} has {p.shape[1]}.")


class _Reached(Exception):
    """Raised by a capture hook: the forward pass is not needed past the inputs it captured."""


def _capture(module: nn.Module, run) -> tuple:
    """The (args, kwargs) `module` is called with when `run()` runs (stopped there)."""
    def stop(mod, args, kwargs):
        raise _Reached(args, kwargs)

    hook = module.register_forward_pre_hook(stop, with_kwargs=True)
    try:
        with torch.no_grad():
            run()
    except _Reached as reached:
        return reached.args
    finally:
        hook.remove()
    raise RuntimeError(f"{type(module).__name__} was not called")


def quantize(model: nn.Module, tokens: Tensor, scheme: str, act_order: bool = False,
             log=print) -> QuantGrid:
    """Round `model`'s weights by GPTQ on `tokens` [S, T] (in place: each matrix becomes its dequantized
    grid, as a QAT checkpoint holds it) and return the grid. Layer by layer: each layer's inputs are the
    previous (rounded) layer's outputs, kept per batch of 4 sequences."""
    check_shapes(model, scheme)
    grid = QuantGrid(qat_scheme(scheme), {}, {}, {})
    layers = model.model.layers
    batches = list(torch.split(tokens, 4))
    # each batch's input to the first layer, and every layer's other arguments (positions, its rope)
    xs, calls = [], []

    def record(module, args, kwargs):
        if module is layers[0]:
            xs.append(args[0])
        calls[-1].append((args[1:], kwargs))  # (the layer's own input is kept for the first layer only)

    hooks = [layer.register_forward_pre_hook(record, with_kwargs=True) for layer in layers]
    try:
        for batch in batches:
            calls.append([])
            with torch.no_grad():
                model(batch)
    finally:
        for hook in hooks:
            hook.remove()
    start = time.perf_counter()
    for i, layer in enumerate(layers):
        for group in GROUPS:
            modules = [layer.get_submodule(name) for name in group]
            total, count = None, 0
            for x, call in zip(xs, calls):
                rest, kwargs = call[i]
                inputs = _capture(modules[0], lambda: layer(x, *rest, **kwargs))[0][0]
                inputs = inputs.reshape(-1, inputs.shape[-1]).double()
                total = inputs.T @ inputs if total is None else total + inputs.T @ inputs
                count += len(inputs)
            for name, module in zip(group, modules):
                codes, scales = gptq(module.weight.detach(), total / count, block_of(scheme, module.weight.shape[1]),
                                     act_order=act_order)
                _store(grid, f"model.layers.{i}.{name}.weight", module.weight, codes, scales)
        with torch.no_grad():  # the rounded layer's outputs: the next layer's inputs
            xs = [layer(x, *call[i][0], **call[i][1]) for x, call in zip(xs, calls)]
        log(f"  GPTQ: layer {i + 1}/{len(layers)} ({time.perf_counter() - start:.0f} s)")
    table = model.model.embed_tokens.weight
    _store(grid, TABLE, table, *round_to_nearest(table.detach(), block_of(scheme, table.shape[1])))
    return grid


def _store(grid, name: str, param: Tensor, codes: Tensor, scales: Tensor) -> None:
    grid.codes[name], grid.scales[name] = codes, scales
    grid.zero_points[name] = torch.zeros_like(scales, dtype=torch.int8)
    with torch.no_grad():
        param.copy_(dequantize_int4(codes, scales))


def calibration_tokens(loaded, data: list[str] | None, cache_dir: Path, log=print,
                       samples: int = SEQUENCES) -> tuple[Tensor, str]:
    """[S, SEQ_LEN] tokens: the user's text packed into windows (the first 4 x `samples`), or `samples`
    sequences sampled from the float model; and what they are, in words."""
    from .qat_data import read_texts, self_generated, text_data

    if data:
        tokens, _ = text_data(data, loaded.tokenizer, SEQ_LEN, read_texts(data))
        if len(tokens) == 0:
            raise UserError(f"The text in {', '.join(data)} is shorter than {SEQ_LEN} tokens; give more text.")
        tokens = tokens[: 4 * samples]
        return tokens, f"{tokens.numel()} tokens of {', '.join(data)}"
    tokens, _ = self_generated(loaded.model, loaded.tokenizer, samples, SEQ_LEN, 0, cache_dir,
                               f"gptq: {loaded.source}", log=log)
    return tokens, f"{tokens.numel()} tokens sampled from the float model (seed 0)"


def gptq_checkpoint(model: str, scheme: str, out: str | Path, checkpoint: str | None = None,
                    random_weights: bool = False, data: list[str] | None = None, samples: int = SEQUENCES,
                    act_order: bool = False, log=print) -> Path:
    """`gemma3-export gptq`: a checkpoint folder holding the model rounded by GPTQ to `scheme`, in the
    QAT checkpoint's format (exporters read it with --checkpoint and store its grid exactly). Calibration:
    `data` (at most 4 x `samples` windows of SEQ_LEN tokens) or `samples` sequences sampled from the model."""
    from .load import load_model
    from .qat_data import read_texts
    from .weights import save_hf_folder

    if scheme not in GPTQ_SCHEMES:
        raise UserError(f"GPTQ rounds to {', '.join(GPTQ_SCHEMES)}, not {scheme}.")
    if samples < 1:
        raise UserError(f"--samples is a number of calibration sequences, at least 1 (got {samples}).")
    if data:
        read_texts(data)  # bad data stops us before the model loads
    out = check_out(Path(out), GPTQ_JSON, "a GPTQ checkpoint")  # before minutes of work, not after
    loaded = load_model(model, checkpoint=checkpoint, random_weights=random_weights, log=log)
    if loaded.grid is not None:
        raise UserError("This checkpoint already holds a quantization grid (QAT or GPTQ); give its float model.")
    check_shapes(loaded.model, scheme)
    tokens, how = calibration_tokens(loaded, data, out.parent / "calibration", log, samples)
    log(f"GPTQ to {scheme}{', columns in activation order' if act_order else ''} on {how}")
    start = time.perf_counter()
    grid = quantize(loaded.model, tokens, scheme, act_order=act_order, log=log)
    seconds = time.perf_counter() - start
    with staged(out, GPTQ_JSON, "a GPTQ checkpoint") as tmp:
        save_hf_folder(loaded.model, tmp)
        config = loaded.model.config
        (tmp / "config.json").write_text(json.dumps({**config.to_hf(), "embed_scale_dtype": config.embed_scale_dtype}, indent=2))
        loaded.tokenizer.save(tmp / "tokenizer.model")
        summary = {"method": "GPTQ", "scheme": scheme, "calibration": how, "damp": DAMP, "act_order": act_order,
                   "seconds": round(seconds, 1),
                   "source": {"model": model, "checkpoint": checkpoint, "random_weights": random_weights},
                   "table": "round to nearest (it is also the embedding)"}
        (tmp / GPTQ_JSON).write_text(json.dumps(summary, indent=2))
        write_grid(grid, tmp, extra={"weights_file": "model.safetensors holds exactly these values, dequantized",
                                     "rounding": f"GPTQ ({GPTQ_JSON})"})
    log(f"wrote {out} ({seconds:.0f} s of GPTQ); export it with --checkpoint {out}")
    return out

