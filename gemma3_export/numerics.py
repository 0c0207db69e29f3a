"""fp16 safety for Core ML: which ops of a traced Gemma 3 graph run in fp32, an eager proxy that runs the
graph exactly that way, and the overflow check that decides it from real text.

Core ML's GPU and Neural Engine compute in fp16 (largest value 65504), and Gemma 3's residual stream
passes that (GEMMA3.md). The Core ML exporter converts the fp32 traced graph and tells coremltools, op
by op, what to compute in fp16 (`op_selector`):
- always fp32 ("islands"): every RMSNorm, the residual sums, the embedding scale and RoPE (positions
  past 2048 are not integers in fp16);
- fp16: attention and MLP blocks, the embedding lookup and the LM head, unless the check finds that a
  block overflows on real text; that block is then kept in fp32 too;
- the KV cache is a Core ML state, which is fp16 only: a cache value that overflows is an error.

The decision is written on the traced graph itself (each node's `debug_handle`, which coremltools
carries into every MIL op's scope), so the converter and `GraphProxy` read the same plan.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch
from torch import Tensor
from torch.export import ExportedProgram
from torch.export.graph_signature import InputKind, OutputKind
from torch.utils._pytree import tree_map

from .errors import UserError

FP16_MAX = 65504.0
HEADROOM = 4.0  # a block whose activations reach FP16_MAX / HEADROOM on the check text runs in fp32
FP32_TAG, FP16_TAG = 32, 16  # debug_handle values
# Modules whose own ops stay fp32: the norms, the residual sums (the decoder layer's own ops), the
# embedding scale (the text model's), RoPE and the last-token slice.
_FP32_TYPES = ("RMSNorm", "DecoderLayer", "Gemma3TextModel", "RotaryEmbedding", "Gemma3ForCausalLM")
# Ops that only carry the attention mask's fill value: not activations, never recorded.
_MASK_OPS = {torch.ops.aten.full_like.default, torch.ops.aten.full.default, torch.ops.aten.where.self,
             torch.ops.aten.scalar_tensor.default}
_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)(?:\.|$)")


def _module(node: torch.fx.Node) -> tuple[str, str]:
    """(path, class name) of the innermost module a traced node belongs to; ("", "") at the top."""
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return "", ""
    path, kind = list(stack.values())[-1]
    name = kind if isinstance(kind, str) else kind.__qualname__
    return path, name.rsplit(".", 1)[-1]


def block_of(path: str) -> str | None:
    """The block a module path belongs to: `model.layers.3.mlp`, `...self_attn`, `lm_head`, or None."""
    m = _LAYER.search(path)
    for part in ("self_attn", "mlp"):
        if m and f".{part}" in path:
            return f"model.layers.{m.group(1)}.{part}"
    return "lm_head" if path.startswith("lm_head") else None


def runs_fp32(node: torch.fx.Node, fp32_blocks: Iterable[str] = ()) -> bool:
    path, kind = _module(node)
    return kind in _FP32_TYPES or kind == "" or block_of(path) in set(fp32_blocks)


def tag_precision(ep: ExportedProgram, fp32_blocks: Iterable[str] = ()) -> None:
    """Mark every node of `ep` FP32_TAG or FP16_TAG (its debug_handle) for `op_selector`."""
    blocks = set(fp32_blocks)
    for node in ep.graph.nodes:
        if node.op == "call_function":
            node.meta["debug_handle"] = FP32_TAG if runs_fp32(node, blocks) else FP16_TAG


def op_selector(op) -> bool:
    """coremltools' FP16ComputePrecision selector: True for MIL ops traced from fp16-tagged nodes."""
    from coremltools.converters.mil.mil.scope import ScopeSource

    handles = [h for h in op.scopes.get(ScopeSource.EXIR_DEBUG_HANDLE, []) if h is not None]
    return bool(handles) and all(h == FP16_TAG for h in handles)


def _part(path: str, kind: str) -> tuple[int | None, str] | None:
    """(layer, part) a node's activations are reported under (the KV cache: see GraphProxy.run)."""
    m = _LAYER.search(path)
    layer = int(m.group(1)) if m else None
    if kind in ("", "Gemma3ForCausalLM"):
        return None  # the last-token slice of the final norm's output: nothing new
    if kind == "RMSNorm":
        return layer, "norm" if layer is not None else "final_norm"
    if kind == "DecoderLayer":
        return layer, "residual"
    block = block_of(path)
    if block:
        return layer, block.rsplit(".", 1)[-1].replace("self_attn", "attention").replace("lm_head", "logits")
    return layer, "rope" if kind == "RotaryEmbedding" else "embedding"


class GraphProxy:
    """Runs exported programs eagerly, each op in the dtype Core ML computes it in, over shared state.

    `programs` (e.g. prefill and decode) must lift the same parameters and buffers; `params` maps their
    names to tensors (defaults to the programs' own). An fp16 op reads fp16 values and writes an fp16
    result (overflow gives inf), with fp32 arithmetic in between, as torch's CPU fp16 kernels do but
    at fp32 speed. With `fp16=False` every op runs in fp32 (Core ML's fp32 compute precision); the
    state stays fp16 either way. `record=True` keeps the largest absolute activation per (layer, part)
    in `maxima`: every op inside the attention and MLP blocks, and what the fp32 modules hand on.
    """

    def __init__(self, programs: dict[str, ExportedProgram], params: dict[str, Tensor] | None = None,
                 fp16: bool = True, fp32_blocks: Iterable[str] = (), record: bool = False,
                 round_weights: bool = True):
        self.programs, self.fp16, self.fp32_blocks, self.record = programs, fp16, set(fp32_blocks), record
        first = next(iter(programs.values()))
        self.params = dict(params if params is not None else first.state_dict)
        mutated = set(first.graph_signature.buffers_to_mutate.values())  # the KV cache
        self.state = {name: torch.zeros_like(_lifted(first, name), dtype=torch.float16) for name in mutated}
        self.maxima: dict[tuple[int | None, str], float] = {}
        self._plans = {name: self._plan(ep) for name, ep in programs.items()}
        # Weights only fp16 ops read are rounded to fp16 once (kept as fp32 for fast matmuls); without
        # `round_weights` (no second copy of the weights) every call rounds them again.
        self._rounded: set[int] = set()
        if round_weights:
            self._round_weights()

    def _round_weights(self) -> None:
        readers: dict[str, set] = {}
        for name, ep in self.programs.items():
            placeholders = {n.name: n for n in ep.graph.nodes if n.op == "placeholder"}
            for spec in ep.graph_signature.input_specs:
                if spec.kind == InputKind.PARAMETER:
                    dtypes = {self._plans[name]["dtypes"].get(u) for u in placeholders[spec.arg.name].users}
                    readers.setdefault(spec.target, set()).update(dtypes)
        done: dict[int, Tensor] = {}  # the tied embedding / LM head once
        for name, kinds in readers.items():
            if kinds == {torch.float16}:
                source = self.params[name]
                if id(source) not in done:
                    done[id(source)] = source.to(torch.float16).float()
                    self._rounded.add(id(done[id(source)]))
                self.params[name] = done[id(source)]

    def _plan(self, ep: ExportedProgram) -> dict:
        boundary = {}
        dtypes = {}
        for node in ep.graph.nodes:
            if node.op != "call_function":
                continue
            fp32 = runs_fp32(node, self.fp32_blocks) or not self.fp16
            dtypes[node] = torch.float32 if fp32 else torch.float16
            path, kind = _module(node)
            leaves = any(_module(u) != (path, kind) for u in node.users) or not node.users
            # Inside blocks that may run fp16 every op counts; elsewhere what a module hands on.
            if node.target not in _MASK_OPS and (not runs_fp32(node) or leaves):
                boundary[node] = _part(path, kind)
        return {"dtypes": dtypes, "record": boundary}

    def reset(self) -> None:
        for buf in self.state.values():
            buf.zero_()

    @torch.no_grad()
    def run(self, name: str, tokens: Tensor | None = None, input_pos: Tensor | None = None, **inputs: Tensor) -> Tensor:
        """One call of program `name`; returns its user output (the logits) and updates the state.
        Other user inputs by name (`image_embeds` of a vision decoder: zeros when not given; `pixels`)."""
        ep = self.programs[name]
        given = {"tokens": tokens, "input_pos": input_pos, **inputs}
        args = []
        for spec in ep.graph_signature.input_specs:
            if spec.kind == InputKind.USER_INPUT:
                value = given.get(spec.arg.name)
                if value is None and spec.arg.name == "image_embeds":  # a text-only step
                    width = next(n for n in ep.graph.nodes if n.name == spec.arg.name).meta["val"].shape[-1]
                    value = torch.zeros(1, tokens.shape[1], width)
                args.append(value)
            elif spec.kind == InputKind.BUFFER and spec.target in self.state:
                args.append(self.state[spec.target])
            elif spec.kind == InputKind.BUFFER:
                args.append(_lifted(ep, spec.target))  # RoPE frequencies
            elif spec.kind == InputKind.PARAMETER:
                args.append(self.params[spec.target])
            else:
                args.append(ep.constants[spec.target])
        outs = _Interpreter(ep.graph_module, self._plans[name], self.maxima if self.record else None,
                            self._rounded).run(*args)
        user = []
        for spec, out in zip(ep.graph_signature.output_specs, outs):
            if spec.kind == OutputKind.BUFFER_MUTATION:
                if self.record:  # what the cache must hold, before the cast to the fp16 state
                    key = (int(_LAYER.search(spec.target).group(1)), "kv")
                    self.maxima[key] = max(self.maxima.get(key, 0.0), _absmax(out))
                self.state[spec.target] = out.to(torch.float16)  # a Core ML state is fp16
            else:
                user.append(out)
        return user[0].float()


def _lifted(ep: ExportedProgram, name: str) -> Tensor:
    """A lifted parameter or buffer (non-persistent buffers live in `constants`)."""
    return ep.state_dict[name] if name in ep.state_dict else ep.constants[name]


class _Interpreter(torch.fx.Interpreter):
    def __init__(self, gm, plan: dict, maxima: dict | None, rounded: set[int]):
        super().__init__(gm)
        self.plan, self.maxima, self.rounded = plan, maxima, rounded

    def _input(self, x, fp16: bool):
        """An fp32 tensor holding what the op reads: fp16-rounded for an fp16 op."""
        if not (isinstance(x, Tensor) and x.is_floating_point()):
            return x
        if fp16 and x.dtype == torch.float32 and id(x) not in self.rounded:
            return x.to(torch.float16).float()
        return x.float()

    def run_node(self, n: torch.fx.Node):
        if n.op != "call_function":
            return super().run_node(n)
        if "_assert" in str(n.target):  # dtype asserts of the fp32 trace; the dtypes change here
            return None
        args, kwargs = self.fetch_args_kwargs_from_env(n)
        fp16 = self.plan["dtypes"][n] == torch.float16
        if n.target is not torch.ops.aten._to_copy.default:  # explicit casts run as written
            args, kwargs = tree_map(lambda x: self._input(x, fp16), (args, kwargs))
        out = n.target(*args, **kwargs)
        if fp16:  # the result is stored in fp16: past 65504 it is inf
            out = tree_map(lambda x: x.to(torch.float16) if isinstance(x, Tensor) and x.is_floating_point() else x, out)
        key = self.plan["record"].get(n)
        if self.maxima is not None and key and isinstance(out, Tensor) and out.is_floating_point() and out.numel():
            self.maxima[key] = max(self.maxima.get(key, 0.0), _absmax(out))
        return out


def _absmax(x: Tensor) -> float:
    value = float(x.detach().abs().max().float())
    return value if value == value else float("inf")  # NaN counts as an overflow


@dataclass
class NumericsReport:
    """Largest activations per layer on the check text, and the blocks that had to stay fp32."""

    compute: str
    tokens: int
    layers: list[dict]
    other: dict[str, float]
    fp32_blocks: list[str] = field(default_factory=list)

    def as_dict(self) -> dict:
        return {
            "compute": self.compute,
            "limit": FP16_MAX,
            "headroom": HEADROOM,
            "tokens": self.tokens,
            "always_fp32": "RMSNorms, residual sums, embedding scale, RoPE",
            "fp32_blocks": self.fp32_blocks,
            "layers": self.layers,
            "other": self.other,
        }


def _report(maxima: dict, n_layers: int, compute: str, tokens: int, fp32_blocks: list[str]) -> NumericsReport:
    parts = ("residual", "norm", "attention", "mlp", "kv")
    layers = [{"layer": i, **{p: _round(maxima.get((i, p), 0.0)) for p in parts}} for i in range(n_layers)]
    other = {f"{p}": _round(v) for (layer, p), v in sorted(maxima.items(), key=str) if layer is None}
    return NumericsReport(compute, tokens, layers, other, sorted(fp32_blocks))


def _round(x: float) -> float:
    return float(f"{x:.4g}")


def check_fp16(make_proxy: Callable[[set[str]], GraphProxy], ids: list[int], chunk: int, n_layers: int,
               fp16: bool = True, log=print) -> NumericsReport:
    """Run the graph as Core ML would over `ids` (whole prefill chunks) and record its activations.

    A fp16 block whose activations reach FP16_MAX / HEADROOM is moved into fp32 and the text is run
    again; a KV cache value that does (the state is fp16 either way) is a UserError.
    """
    blocks: set[str] = set()
    n = len(ids) - len(ids) % chunk
    if n == 0:
        raise UserError(f"The numerics check needs at least one prefill chunk of {chunk} tokens of text.")
    tokens = torch.tensor([ids[:n]], dtype=torch.int64)
    for _ in range(4):
        proxy = make_proxy(blocks)
        proxy.record = True
        for start in range(0, n, chunk):
            proxy.run("prefill", tokens[:, start:start + chunk], torch.tensor([start]))
        report = _report(proxy.maxima, n_layers, "fp16" if fp16 else "fp32", n, sorted(blocks))
        over_kv = sorted((k[0], v) for k, v in proxy.maxima.items() if k[1] == "kv" and v >= FP16_MAX / HEADROOM)
        if over_kv:  # the first layer that overflows; later ones follow from it
            layer, value = over_kv[0]
            raise UserError(
                f"Layer {layer}'s key/value cache reaches {value:.3g} on the check text, too close to "
                f"float16's {FP16_MAX:.0f} (Core ML states are float16 only), so this model cannot be "
                "exported to Core ML safely."
            )
        over = {block_of(_name(k)) for k, v in proxy.maxima.items()
                if fp16 and k[1] in ("attention", "mlp", "logits") and v >= FP16_MAX / HEADROOM}
        if not over - blocks:
            return report
        log(f"  fp16 check: {', '.join(sorted(over - blocks))} reach {FP16_MAX / HEADROOM:.0f}; keeping them in fp32")
        blocks |= over
    raise UserError("The fp16 numerics check did not settle after moving blocks to fp32; export with --quant fp32.")


def _name(key: tuple[int | None, str]) -> str:
    layer, part = key
    if part == "logits":
        return "lm_head"
    return f"model.layers.{layer}.{'self_attn' if part == 'attention' else part}"
