"""Core ML export (tiny preset): the package's structure per scheme, the fp16 numerics check, and the
fp16 eager proxy of the converted graph against the fp32 eager model. Core ML itself cannot predict on
Linux, so the numbers here come from the proxy (runtimes/coreml.py says how it is built)."""

import json
from importlib import resources

import numpy as np
import pytest
import torch

from conftest import tiny_model
from gemma3_export.errors import UserError

pytestmark = pytest.mark.filterwarnings("ignore")  # coremltools renames states and warns about torch versions
CONTEXT, CHUNK, WINDOW = 32, 4, 8
LOCAL = [0, 1, 3, 4]  # tiny: layers 2 and 5 are global
# fp16 proxy vs fp32 eager, logits up to ~60 on the tiny model: measured max 0.035, mean 0.0034.
PROXY_MAX_ABS, PROXY_MEAN_ABS = 0.15, 0.01


def quiet(*_):
    pass


@pytest.fixture(scope="module")
def fp16_bundle(tmp_path_factory):
    """The product path: pipeline.export (trace, fp16 check, convert, package, validate)."""
    from gemma3_export.pipeline import export

    out = export(model="tiny", target="coreml", quant="fp16", context=CONTEXT, chunk=CHUNK,
                 out=tmp_path_factory.mktemp("coreml") / "fp16", validate=True, log=quiet)
    return out, json.loads((out / "manifest.json").read_text())


@pytest.fixture(scope="module")
def functions(tmp_path_factory):
    """prefill and decode of the tiny model traced and converted once in fp16 (one-function packages)."""
    from gemma3_export.exporters import coreml as X

    folder = tmp_path_factory.mktemp("functions")
    model = X.prepare(tiny_model(), CONTEXT)
    programs, paths = {}, {}
    for name, T in (("prefill", CHUNK), ("decode", 1)):
        programs[name], paths[name] = X.trace(model, T), folder / f"{name}.mlpackage"
        X.convert(programs[name], T, fp16=True, fp32_blocks=[]).save(str(paths[name]))
    return programs, paths


def weight_elements() -> int:
    """Elements of the tiny model's 2-D weights, the tied embedding counted once."""
    return sum(p.numel() for p in tiny_model().parameters() if p.dim() == 2)


def load(path):
    import coremltools as ct

    return ct.models.MLModel(str(path), skip_model_load=True)


@pytest.mark.parametrize("scheme, dtype", [("int8", "int8"), ("int8b32", "int8"), ("int4", "int4"), ("int4b32", "int4"),
                                           ("int4b32-asym", "int4")])
def test_int_schemes_compress_every_weight(functions, tmp_path, scheme, dtype):
    from gemma3_export.exporters.coreml import save_function
    from gemma3_export.runtimes.coreml import describe_package

    save_function(load(functions[1]["decode"]), scheme, tmp_path / "decode.mlpackage")
    d = describe_package(tmp_path / "decode.mlpackage")
    n = weight_elements()
    table = tiny_model().model.embed_tokens.weight.numel()
    offsets = (n - table) // 32 if scheme == "int4b32-asym" else 0  # an int4 zero point per block of the layers
    assert d["weight_elements"][dtype] == n + offsets  # every linear and the tied embedding, once
    assert d["functions"]["main"]["op_types"] == {"constexpr_blockwise_shift_scale": 43}  # 7 x 6 + embedding
    assert d["weight_elements"].get("float16", 0) < n / 16  # only the scales and small tensors stay fp16
    scales = n // (32 if scheme.endswith("b32") else 64) * 2
    assert d["weight_file_bytes"] < 1.15 * (n * int(dtype[3:]) / 8 + scales) + 16_384


def test_int4b32_asym_package_holds_the_simulated_grid(functions, tmp_path):
    """Layers with an int4 zero point per block of 32, the tied table symmetric: exactly `simulate`'s weights."""
    from gemma3_export.exporters.coreml import save_function, simulate
    from gemma3_export.runtimes.coreml import package_program, package_weights

    path = save_function(load(functions[1]["decode"]), "int4b32-asym", tmp_path / "decode.mlpackage")
    prog = package_program(path)
    offsets = {op.name: op.offset is not None for op in prog.functions["main"].operations
               if op.op_type == "constexpr_blockwise_shift_scale"}
    table = [name for name in offsets if "lm_head" in name]
    assert len(table) == 1 and not offsets[table[0]] and sum(offsets.values()) == 42  # 7 x 6 layers' weights
    stored = package_weights(path, function="main")
    sim = dict(simulate(tiny_model(), "int4b32-asym").named_parameters())
    weights = {n: w for n, w in stored.items() if "_quantized_" not in n}  # not the codes/scales consts
    assert len(weights) == 43
    for name, w in weights.items():
        assert torch.equal(w, sim[hf_name(name)].float()), name


def hf_name(const: str) -> str:
    """A package weight's parameter name: p_model_layers_0_mlp_up_proj_weight -> model.layers.0.mlp.up_proj.weight
    (the tied table is the head's const, p_lm_head_weight)."""
    const = const.removesuffix("_quantized").removesuffix("_to_fp16")
    if const == "p_lm_head_weight":
        return "model.embed_tokens.weight"
    key = const.removeprefix("p_").replace("_proj_weight", "_proj.weight")
    return key.replace("model_layers_", "model.layers.").replace("_self_attn_", ".self_attn.").replace("_mlp_", ".mlp.")


def test_multifunction_package_stores_the_weights_once(functions, tmp_path):
    from gemma3_export.exporters.coreml import save_function, save_package
    from gemma3_export.runtimes.coreml import describe_package

    paths = {name: save_function(load(p), "int4b32", tmp_path / f"{name}.mlpackage") for name, p in functions[1].items()}
    single = describe_package(paths["decode"])["weight_file_bytes"]
    save_package(paths, tmp_path / "model.mlpackage")
    d = describe_package(tmp_path / "model.mlpackage")
    assert set(d["functions"]) == {"prefill", "decode"} and d["default_function"] == "decode"
    assert d["weights_shared"] and d["weight_elements"]["int4"] == weight_elements()
    assert d["weight_file_bytes"] < 1.1 * single  # both functions, about one function's weights


def test_package_structure_matches_manifest(fp16_bundle):
    from gemma3_export.runtimes.coreml import check_package, describe_package

    from gemma3_export.contract import check_manifest

    out, m = fp16_bundle
    check_manifest(m)  # the schema the mobile apps read
    assert check_package(out / m["artifact"], m) == []
    d = describe_package(out / m["artifact"])
    for name, T in (("prefill", CHUNK), ("decode", 1)):
        f = d["functions"][name]
        assert [i["shape"] for i in f["inputs"]] == [[1, T], [1]]
        assert f["outputs"] == [{"name": "logits", "shape": [1, 512], "dtype": "float32"}]
        states = {s["name"]: s for s in f["states"]}
        assert len(states) == 12  # one k and one v per layer
        for layer in range(6):
            slots = WINDOW if layer in LOCAL else CONTEXT  # local layers keep only their ring
            for kind in "kv":
                s = states[f"model_layers_{layer}_self_attn_cache_{kind}"]
                assert s["shape"] == [1, 2, slots, 32] and s["dtype"] == "float16"
    n = weight_elements()
    assert d["weights_shared"] and n <= d["weight_elements"]["float16"] < 1.01 * n  # fp16, stored once
    assert d["weight_file_bytes"] < 1.1 * 2 * n + 16_384
    assert m["prefill_chunks"] == [CHUNK, 1] and m["cache_dtype"] == "float16"
    assert m["target_info"]["minimum_deployment_target"] == "iOS18"


def test_fp16_proxy_matches_fp32_eager_across_windows(fp16_bundle):
    from gemma3_export.runtimes.coreml import PROXY_NOTE

    _, m = fp16_bundle
    v = m["validation"]
    assert v["passed"] and v["runtime"] == PROXY_NOTE  # says Core ML itself was not run
    vs_float = v["vs_float"]  # fp16 proxy vs the fp32 eager model
    assert len(vs_float["bands"]) >= 3 and v["positions"] >= 3 * WINDOW
    assert vs_float["max_abs"] < PROXY_MAX_ABS and vs_float["mean_abs"] < PROXY_MEAN_ABS
    assert vs_float["top1"] == 1.0


def test_numerics_report_in_manifest(fp16_bundle):
    _, m = fp16_bundle
    n = m["target_info"]["numerics"]
    assert n["compute"] == "fp16" and n["fp32_blocks"] == [] and len(n["layers"]) == 6
    for row in n["layers"]:
        assert 0 < row["kv"] < 65504 / 4 and 0 < row["attention"] < 65504 / 4 and row["residual"] > 0


def check_with(functions, **changes):
    """The fp16 check on the traced tiny prefill with some weights replaced (no new trace)."""
    from gemma3_export.numerics import GraphProxy, check_fp16

    programs = {"prefill": functions[0]["prefill"]}
    params = {**programs["prefill"].state_dict, **changes}
    return check_fp16(lambda blocks: GraphProxy(programs, params, fp32_blocks=blocks), list(range(2, 2 + 2 * CHUNK)),
                      CHUNK, 6, log=quiet)


def test_numerics_check_fails_on_huge_norm_gain(functions):
    gain = torch.full((64,), 1e5)  # layer 1's attention input passes fp16, and so do its values
    with pytest.raises(UserError) as e:
        check_with(functions, **{"model.layers.1.input_layernorm.weight": gain})
    message = str(e.value)
    assert message.startswith("Layer 1's key/value cache reaches") and message.count(". ") == 0
    assert check_with(functions).fp32_blocks == []  # the same graph with normal weights passes


def test_fp16_block_overflow_moves_that_block_to_fp32(functions):
    """An MLP whose activations pass fp16 is kept in fp32; the rest stays fp16."""
    name = "model.layers.3.mlp.up_proj.weight"
    report = check_with(functions, **{name: functions[0]["prefill"].state_dict[name] * 1e5})
    assert report.fp32_blocks == ["model.layers.3.mlp"]
    assert report.layers[3]["mlp"] > 65504 / 4 and report.layers[2]["mlp"] < 100


def test_fp32_compute_converts_without_fp16_ops(functions):
    from gemma3_export.exporters import coreml as X

    mlmodel = X.convert(functions[0]["decode"], 1, fp16=False, fp32_blocks=[])
    ops = mlmodel._mil_program.functions["main"].operations
    linears = [op for op in ops if op.op_type == "linear"]
    assert len(linears) == 43 and all(op.outputs[0].dtype.__name__ == "fp32" for op in linears)
    states = [op for op in ops if op.op_type == "coreml_update_state"]
    assert len(states) == 12 and all(op.outputs[0].dtype.__name__ == "fp16" for op in states)


def test_fp16_program_keeps_norms_and_residuals_in_fp32(functions):
    from gemma3_export.exporters.coreml import _program

    ops = _program(load(functions[1]["decode"])).functions["main"].operations

    def dtypes_of(selected):
        return {op.outputs[0].dtype.__name__ for op in selected}

    def dtypes(op_type):
        return dtypes_of(op for op in ops if op.op_type == op_type)

    assert dtypes("rsqrt") == {"fp32"} and dtypes("reduce_mean") == {"fp32"}  # every RMSNorm
    assert dtypes("linear") == {"fp16"} and dtypes("softmax") == {"fp16"}  # the blocks
    hidden = [op for op in ops if op.op_type == "add" and tuple(op.outputs[0].shape) == (1, 1, 64)]
    assert len(hidden) == 12 and dtypes_of(hidden) == {"fp32"}  # the two residual sums of each layer


def test_simulate_puts_weights_on_the_package_grid():
    from gemma3_export.exporters.coreml import simulate

    model = tiny_model()
    sim = simulate(model, "int4b32")
    w = sim.model.layers[0].mlp.down_proj.weight  # [64, 128]: blocks of 32 along the input
    for block in w.reshape(64, 4, 32).unbind(1):
        levels = block / block.abs().amax(-1, keepdim=True) * 7  # symmetric int4: max |w| is level 7
        assert torch.allclose(levels, levels.round(), atol=2e-2)
    assert sim.lm_head.weight is sim.model.embed_tokens.weight  # still tied


def test_bad_requests_are_one_sentence(monkeypatch):
    import platform

    from gemma3_export.exporters.coreml import convert
    from gemma3_export.quant import check_scheme
    from gemma3_export.runtimes.coreml import CoreMLRunner

    with pytest.raises(UserError, match=r"^The KV cache is Core ML state, which needs iOS 18 or later; iOS17"):
        convert(None, 1, True, [], target="iOS17")
    with pytest.raises(UserError, match="^The coreml target does not take fp8 .Core ML has no fp8"):
        check_scheme("coreml", "fp8")
    monkeypatch.setattr(platform, "system", lambda: "Linux")
    with pytest.raises(UserError, match="^Core ML runs only on macOS"):
        CoreMLRunner.from_bundle(None, proxy=False)



# -- --max-size: the least used table rows at int4 (exporters/coreml.py::split_table) -------------------


@pytest.fixture(scope="module")
def split_bundle(tmp_path_factory):
    """A tiny GGUF with a 4096-row table of width 256 (so rows, not the program, dominate its size),
    exported to int8b32 with --max-size 200 kB under the unsplit package's estimate."""
    from gemma3_export.exporters.coreml import package_bytes
    from gemma3_export.pipeline import export
    from gemma3_export.tokenizer import tiny_tokenizer
    from gemma3_export.weights import save_gguf

    tmp = tmp_path_factory.mktemp("coreml-split")
    model = tiny_model(vocab_size=4096, hidden_size=256, intermediate_size=256, head_dim=64, query_pre_attn_scalar=64)
    gguf = tmp / "tiny-4096.gguf"
    save_gguf(model, gguf, tokenizer_model=tiny_tokenizer(4096).model_proto)
    text = tmp / "text.txt"
    text.write_text("The cat sat on the mat. A dog ran to the park and back again. " * 20)
    budget = package_bytes(model, "int8b32") - 200_000
    bundle = export(model="tiny", target="coreml", quant="int8b32", checkpoint=str(gguf), context=64, chunk=8,
                    out=tmp / "b", max_size=f"{budget}B", data=[str(text)], log=quiet)
    return bundle, model, budget, text


def test_max_size_splits_the_table_in_the_package(split_bundle):
    from gemma3_export.exporters.coreml import PACKAGE_BYTES, PACKAGE_BYTES_PER_LAYER, package_bytes
    from gemma3_export.load import load_model
    from gemma3_export.runtimes.coreml import describe_package
    from gemma3_export.vocab_rows import importance, int4_rows_of, row_order

    bundle, model, budget, text = split_bundle
    m = json.loads((bundle / "manifest.json").read_text())
    split = m["target_info"]["table_split"]
    rows = int4_rows_of(split)
    n4 = len(rows)
    # the fewest rows that fit by the estimate, and the package within the estimate's slack under the budget
    assert package_bytes(model, "int8b32", n4) <= budget < package_bytes(model, "int8b32", n4 - 1)
    size = describe_package(bundle / "model.mlpackage")["size_bytes"]
    slack = model.config.num_hidden_layers * PACKAGE_BYTES_PER_LAYER + PACKAGE_BYTES
    assert budget - slack <= size <= budget
    # the least used rows on the given text, by the documented ranking
    loaded = load_model("tiny", checkpoint=str(bundle.parent / "tiny-4096.gguf"), log=quiet)
    ids = loaded.tokenizer.encode(text.read_text(), bos=True)
    order = row_order(loaded.tokenizer, importance(loaded.model, [ids[i:i + 96] for i in range(0, len(ids), 96)]))
    assert set(rows.tolist()) == set(order[4096 - n4:].tolist()) and not set(rows.tolist()) & set(ids)
    # the package: the int4 rows as int4 blocks of 32, the rest int8 blocks of 32
    d = describe_package(bundle / "model.mlpackage")
    table_and_linears = sum(p.numel() for p in model.parameters() if p.dim() == 2)  # the tied table once
    assert d["weight_elements"]["int4"] == n4 * 256
    assert d["weight_elements"]["int8"] == table_and_linears - n4 * 256
    assert "least used of the table's 4096 rows at int4" in m["target_info"]["compression"]["weights"]


def test_a_split_package_runs_as_its_simulation(split_bundle):
    """The proxy (the traced split graph with the package's weights) against validate's reference,
    which rounds the same rows; a manifest without the split no longer describes the package."""
    import shutil

    from gemma3_export.validate import validate_bundle

    bundle, *_ = split_bundle
    summary = json.loads((bundle / "manifest.json").read_text())["validation"]
    assert summary["passed"] and summary["reference"].startswith("eager int8b32"), summary
    ref = summary["vs_reference"]
    unsplit_manifest = json.loads((bundle / "manifest.json").read_text())
    unsplit_manifest["target_info"].pop("table_split")
    unsplit = bundle.parent / "as-if-unsplit"
    shutil.copytree(bundle, unsplit)
    (unsplit / "manifest.json").write_text(json.dumps(unsplit_manifest))
    with pytest.raises(UserError, match="does not match its manifest"):  # its int4 rows are not in an unsplit graph
        validate_bundle(unsplit, log=quiet)
    assert ref["top1"] >= 0.99 and ref["mean_abs"] < 0.01, ref  # fp16 compute against the fp32 reference


# -- --quant gguf: the GGUF's own blocks as constexpr_blockwise_shift_scale (exporters/coreml_gguf.py) ----

# The GGUF type per weight (the table Q4_K: the tied table keeps its float offsets); one tensor stays F32.
GGUF_TYPES = {"q_proj": "Q4_0", "k_proj": "Q8_0", "v_proj": "Q6_K", "o_proj": "Q4_K", "gate_proj": "Q5_0",
              "up_proj": "Q8_0", "down_proj": "Q4_K", "embed_tokens": "Q4_K"}
F32_TENSOR = "model.layers.5.mlp.up_proj.weight"
DTYPES = {"Q4_0": ("int4", False), "Q8_0": ("int8", False), "Q5_0": ("int8", False), "Q6_K": ("int8", False),
          "Q4_K": ("uint4", True), "F32": ("int8", False)}  # the package's data type, and whether it has offsets


@pytest.fixture(scope="module")
def gguf_bundle(tmp_path_factory):
    """A tiny GGUF (test_gguf_grid's K-quant blocks, gguf-py's Q4_0/Q5_0/Q8_0) exported with --quant gguf
    and validated; the export's log lines."""
    from gguf import GGMLQuantizationType as Q
    from gguf.quants import quantize
    from test_gguf_grid import SHAPE, _k_blocks

    from gemma3_export.pipeline import export
    from gemma3_export.tokenizer import tiny_tokenizer
    from gemma3_export.weights import save_gguf

    tmp = tmp_path_factory.mktemp("coreml-gguf")
    model = tiny_model(**SHAPE)  # K-quants need rows of 256
    rng, raw = np.random.default_rng(0), {}
    for name, w in model.state_dict().items():
        if w.dim() != 2 or name in ("lm_head.weight", F32_TENSOR):
            continue
        qtype = GGUF_TYPES[name.split(".")[-2]]
        blocks = _k_blocks(qtype, *w.shape, rng) if qtype.endswith("_K") else quantize((w * 0.05).numpy(), getattr(Q, qtype))
        raw[name] = (getattr(Q, qtype), blocks)
    gguf = tmp / "tiny-mixed.gguf"
    save_gguf(model, gguf, tokenizer_model=tiny_tokenizer(512).model_proto, raw=raw)
    lines = []
    bundle = export(model="tiny", target="coreml", quant="gguf", checkpoint=str(gguf), context=64, chunk=8,
                    out=tmp / "b", validate=True, log=lines.append)
    return bundle, gguf, lines


def gguf_ops(bundle) -> dict:
    """The decode function's constexpr_blockwise_shift_scale ops by parameter name."""
    from gemma3_export.runtimes.coreml import package_program

    return {hf_name(op.name): op for op in package_program(bundle / "model.mlpackage").functions["decode"].operations
            if op.op_type == "constexpr_blockwise_shift_scale"}


def test_gguf_package_holds_exactly_the_simulated_weights(gguf_bundle):
    """Each weight one constexpr op in the GGUF type's form, the tied table once; its values are
    exactly `simulate`'s, and validate (the proxy on the package's weights) passes against it."""
    from coremltools.converters.mil.mil import types

    from gemma3_export.exporters.coreml import simulate
    from gemma3_export.gguf_grid import read_gguf_grid
    from gemma3_export.load import load_model
    from gemma3_export.runtimes.coreml import constexpr_value

    bundle, gguf, _ = gguf_bundle
    ops = gguf_ops(bundle)
    model = load_model("tiny", checkpoint=str(gguf), log=quiet).model
    sim = dict(simulate(model, "gguf", grid=read_gguf_grid(gguf)).named_parameters())
    assert len(ops) == 43 and set(ops) == {n for n, p in sim.items() if p.dim() == 2}  # 7 x 6 + the tied table
    for name, op in ops.items():
        source = "F32" if name == F32_TENSOR else GGUF_TYPES[name.split(".")[-2]]
        assert (types.builtin_to_string(op.data.dtype), op.offset is not None) == DTYPES[source], name
        assert op.scale.val.dtype == np.float16 and op.data.shape[1] // op.scale.shape[1] == (
            256 if source == "F32" else 16 if source == "Q6_K" else 32), name
        assert np.array_equal(constexpr_value(op), sim[name].numpy()), name
    m = json.loads((bundle / "manifest.json").read_text())
    assert m["validation"]["passed"] and m["validation"]["reference"] == "eager gguf", m["validation"]
    assert m["validation"]["thresholds"]["top1"] == 0.95  # fp16 compute: no run-time int8 roundings to allow for
    assert m["target_info"]["compression"]["dtypes"] == ["int4", "int8", "uint4"]


def test_gguf_package_values_are_the_files(gguf_bundle):
    """Against what the loader dequantizes from the GGUF: Q4_0, Q8_0 and Q5_0 bit for bit (the value
    rounded once to fp16); Q6_K within 2^-10 of its block's largest |w| (its scale d * sc rounded to
    fp16, then the product); Q4_K within 2^-9 of the larger of that and the block's offset dmin * m
    (scale, offset, difference and product each rounded once to fp16). 2^-24 on top: fp16's subnormal step."""
    from gemma3_export.gguf_grid import read_gguf_grid
    from gemma3_export.load import load_model
    from gemma3_export.runtimes.coreml import constexpr_value

    bundle, gguf, _ = gguf_bundle
    params = dict(load_model("tiny", checkpoint=str(gguf), log=quiet).model.named_parameters())
    grid = read_gguf_grid(gguf)
    tensors = json.loads((bundle / "manifest.json").read_text())["target_info"]["tensors"]
    seen = set()
    for name, op in gguf_ops(bundle).items():
        source = "F32" if name == F32_TENSOR else GGUF_TYPES[name.split(".")[-2]]
        got, want = constexpr_value(op), params[name].numpy()
        if source in ("Q4_0", "Q8_0", "Q5_0"):
            assert np.array_equal(got, want.astype(np.float16).astype(np.float32)), name
            assert tensors[name].endswith("(bit for bit)"), tensors[name]
        elif source in ("Q6_K", "Q4_K"):
            block = op.data.shape[1] // op.scale.shape[1]
            err = np.abs(got - want).reshape(want.shape[0], -1, block).max(-1)
            size = np.abs(want).reshape(want.shape[0], -1, block).max(-1)
            if source == "Q4_K":
                size, bound = np.maximum(size, np.abs(grid[name].offsets.offset)), 2**-9  # dmin * m per block
            else:
                bound = 2**-10
            assert (err <= bound * (1 + 2**-10) * size + 2**-24).all(), (name, float((err / size).max()))
            assert err.max() > 0 and "rounded to fp16: within" in tensors[name]  # random scales are not all fp16 numbers
        seen.add(source)
    assert seen == set(DTYPES)


def test_gguf_requantized_tensor_is_announced(gguf_bundle):
    bundle, _, lines = gguf_bundle
    fate = "F32 -> int8 per channel, re-quantized (F32 has no constexpr_blockwise_shift_scale form)"
    assert [line for line in lines if "notice:" in line] == [f"  notice: {F32_TENSOR}: {fate}"]
    tensors = json.loads((bundle / "manifest.json").read_text())["target_info"]["tensors"]
    assert tensors[F32_TENSOR] == fate and len(tensors) == 43
    assert tensors["model.embed_tokens.weight"].startswith("Q4_K -> uint4 block 32, fp16 offsets (scale and offset")


def test_gguf_mistakes_are_one_sentence(tmp_path, capsys):
    from gemma3_export.cli import main

    base = ["--model", "tiny", "--target", "coreml", "--quant", "gguf", "--out", str(tmp_path / "x")]
    assert main(base) == 2  # tiny's random weights are no GGUF
    err = capsys.readouterr().err
    assert "--quant gguf keeps a GGUF's own blocks; load the weights from one" in err and "Traceback" not in err
    assert main([*base, "--max-size", "1MB"]) == 2
    assert "not --target coreml --quant gguf." in capsys.readouterr().err
    assert main(["--model", "tiny", "--target", "executorch", "--quant", "gguf", "--out", str(tmp_path / "x")]) == 2
    assert "constexpr_blockwise_shift_scale and onnxruntime's MatMulNBits only so far" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
