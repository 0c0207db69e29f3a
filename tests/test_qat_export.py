"""A QAT checkpoint reaches the artifact on the grid it trained on: the exporters import its codes and
scales (`quantization.json`) instead of rounding the dequantized weights again, and refuse a scheme
that would round them."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from gemma3_export import fake_quant, pipeline
from gemma3_export.cli import main
from gemma3_export.qat import qat
from gemma3_export.validate import validate_bundle
from gemma3_export.weights import save_hf_folder

from conftest import flipped_tokens, split_siblings, tiny_model

TEXT = "gemma3_export/data/validation.txt"
QUIET = dict(log=lambda *_: None)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """`checkpoints(scheme)`: 3 QAT steps of the tiny teacher (its embedding scaled by 0.3, as in test_qat)."""
    model = tiny_model()
    with torch.no_grad():
        model.model.embed_tokens.weight.mul_(0.3)
    teacher = tmp_path_factory.mktemp("teacher")
    save_hf_folder(model, teacher)
    done = {}

    def get(scheme: str):
        if scheme not in done:
            done[scheme] = qat(model="tiny", scheme=scheme, steps=3, checkpoint=str(teacher), data=[TEXT], seq_len=32,
                               batch_size=2, lr=1e-3, out=tmp_path_factory.mktemp(f"qat-{scheme}") / "out", **QUIET)
        return done[scheme]

    return get


def _export(checkpoint, target, tmp_path, quant=None):
    return pipeline.export(model="tiny", target=target, checkpoint=str(checkpoint), quant=quant, context=64, chunk=8,
                           out=tmp_path / f"{target}-bundle", validate=False, **QUIET)


def _matmul_nbits_codes(path) -> list[tuple[np.ndarray, np.ndarray]]:
    """(signed codes [N, K], scales [N, K / block]) of every MatMulNBits in an ONNX file."""
    import onnx
    from onnx import helper, numpy_helper

    proto = onnx.load(str(path))
    inits = {t.name: t for t in proto.graph.initializer}
    out = []
    for node in proto.graph.node:
        if node.op_type != "MatMulNBits":
            continue
        a = {x.name: helper.get_attribute_value(x) for x in node.attribute}
        packed = numpy_helper.to_array(inits[node.input[1]]).reshape(a["N"], -1)
        u = np.stack([packed & 15, packed >> 4], -1).reshape(a["N"], -1)[:, : a["K"]] if a["bits"] == 4 else packed
        scales = numpy_helper.to_array(inits[node.input[2]]).reshape(a["N"], -1)
        out += split_siblings(proto.graph, node, u.astype(np.int16) - 2 ** (a["bits"] - 1), scales)
    return out


@pytest.mark.parametrize("scheme", ["int4", "int4b32"])
def test_onnx_stores_the_qat_grid_exactly(checkpoints, tmp_path, scheme):
    ckpt = checkpoints(scheme)
    grid = fake_quant.read_grid(ckpt)
    bundle = _export(ckpt, "onnx", tmp_path)  # no --quant: the checkpoint's own scheme
    m = json.loads((bundle / "manifest.json").read_text())
    assert m["quant"]["name"] == scheme and m["quant"]["grid"]["imported"] == "exactly"
    stored = _matmul_nbits_codes(bundle / "model.onnx")
    assert len(stored) == 6 * 7 + 1  # every projection and the head (the embedding shares the head's table)
    want = {grid.codes[n].numpy().astype(np.int16).tobytes(): grid.scales[n].numpy() for n in grid.codes}
    for codes, scales in stored:
        assert codes.tobytes() in want  # the trained codes, unchanged
        per_block = want[codes.tobytes()]
        assert np.array_equal(scales[:, :1] if per_block.shape[1] == 1 else scales, per_block)
    summary = validate_bundle(bundle, length=48, **QUIET)  # six whole bands of the tiny window
    assert summary["reference"] == f"eager {scheme} (QAT grid)" and len(summary["vs_float"]["bands"]) == 6
    # The trained grid, with int8 inputs as accuracy_level 4 rounds them (chaotic in the last digits:
    # judged by agreement); against the checkpoint itself, int8 inputs are all that differs: at most one
    # of the 48 next tokens flips (one did on a CPU with AVX512-VNNI and AMX; none on the earlier ones).
    vs_float = summary["vs_float"]
    assert summary["passed"] and summary["vs_reference"]["top1"] >= 0.95 and flipped_tokens(vs_float, 8) <= 1, vs_float


def test_onnx_fp8_stores_the_qat_grid_exactly(checkpoints, tmp_path):
    import onnx
    from onnx import numpy_helper

    ckpt = checkpoints("fp8")
    grid = fake_quant.read_grid(ckpt)
    bundle = _export(ckpt, "onnx", tmp_path)
    inits = [t for t in onnx.load(str(bundle / "model.onnx")).graph.initializer if t.name.endswith("_f8")]
    want = {grid.codes[n].view(torch.uint8).numpy().tobytes() for n in grid.codes}
    assert len(inits) == 6 * 7 + 1
    for t in inits:  # B [K, N] holds codes [N, K] transposed
        codes = np.frombuffer(t.raw_data, np.uint8).reshape(t.dims).T.copy()
        assert codes.tobytes() in want
    summary = validate_bundle(bundle, **QUIET)
    assert summary["vs_reference"]["max_abs"] <= 1e-4


def test_executorch_imports_the_8da4w_grid(checkpoints, tmp_path):
    ckpt = checkpoints("8da4w")
    bundle = _export(ckpt, "executorch", tmp_path)
    m = json.loads((bundle / "manifest.json").read_text())
    assert m["quant"]["name"] == "8da4w" and "bfloat16" in m["quant"]["grid"]["imported"]
    summary = validate_bundle(bundle, **QUIET)
    assert summary["reference"] == "eager 8da4w (QAT grid)" and summary["passed"]
    assert summary["vs_reference"]["top1"] >= 0.95


def test_a_scheme_that_would_round_the_grid_again_is_refused(checkpoints, tmp_path, capsys):
    ckpt = str(checkpoints("int4"))
    base = ["--model", "tiny", "--checkpoint", ckpt, "--out", str(tmp_path / "never"), "--no-validate"]
    for extra, words in ((["--target", "onnx", "--quant", "int4b32"], "export it with --quant int4"),
                         (["--target", "coreml"], "cannot store exactly; export it to onnx"),
                         (["--target", "executorch"], "cannot store exactly"),
                         (["--target", "onnx", "--quant", "int4b32", "--max-size", "1MB"],
                          "a QAT checkpoint's grid is stored as it is, so export it without --max-size")):
        assert main([*base, *extra]) == 2
        err = capsys.readouterr().err.strip().splitlines()[-1]
        assert words in err and "Traceback" not in err, err
    assert not (tmp_path / "never").exists()
    # a float export of the trained weights is still a choice
    bundle = _export(ckpt, "onnx", tmp_path, quant="fp32")
    assert "grid" not in json.loads((bundle / "manifest.json").read_text())["quant"]
