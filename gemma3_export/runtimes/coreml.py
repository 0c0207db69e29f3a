"""Running and inspecting Core ML bundles.

- macOS: the package itself, through Core ML: `prefill` and `decode` loaded as two functions of one
  package, sharing one `make_state()` (the KV cache).
- Elsewhere (Linux CI), Core ML cannot predict. The runner then executes the fp16 eager proxy: the
  graph the package was converted from, traced again, each op in the precision Core ML computes it in
  (`numerics.GraphProxy`), with the linear and embedding weights read back from the package (norm
  gains from the source model). `runtime_note` says that the Core ML runtime was not exercised.
- `describe_package` / `check_package`: the package's structure (functions, states, inputs/outputs,
  how its weights are stored, its size) on any platform; validate and the tests check it.
"""

from __future__ import annotations

import platform
from collections import Counter
from pathlib import Path

import numpy as np
import torch

from ..bundle import Bundle
from ..errors import UserError
from ..generate import Runner

PROXY_NOTE = "fp16 eager proxy; the Core ML runtime was not exercised (Linux)"
_ARRAY_DTYPES = {65568: "float32", 65552: "float16", 131104: "int32", 131080: "int8", 65600: "float64"}
_MIL_DTYPES = {10: "float16", 11: "float32", 21: "int8", 25: "int4", 23: "int32", 31: "uint8", 35: "uint4"}
_BITS = {"float16": 16, "float32": 32, "int8": 8, "int4": 4, "int32": 32, "uint8": 8, "uint4": 4}


# -- structure ------------------------------------------------------------------------------------

def _feature(f, state: bool = False) -> dict:
    array = f.type.stateType.arrayType if state else f.type.multiArrayType
    return {"name": f.name, "shape": [int(d) for d in array.shape], "dtype": _ARRAY_DTYPES.get(array.dataType, str(array.dataType))}


def _values(op):
    """The constant values of a MIL proto op: a const's `val`, and values written inline as inputs
    (how constexpr ops hold their quantized data and scales)."""
    if "val" in op.attributes:
        yield op.attributes["val"]
    for argument in op.inputs.values():
        for binding in argument.arguments:
            if binding.WhichOneof("binding") == "value":
                yield binding.value


def describe_package(path: Path) -> dict:
    """Functions (inputs, outputs, states), the weights stored in the package and its size, as data."""
    import coremltools as ct

    path = Path(path)
    spec = ct.utils.load_spec(str(path))
    functions, blobs = {}, {}
    described = list(spec.description.functions) or [spec.description]  # one-function packages: "main"
    for f in described:
        name = getattr(f, "name", "") or "main"
        functions[name] = {
            "inputs": [_feature(x) for x in f.input],
            "outputs": [_feature(x) for x in f.output],
            "states": [_feature(x, state=True) for x in f.state],
        }
        mil = spec.mlProgram.functions[name]
        ops = mil.block_specializations[mil.opset].operations
        functions[name]["op_types"] = dict(Counter(op.type for op in ops if op.type.startswith("constexpr_")))
        offsets = set()
        for val in (v for op in ops for v in _values(op) if v.WhichOneof("value") == "blobFileValue"):
            tensor = val.type.tensorType
            elements = int(np.prod([d.constant.size for d in tensor.dimensions]))
            blobs[val.blobFileValue.offset] = (_MIL_DTYPES.get(tensor.dataType, str(tensor.dataType)), elements)
            offsets.add(val.blobFileValue.offset)
        functions[name]["weight_blobs"] = sorted(offsets)
    weights: dict[str, int] = Counter()
    for dtype, elements in blobs.values():
        weights[dtype] += elements
    files = [p for p in path.rglob("*") if p.is_file()]
    common = set.intersection(*(set(f["weight_blobs"]) for f in functions.values()))
    for f in functions.values():
        f["weight_blobs"] = len(f.pop("weight_blobs"))
    size = {offset: elements * _BITS.get(dtype, 32) for offset, (dtype, elements) in blobs.items()}
    shared = sum(size[o] for o in common) / max(sum(size.values()), 1)  # T-specific constants differ
    return {
        "default_function": spec.description.defaultFunctionName,
        "specification_version": spec.specificationVersion,
        "functions": functions,
        "weight_elements": dict(weights),  # elements stored per dtype, each blob counted once
        "shared_fraction": round(shared, 4),  # of the stored bytes, what every function uses
        "weights_shared": shared > 0.99,
        "size_bytes": sum(p.stat().st_size for p in files),
        "weight_file_bytes": sum(p.stat().st_size for p in files if p.name == "weight.bin"),
    }


def check_package(path: Path, manifest: dict, described: dict | None = None) -> list[str]:
    """What in the package differs from its manifest, in words (empty: the structure is right)."""
    d = described or describe_package(path)
    problems = []
    C, vocab = manifest["prefill_chunk"], manifest["config"]["vocab_size"]
    if set(d["functions"]) != {"prefill", "decode"}:
        problems.append(f"functions are {sorted(d['functions'])}, not prefill and decode")
    states = []
    for layer in manifest["cache"]:
        for kind in ("k", "v"):
            states.append({"name": f"model_layers_{layer['layer']}_self_attn_cache_{kind}",
                           "shape": layer["shape"], "dtype": "float16"})
    for name, T in (("prefill", C), ("decode", 1)):
        f = d["functions"].get(name)
        if f is None:
            continue
        want_in = [{"name": "tokens", "shape": [1, T], "dtype": "int32"}, {"name": "input_pos", "shape": [1], "dtype": "int32"}]
        if "vision" in manifest:
            want_in.append({"name": "image_embeds", "shape": [1, T, manifest["config"]["hidden_size"]], "dtype": "float32"})
        if f["inputs"] != want_in:
            problems.append(f"{name} inputs are {f['inputs']}, not {want_in}")
        if f["outputs"] != [{"name": "logits", "shape": [1, vocab], "dtype": "float32"}]:
            problems.append(f"{name} outputs are {f['outputs']}, not logits [1, {vocab}] float32")
        if f["states"] != states:
            problems.append(f"{name} states differ from the manifest's cache layout")
    if not d["weights_shared"]:
        problems.append("prefill and decode do not share their weight blobs")
    info = manifest.get("target_info") or {}
    compression = info.get("compression")
    if compression:
        dtypes = compression.get("dtypes") or [compression["dtype"]]  # gguf: one per GGUF form
        dtypes = [*dtypes, *(["int4"] if "table_split" in info else [])]  # --max-size: int4 rows too
        total = sum(d["weight_elements"].values())
        stored = sum(d["weight_elements"].get(t, 0) for t in dtypes)
        if stored < 0.9 * total:
            problems.append(f"only {stored} of {total} stored weight elements are {' or '.join(dtypes)}")
    return problems


# -- weights back from the package --------------------------------------------------------------

def package_program(path: Path):
    """The package's MIL program, its weights loaded (functions by name: `prefill`, `decode`, or `main`)."""
    import coremltools as ct
    from coremltools.converters.mil.frontend.milproto.load import load as milproto_load

    spec = ct.utils.load_spec(str(path))
    return milproto_load(spec, spec.specificationVersion, str(Path(path) / "Data" / "com.apple.CoreML" / "weights"))


def constexpr_value(op) -> np.ndarray:
    """A constexpr_blockwise_shift_scale op's weight as Core ML defines it (the op's own decompress, in
    the scale's dtype: fp16 scale * (data - offset)), as float32."""
    from coremltools.converters.mil.mil.ops.defs.iOS18.compression import constexpr_blockwise_shift_scale

    offset = op.offset.val if op.offset is not None else None
    return np.asarray(constexpr_blockwise_shift_scale.decompress(op.data.val, op.scale.val, offset), np.float32)


def package_weights(path: Path, function: str = "decode", prefix: str = "p_") -> dict[str, torch.Tensor]:
    """The 2-D weights of the package's `function`, decompressed, by traced parameter name
    (`p_model_layers_0_mlp_up_proj_weight`); `prefix=""`: also constants coremltools folded and renamed."""
    out = {}
    for op in package_program(path).functions[function].operations:
        if op.op_type == "constexpr_blockwise_shift_scale":
            value = constexpr_value(op)
        elif op.op_type == "const" and op.outputs[0].rank == 2 and op.name.startswith(prefix):
            value = op.val.val
        else:
            continue
        name = op.name.removesuffix("_quantized").removesuffix("_to_fp16")
        out[name] = torch.from_numpy(np.asarray(value, dtype=np.float32))
    return out


# -- runners --------------------------------------------------------------------------------------

class CoreMLRunner(Runner):
    """A Core ML bundle: `prefill` for whole chunks, `decode` for single tokens (and the rest of a chunk)."""

    runtime_note = "Core ML"

    def __init__(self, bundle: Bundle):
        super().__init__()
        self.max_context, self.chunk = bundle.manifest["max_context"], bundle.manifest["prefill_chunk"]
        vision = bundle.manifest.get("vision")
        self.image_token_id = vision["image_token_id"] if vision else None
        self.embed_width = bundle.manifest["config"]["hidden_size"] if vision else None
        d = describe_package(bundle.artifact)
        problems = check_package(bundle.artifact, bundle.manifest, d)
        if problems:
            raise UserError(f"{bundle.artifact} does not match its manifest: {problems[0]}.")
        # What validate can report about the package on any platform.
        self.structure = {"functions": sorted(d["functions"]), "states": len(d["functions"]["decode"]["states"]),
                          "weight_elements": d["weight_elements"], "shared_fraction": d["shared_fraction"],
                          "size_bytes": d["size_bytes"], "checked": "functions, inputs/outputs, states, weights"}

    @classmethod
    def from_bundle(cls, bundle: Bundle, proxy: bool | None = None) -> CoreMLRunner:
        """Core ML on macOS; the fp16 eager proxy elsewhere (or when `proxy` is True)."""
        on_mac = platform.system() == "Darwin"
        if proxy is False and not on_mac:
            raise UserError("Core ML runs only on macOS; on Linux, validate runs the bundle's fp16 eager proxy instead.")
        return ProxyRunner(bundle) if (proxy or not on_mac) else NativeRunner(bundle)

    embed_width: int | None = None  # vision bundles: both functions also take image_embeds [1, T, width]

    def _call(self, function: str, tokens: np.ndarray, pos: int, image_embeds: np.ndarray | None = None) -> np.ndarray:
        raise NotImplementedError

    def _call_with(self, function: str, tokens: np.ndarray, pos: int, image_embeds: np.ndarray | None) -> np.ndarray:
        return self._call(function, tokens, pos) if image_embeds is None else self._call(function, tokens, pos, image_embeds)

    def _step(self, tokens: np.ndarray, pos: int) -> np.ndarray:
        return self._step_images(tokens, pos, None)

    def _step_images(self, tokens: np.ndarray, pos: int, image_embeds: np.ndarray | None) -> np.ndarray:
        T = tokens.shape[1]
        if self.embed_width is not None and image_embeds is None:  # a text step of a vision bundle
            image_embeds = np.zeros((1, T, self.embed_width), np.float32)
        if T == self.chunk:
            return self._call_with("prefill", tokens, pos, image_embeds)
        if self.image_token_id is not None and (tokens == self.image_token_id).any():
            raise RuntimeError("an image block reached the decode function; chunk_plan must put it in a full chunk")
        for i in range(T):  # the package takes T = chunk or 1: the rest of a prompt goes token by token
            embeds = None if image_embeds is None else image_embeds[:, i : i + 1]
            logits = self._call_with("decode", tokens[:, i : i + 1], pos + i, embeds)
        return logits

    def chunk_plan(self, n: int, image_runs: list[tuple[int, int]] = ()) -> list[int]:
        """Sizes of the calls that prefill n tokens. Without images, the base plan. With images each
        image block must lie inside one full chunk (`prefill`, T = chunk): `decode` would see it one
        token at a time, without the block's bidirectional attention. The chunk holding a block starts
        at the block, or earlier when fewer than a chunk of tokens follow it; the tokens before it go
        in full chunks, then one at a time."""
        if not image_runs:
            return super().chunk_plan(n)
        C, sizes, pos = self.chunk, [], 0
        for a, b in image_runs:
            if b <= pos:
                continue  # inside the previous image's chunk
            start = max(pos, min(a, n - C))
            for a2, b2 in image_runs:  # end before a later block the chunk would cut
                if a2 < start + C < b2:
                    start = a2 - C
            if b - a > C or start > a or start + C < b or start + C > n:
                raise UserError(f"This prompt's images cannot each be prefilled in one full chunk of {C} tokens "
                                "(Core ML prefills T = chunk or 1); add text after the image or export a larger --chunk.")
            while pos + C <= start:
                sizes.append(C)
                pos += C
            sizes += [1] * (start - pos)
            sizes.append(C)
            pos = start + C
        sizes += super().chunk_plan(n - pos)
        return sizes


class NativeRunner(CoreMLRunner):
    """The package run by Core ML (macOS): one state shared by both functions."""

    def __init__(self, bundle: Bundle):
        import coremltools as ct

        super().__init__(bundle)
        path = str(bundle.artifact)
        self.functions = {name: ct.models.MLModel(path, function_name=name) for name in ("prefill", "decode")}
        self._reset()

    def _call(self, function: str, tokens: np.ndarray, pos: int, image_embeds: np.ndarray | None = None) -> np.ndarray:
        inputs = {"tokens": tokens.astype(np.int32), "input_pos": np.array([pos], dtype=np.int32)}
        if image_embeds is not None:
            inputs["image_embeds"] = np.ascontiguousarray(image_embeds, dtype=np.float32)
        out = self.functions[function].predict(inputs, state=self.state)
        return np.asarray(out["logits"], dtype=np.float32)[0]

    def _reset(self) -> None:
        self.state = self.functions["decode"].make_state()


class ProxyRunner(CoreMLRunner):
    """The fp16 eager proxy of the package's graph (see the module docstring)."""

    runtime_note = PROXY_NOTE

    def __init__(self, bundle: Bundle):
        from ..exporters.coreml import prepare, trace
        from ..load import load_model
        from ..numerics import GraphProxy

        super().__init__(bundle)
        info = bundle.manifest["target_info"]
        model = load_model(**bundle.manifest["source"], log=lambda *_: None).model
        if "table_split" in info:  # --max-size: the same two tables as the package
            from ..exporters.coreml import split_table
            from ..vocab_rows import int4_rows_of

            split_table(model, int4_rows_of(info["table_split"]))
        prepare(model, self.max_context)
        images = self.embed_width is not None
        if images:
            model.model.image_token_id = self.image_token_id
        programs = {"prefill": trace(model, self.chunk, images), "decode": trace(model, 1, images)}
        params = dict(programs["decode"].state_dict)
        stored = package_weights(bundle.artifact)
        tied: dict[int, list] = {}  # the embedding and the LM head are one tensor, stored once
        for spec in programs["decode"].graph_signature.input_specs:
            if spec.target in params and params[spec.target].dim() == 2:
                tied.setdefault(params[spec.target].data_ptr(), []).append(spec)
        for specs in tied.values():
            names = [s.arg.name for s in specs if s.arg.name in stored]
            if not names:
                raise UserError(f"{bundle.artifact} lacks the weight {specs[0].target}; export the bundle again.")
            for s in specs:
                params[s.target] = stored[names[0]]
        self.proxy = GraphProxy(programs, params, fp16=info["compute_precision"] == "fp16",
                                fp32_blocks=info["numerics"]["fp32_blocks"])

    def _call(self, function: str, tokens: np.ndarray, pos: int, image_embeds: np.ndarray | None = None) -> np.ndarray:
        extra = {} if image_embeds is None else {"image_embeds": torch.from_numpy(np.ascontiguousarray(image_embeds))}
        logits = self.proxy.run(function, torch.from_numpy(tokens), torch.tensor([pos]), **extra)
        return logits[0].float().numpy()

    def _reset(self) -> None:
        self.proxy.reset()


class CoreMLVisionEncoder:
    """vision.mlpackage: preprocessed pixels [N, 3, S, S] -> image embeddings [N, tokens, hidden], one
    image per call. Core ML on macOS; elsewhere the fp16 eager proxy of the package's graph with the
    weights read back from the package (as ProxyRunner does for the decoder)."""

    def __init__(self, bundle: Bundle, proxy: bool | None = None):
        self.path = bundle.path / bundle.manifest["vision"]["artifact"]
        self.native = platform.system() == "Darwin" and not proxy
        if self.native:
            import coremltools as ct

            self.model = ct.models.MLModel(str(self.path))
            self.runtime_note = "Core ML"
        else:
            self.proxy = vision_proxy(bundle)
            self.runtime_note = PROXY_NOTE

    @classmethod
    def from_bundle(cls, bundle: Bundle, proxy: bool | None = None) -> CoreMLVisionEncoder:
        bundle.vision_artifact  # refuses a bundle exported without --vision
        return cls(bundle, proxy)

    def __call__(self, pixels: np.ndarray) -> np.ndarray:
        out = []
        for p in pixels:
            x = np.ascontiguousarray(p[None], np.float32)
            if self.native:
                out.append(np.asarray(self.model.predict({"pixels": x})["image_embeds"], np.float32))
            else:
                out.append(self.proxy.run("main", pixels=torch.from_numpy(x)).numpy())
        return np.concatenate(out)


def vision_proxy(bundle: Bundle):
    """numerics.GraphProxy over the traced encoder + projector with the package's weights."""
    from ..exporters.coreml import trace_vision
    from ..load import load_vision
    from ..numerics import GraphProxy

    m, v = bundle.manifest, bundle.manifest["vision"]
    src = m["source"]
    encoder = load_vision(src["model"], m["config"]["hidden_size"], src["checkpoint"], src["random_weights"],
                          log=lambda *_: None)
    ep = trace_vision(encoder)
    params = vision_params(bundle.path / v["artifact"], ep)
    return GraphProxy({"main": ep}, params, fp16=v.get("compute_precision", "fp16") == "fp16")


def vision_params(path: Path, ep) -> dict[str, torch.Tensor]:
    """The traced encoder's parameters with every matmul weight read back from vision.mlpackage. The
    linears keep their traced names; coremltools stores the projector's [K, N] weight transposed under
    a name of its own (`transpose_0`), found as the one leftover of the transposed shape nearest to
    the source. Other parameters (the convolution, position embedding, norms) come from the source;
    the proxy rounds them to fp16 where fp16 ops read them, as the package does."""
    params = dict(ep.state_dict)
    stored = package_weights(path, "main", prefix="")
    leftovers = {k: w for k, w in stored.items() if not k.startswith("p_")}
    for spec in ep.graph_signature.input_specs:
        src = params.get(spec.target)
        if src is None or src.dim() != 2 or "position_embedding" in spec.target:
            continue
        if spec.arg.name in stored:
            params[spec.target] = stored[spec.arg.name]
            continue
        near = sorted((float((w.t() - src).abs().max()), k) for k, w in leftovers.items() if w.t().shape == src.shape)
        if not near or near[0][0] > 0.05 * float(src.abs().max()):
            raise UserError(f"{Path(path).name} lacks the weight {spec.target}; export the bundle again.")
        params[spec.target] = leftovers.pop(near[0][1]).t().contiguous()
    return params
