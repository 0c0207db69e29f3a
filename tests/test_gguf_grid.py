"""`--quant gguf`: a GGUF's own blocks reach the ONNX artifact without a second rounding (issue 10).

A tiny GGUF holds the block formats of Google's 270M file (Q8_0, Q5_0, Q4_K, Q6_K) plus Q4_0 and an
F16 tensor: every MatMulNBits weight must dequantize to exactly the values the loader reads from the
GGUF (Q4_K: its offsets to half an 8-bit step), and the F16 one is re-quantized and reported."""

from __future__ import annotations

import json

import gguf
import numpy as np
import onnx
import pytest
import torch
from gguf.quants import quantize
from onnx import helper, numpy_helper

from gemma3_export import pipeline
from gemma3_export.cli import main
from gemma3_export.gguf_grid import read_gguf_grid
from gemma3_export.load import load_model
from gemma3_export.tokenizer import tiny_tokenizer
from gemma3_export.validate import validate_bundle
from gemma3_export.weights import save_gguf

from conftest import split_siblings, tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")
Q = gguf.GGMLQuantizationType
# K = 256 everywhere, so the K-quants' super-blocks of 256 fit.
SHAPE = dict(hidden_size=256, intermediate_size=256, head_dim=64, query_pre_attn_scalar=64)
TYPES = {"q_proj": "Q5_0", "k_proj": "Q4_0", "v_proj": "Q6_K", "o_proj": "Q4_K", "gate_proj": "Q5_0",
         "up_proj": "Q8_0", "down_proj": "Q4_K"}


def _k_blocks(qtype: str, rows: int, k: int, rng) -> np.ndarray:
    """Random but well-formed K-quant blocks (gguf-py cannot quantize to them): small fp16 scales."""
    n = rows * k // 256
    if qtype == "Q6_K":  # ql 128, qh 64, int8 scales 16, fp16 d
        body = rng.integers(0, 256, (n, 192), dtype=np.uint8)
        scales = rng.integers(-32, 33, (n, 16)).astype(np.int8).view(np.uint8)
        d = np.full((n, 1), 0.0002, np.float16).view(np.uint8)
        return np.concatenate([body, scales, d], 1).reshape(rows, -1)
    d = np.stack([np.full(n, 0.0003, np.float16), np.full(n, 0.0002, np.float16)], 1).view(np.uint8)  # d, dmin
    rest = rng.integers(0, 256, (n, 140), dtype=np.uint8)  # 12 bytes of 6-bit scales/mins, 128 of codes
    return np.concatenate([d, rest], 1).reshape(rows, -1)


@pytest.fixture(scope="module")
def gguf_file(tmp_path_factory):
    model = tiny_model(**SHAPE)
    rng, raw = np.random.default_rng(0), {}
    for name, w in model.state_dict().items():
        if w.dim() != 2 or name == "lm_head.weight":
            continue
        kind = "embed" if "embed" in name else name.split(".")[-2]
        qtype = "Q8_0" if kind == "embed" else TYPES[kind]
        if name == "model.layers.1.mlp.down_proj.weight":
            qtype = "Q6_K"
        if name == "model.layers.5.mlp.up_proj.weight":
            continue  # stays F32 in the file: no MatMulNBits form, re-quantized
        if qtype.endswith("_K"):
            raw[name] = (getattr(Q, qtype), _k_blocks(qtype, *w.shape, rng))
        else:
            raw[name] = (getattr(Q, qtype), quantize((w * 0.05).numpy(), getattr(Q, qtype)))
    path = tmp_path_factory.mktemp("gguf") / "tiny-mixed.gguf"
    save_gguf(model, path, tokenizer_model=tiny_tokenizer(512).model_proto, raw=raw)
    return path


def _nbits(path) -> list[np.ndarray]:
    """Every MatMulNBits weight of an ONNX file, dequantized as onnxruntime defines it, as [N, K]."""
    proto = onnx.load(str(path))
    inits = {t.name: numpy_helper.to_array(t) for t in proto.graph.initializer}
    out = []
    for node in proto.graph.node:
        if node.op_type != "MatMulNBits":
            continue
        a = {x.name: helper.get_attribute_value(x) for x in node.attribute}
        n, k, bits, block = a["N"], a["K"], a["bits"], a["block_size"]
        packed = inits[node.input[1]].reshape(n, -1)
        u = np.stack([packed & 15, packed >> 4], -1).reshape(n, -1) if bits == 4 else packed
        scales = inits[node.input[2]].reshape(n, -1)
        zp = inits[node.input[3]].reshape(n, -1) if len(node.input) > 3 else np.float32(2 ** (bits - 1))
        q = u[:, :k].astype(np.float32).reshape(n, k // block, block)
        zp = zp[..., None] if isinstance(zp, np.ndarray) else zp
        out += [w for (w,) in split_siblings(proto.graph, node, ((q - zp) * scales[..., None]).reshape(n, k))]
    return out


def test_the_grid_reads_back_what_the_loader_dequantizes(gguf_file):
    model = load_model("tiny", checkpoint=str(gguf_file), log=lambda *_: None).model
    grid = read_gguf_grid(gguf_file)
    params = dict(model.named_parameters())
    assert isinstance(grid["model.layers.5.mlp.up_proj.weight"], str)
    for name, g in grid.items():
        if isinstance(g, str):
            continue
        want = params[name].detach().numpy()
        if g.source == "Q4_K":  # its offset rounded to the 8-bit step: at most half a step off
            assert g.bits == 8 and g.zero_points.dtype == np.uint8
            err = np.abs(g.dequantize() - want).reshape(*g.scales.shape, -1)
            assert (err <= 0.5 * g.scales[..., None] + 1e-6 * np.abs(want).max()).all(), name
            assert err.max() > 0  # random offsets are not whole steps: the bound is what is tested
        else:
            assert np.array_equal(g.dequantize(), want), (name, g.source)


def test_onnx_keeps_the_gguf_blocks(gguf_file, tmp_path):
    bundle = pipeline.export(model="tiny", target="onnx", quant="gguf", checkpoint=str(gguf_file), context=64, chunk=8,
                             out=tmp_path / "b", validate=False, log=lambda *_: None)
    m = json.loads((bundle / "manifest.json").read_text())
    tensors = m["target_info"]["tensors"]
    assert tensors["model.layers.0.self_attn.q_proj.weight"] == "Q5_0 -> int8 block 32 (bit for bit)"
    assert tensors["model.layers.0.self_attn.v_proj.weight"] == "Q6_K -> int8 block 16 (bit for bit)"
    assert tensors["model.layers.0.self_attn.o_proj.weight"].startswith("Q4_K -> int8 block 32, zero points (offsets")
    assert "re-quantized" in tensors["model.layers.5.mlp.up_proj.weight"]
    grid = {g.dequantize().tobytes() for g in read_gguf_grid(gguf_file).values() if not isinstance(g, str)}
    stored = _nbits(bundle / "model.onnx")
    assert len(stored) == 6 * 7 + 1
    assert sum(w.tobytes() in grid for w in stored) == len(stored) - 1  # all but the re-quantized F16 up_proj
    proto = onnx.load(str(bundle / "model.onnx"), load_external_data=False)
    levels = {helper.get_attribute_value(a) for n in proto.graph.node if n.op_type == "MatMulNBits"
              for a in n.attribute if a.name == "accuracy_level"}
    assert levels == {4} and m["target_info"]["accuracy_level"] == 4  # 8-bit blocks run fast only so
    summary = validate_bundle(bundle, log=lambda *_: None)
    assert summary["reference"] == "eager gguf" and summary["passed"], summary
    # int8 activations make logits chaotic in the last digits (a 1e-6 relative nudge of the weights moves
    # this random model's logits by 0.04): the weights are checked bit for bit above, the run by agreement
    ref = summary["vs_reference"]
    assert ref["top1"] >= 0.97 and ref["kl"] <= 2e-3, ref


def test_gguf_needs_a_gguf_source(tmp_path, capsys):
    assert main(["--model", "tiny", "--target", "onnx", "--quant", "gguf", "--out", str(tmp_path / "x")]) == 2
    assert "--quant gguf keeps a GGUF's own blocks" in capsys.readouterr().err
    assert main(["--model", "tiny", "--target", "executorch", "--quant", "gguf", "--out", str(tmp_path / "x")]) == 2
    assert "MatMulNBits only so far" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
