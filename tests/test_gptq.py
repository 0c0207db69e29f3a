"""GPTQ (`gemma3-export gptq`): its rounding keeps a matrix's outputs closer than rounding to nearest,
its checkpoint reaches the ONNX artifact exactly (as a QAT grid does), and a user's mistakes are one
sentence."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from gemma3_export import fake_quant, pipeline
from gemma3_export.cli import main
from gemma3_export.exporters import onnx as ox
from gemma3_export.fake_quant import dequantize_int4
from gemma3_export.gptq import gptq, gptq_checkpoint, round_to_nearest
from gemma3_export.validate import validate_bundle
from gemma3_export.weights import save_hf_folder

from conftest import tiny_model
from test_onnx import CHUNK, CONTEXT, PLAN, run_plan, token_ids
from test_qat_export import _matmul_nbits_codes

TEXT = "gemma3_export/data/validation.txt"
QUIET = dict(log=lambda *_: None)

pytestmark = pytest.mark.usefixtures("one_thread")


def _inputs(n: int, k: int, seed: int) -> torch.Tensor:
    """Correlated inputs with a few large channels, as a transformer's are: one fixed mixing of the
    channels (seed 0), `seed`'s samples."""
    fixed = torch.Generator().manual_seed(0)
    mix = torch.eye(k) + torch.randn(k, k, generator=fixed) / k**0.5
    loud = torch.where(torch.rand(k, generator=fixed) < 0.05, 8.0, 1.0)
    return torch.randn(n, k, generator=torch.Generator().manual_seed(seed)) @ mix * loud


@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("block", [32, 128])
def test_gptq_keeps_outputs_closer_than_rounding_to_nearest(block, act_order):
    g = torch.Generator().manual_seed(1)
    w = torch.randn(96, 256, generator=g) * 0.05
    x = _inputs(1024, 256, seed=2)
    codes, scales = gptq(w, x.T @ x / len(x), block, act_order=act_order)
    if act_order:  # static groups: every block's scale from the unrounded weights, blocks contiguous along K
        assert torch.equal(scales, round_to_nearest(w, block)[1])
    assert codes.dtype == torch.int8 and int(codes.min()) >= -8 and int(codes.max()) <= 7
    assert scales.shape == (96, 256 // block)
    held_out = _inputs(1024, 256, seed=3)  # the same distribution, other samples
    err_gptq = (held_out @ (w - dequantize_int4(codes, scales)).T).pow(2).mean()
    err_rtn = (held_out @ (w - dequantize_int4(*round_to_nearest(w, block))).T).pow(2).mean()
    assert err_gptq < 0.85 * err_rtn, (float(err_gptq), float(err_rtn))


def test_gptq_is_rounding_to_nearest_for_uncorrelated_inputs():
    """With H = I no column's error moves another: GPTQ is round to nearest, on MatMulNBits' grid."""
    w = torch.randn(64, 256, generator=torch.Generator().manual_seed(4))
    codes, scales = gptq(w, torch.eye(256), 128, damp=0.0)
    rtn_codes, rtn_scales = round_to_nearest(w, 128)
    ort_codes, ort_scales = ox.nbits_codes(w, 4, 128)  # onnxruntime's quantizer's rounding, reproduced
    assert torch.equal(rtn_codes, ort_codes.flatten(1).to(torch.int8)) and torch.equal(rtn_scales, ort_scales[..., 0])
    assert torch.equal(codes, rtn_codes) and torch.allclose(scales, rtn_scales)


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    """The tiny model at width 128 (every matrix a whole number of blocks of 128; down_proj two)."""
    model = tiny_model(hidden_size=128, intermediate_size=256)
    with torch.no_grad():  # as in test_qat: the layers, not the table's self-similarity, make the logits
        model.model.embed_tokens.weight.mul_(0.3)
    folder = tmp_path_factory.mktemp("teacher")
    save_hf_folder(model, folder)
    return model, folder


@pytest.fixture(scope="module")
def checkpoint(teacher, tmp_path_factory):
    return gptq_checkpoint(model="tiny", scheme="int4b128", checkpoint=str(teacher[1]), data=[TEXT],
                           out=tmp_path_factory.mktemp("gptq") / "ckpt", **QUIET)


def _hidden(model, ids) -> torch.Tensor:
    """The final norm's output (the LM head's input)."""
    seen = []
    hook = model.model.norm.register_forward_hook(lambda module, args, out: seen.append(out))
    with torch.no_grad():
        model(ids)
    hook.remove()
    return seen[0]


def test_gptq_checkpoint_is_closer_to_the_float_model_on_its_calibration_text(teacher, checkpoint):
    """What GPTQ minimises, end to end: on the text it was calibrated on, the hidden states the head sees
    stay closer to the float model's than with the same grid rounded to nearest. (Held-out text is the
    unit test's and benchmarks/head_gptq.py's: 480 tokens of a random tiny model generalise poorly.)"""
    from gemma3_export.load import load_model
    from gemma3_export.qat_data import read_texts, text_data

    model, _ = teacher
    loaded = load_model("tiny", checkpoint=str(checkpoint), **QUIET)
    assert loaded.grid is not None and loaded.grid.scheme.name == "int4b128"
    summary = json.loads((checkpoint / "gptq.json").read_text())
    assert summary["scheme"] == "int4b128" and "validation.txt" in summary["calibration"]
    rtn = ox.simulate(model, "int4b128", accuracy_level=0)  # the same grid, rounded to nearest
    ids = text_data([TEXT], loaded.tokenizer, 96, read_texts([TEXT]))[0]
    want = _hidden(model, ids)
    err_gptq, err_rtn = (_hidden(loaded.model, ids) - want).pow(2).mean(), (_hidden(rtn, ids) - want).pow(2).mean()
    assert err_gptq < 0.85 * err_rtn, (float(err_gptq), float(err_rtn))


def test_onnx_stores_the_gptq_grid_exactly(checkpoint, tmp_path):
    grid = fake_quant.read_grid(checkpoint)
    bundle = pipeline.export(model="tiny", target="onnx", checkpoint=str(checkpoint), context=64, chunk=8,
                             out=tmp_path / "onnx", validate=False, **QUIET)
    m = json.loads((bundle / "manifest.json").read_text())
    assert m["quant"]["name"] == "int4b128" and m["quant"]["block_size"] == 128
    assert m["quant"]["grid"]["imported"] == "exactly"
    stored = _matmul_nbits_codes(bundle / "model.onnx")
    assert len(stored) == 6 * 7 + 1
    want = {grid.codes[n].numpy().astype(np.int16).tobytes(): grid.scales[n].numpy() for n in grid.codes}
    for codes, scales in stored:
        assert codes.tobytes() in want and np.array_equal(scales, want[codes.tobytes()])
    summary = validate_bundle(bundle, length=48, **QUIET)
    assert summary["passed"] and summary["vs_reference"]["top1"] >= 0.95, summary["vs_reference"]


def test_plain_int4b128_is_its_simulation(teacher, tmp_path, capsys):
    """`--quant int4b128` without GPTQ: onnxruntime's quantizer in blocks of 128 is `simulate`'s grid (at
    accuracy_level 0, fp32 compute: float rounding apart; level 4's int8 inputs are judged by agreement in
    `validate`, as for every scheme); a model without whole blocks is refused in one sentence."""
    from gemma3_export.generate import EagerRunner
    from gemma3_export.load import load_model
    from gemma3_export.runtimes.onnx import OnnxRunner

    model, folder = teacher
    spec = pipeline.make_spec("tiny", "onnx", "int4b128", CONTEXT, CHUNK)
    info = ox.export(load_model("tiny", checkpoint=str(folder), **QUIET).model, tmp_path, spec, accuracy_level=0, **QUIET)
    assert {n[1].shape[1] for n in _matmul_nbits_codes(tmp_path / "model.onnx")} == {1, 2}  # K = 128 or 256 (down)
    ids = token_ids(sum(PLAN), seed=7)
    _, got = run_plan(OnnxRunner(tmp_path / "model.onnx", info["inputs"], info["outputs"], CONTEXT, CHUNK), ids)
    _, ref = run_plan(EagerRunner(ox.simulate(model, "int4b128", accuracy_level=0), CONTEXT, CHUNK), ids)
    assert max(float(np.abs(a - b).max()) for a, b in zip(got, ref)) <= 1e-4
    assert main(["--model", "tiny", "--random-weights", "--target", "onnx", "--quant", "int4b128",
                 "--out", str(tmp_path / "narrow")]) == 2  # width 64: half a block
    assert "multiple of 128" in capsys.readouterr().err and not (tmp_path / "narrow").exists()


def test_bad_input_is_one_sentence(teacher, checkpoint, tmp_path, capsys):
    cases = [
        (["--model", "tiny", "--random-weights", "--scheme", "int4b128"], "multiple of 128"),  # width 64
        (["--model", "tiny", "--checkpoint", str(teacher[1]), "--scheme", "int4b128", "--data", str(tmp_path / "no.txt")],
         "No data file"),
        (["--model", "tiny", "--checkpoint", str(checkpoint), "--scheme", "int4b128"], "already holds"),
        (["--model", "tiny", "--random-weights", "--scheme", "fp8"], "invalid choice"),
        (["--model", "tiny", "--checkpoint", str(teacher[1]), "--scheme", "int4b128", "--samples", "0"], "at least 1"),
    ]
    for args, words in cases:
        out = tmp_path / "out"
        assert main(["gptq", *args, "--out", str(out)]) == 2
        err = capsys.readouterr().err.strip()  # (progress lines, then the one sentence)
        assert words in err.splitlines()[-1] and "Traceback" not in err, err
        assert not out.exists() and not list(tmp_path.glob(".out.partial-*"))
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "notes.txt").write_text("mine")
    for out in (taken, taken / "notes.txt"):  # a folder of something else, a file
        assert main(["gptq", "--model", "tiny", "--checkpoint", str(teacher[1]), "--scheme", "int4b128", "--out", str(out)]) == 2
        err = capsys.readouterr().err
        assert "not a GPTQ checkpoint" in err and "Traceback" not in err and (taken / "notes.txt").read_text() == "mine"
    assert main(["--model", "tiny", "--random-weights", "--target", "onnx", "--out", str(taken / "notes.txt")]) == 2
    assert "is not a bundle" in capsys.readouterr().err  # an export's --out that is a file, likewise
    ok = tmp_path / "ok"  # and the command itself, with its options
    assert main(["gptq", "--model", "tiny", "--checkpoint", str(teacher[1]), "--scheme", "int4b32", "--data", TEXT,
                 "--samples", "2", "--act-order", "--out", str(ok)]) == 0
    summary = json.loads((ok / "gptq.json").read_text())
    assert summary["act_order"] and summary["calibration"].startswith("768 tokens") and fake_quant.read_grid(ok).scheme.name == "int4b32"
