"""`validate` and bundle errors through the CLI: parity summaries in the manifest, exit 1 past the
thresholds, one sentence and exit 2 for a bundle or request the user got wrong."""

from __future__ import annotations

import json
import shutil

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from gemma3_export import validate
from gemma3_export.bundle import file_hashes, read_bundle
from gemma3_export.cli import main
from test_onnx import CHUNK, CONTEXT, W, tiny_bundle


pytestmark = pytest.mark.usefixtures("one_thread")


def copy_bundle(scheme: str, tmp_path):
    dst = tmp_path / scheme
    shutil.copytree(tiny_bundle(scheme), dst)
    return dst


def run_cli(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def one_sentence(code, err, pattern):
    assert code == 2 and "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and pattern in lines[0], err


# -- the report ------------------------------------------------------------------------------


def test_validate_writes_the_summary_and_exits_0(capsys, tmp_path):
    path = copy_bundle("fp32", tmp_path)
    code, _, err = run_cli(capsys, "validate", str(path))
    assert code == 0, err
    s = read_bundle(path).manifest["validation"]
    assert s["passed"] and s["reference"] == "float" and s["positions"] >= 3 * W + 2 * CHUNK
    assert len(s["vs_reference"]["bands"]) == -(-s["positions"] // W)  # one band per window of positions
    assert s["vs_reference"]["max_abs"] <= 1e-4 and s["vs_reference"]["top1"] == 1.0
    assert "passed" in err and "max abs" in err


def test_quantized_bundle_is_judged_against_its_simulation(tmp_path):
    path = copy_bundle("int4b32", tmp_path)
    s = validate.validate_bundle(path, log=lambda *_: None)
    assert s["passed"] and s["reference"] == "eager int4b32"
    # accuracy_level 4: the artifact rounds linear inputs to int8 at run time, as the reference does;
    # last-digit differences flip some of those roundings, so it is judged by agreement and KL.
    assert s["thresholds"] == validate.DYNAMIC_INT8.__dict__
    assert s["vs_reference"]["top1"] >= 0.95
    assert s["vs_float"]["kl"] > 10 * s["vs_reference"]["kl"]  # what int4 costs, reported


def test_tampered_artifact_fails_with_exit_1(capsys, tmp_path):
    """A weight changed after export (checksums updated, so the file is 'valid'): validate catches it."""
    path = copy_bundle("fp32", tmp_path)
    model = onnx.load(path / "model.onnx")
    target = next(t for t in model.graph.initializer if list(t.dims) == [128, 64])  # a down_proj, transposed
    target.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(target) * 1.5, target.name))
    onnx.save_model(model, path / "model.onnx")
    manifest = json.loads((path / "manifest.json").read_text())
    manifest["files"] = file_hashes(path)
    (path / "manifest.json").write_text(json.dumps(manifest))
    code, _, err = run_cli(capsys, "validate", str(path))
    assert code == 1 and "FAILED: max abs logit diff" in err
    assert read_bundle(path).manifest["validation"]["passed"] is False


def test_tightened_thresholds_fail_with_exit_1(capsys, tmp_path, monkeypatch):
    path = copy_bundle("int4b32", tmp_path)
    monkeypatch.setattr(validate, "DYNAMIC_INT8", validate.Thresholds(1e-9, 1.0, 0.0))  # int4b32 at accuracy_level 4
    code, _, err = run_cli(capsys, "validate", str(path))
    assert code == 1 and "max abs logit diff" in err and "KL" in err


def test_thresholds_depend_on_the_reference():
    assert validate.thresholds_for("fp32", "float") == validate.SAME_GRID["fp32"]
    assert validate.thresholds_for("int4", "eager int4").top1 > validate.thresholds_for("int4", "float").top1
    assert validate.judge({"max_abs": 1.0, "top1": 0.5, "kl": 1.0}, validate.Thresholds(None, 0.4, 2.0)) == []


def test_bands_split_positions_by_window():
    positions = np.arange(20)
    ref = np.zeros((20, 4), np.float32)
    got = ref.copy()
    got[9, 1] = 3.0  # one position of the second band differs, and flips its top-1
    bands = validate.compare(positions, ref, got, window=8)
    assert [(b.start, b.stop) for b in bands] == [(0, 8), (8, 16), (16, 24)]
    assert bands[0].max_abs == 0 and bands[1].max_abs == 3.0 and bands[1].top1 == 7 / 8 and bands[1].kl > 0
    s = validate.summarize(bands)
    assert s["max_abs"] == 3.0 and s["top1"] == 7 / 8


# -- bad input: one sentence, exit 2 ---------------------------------------------------------------


def test_missing_file(capsys, tmp_path):
    path = copy_bundle("fp32", tmp_path)
    (path / "model.onnx").unlink()
    one_sentence(*run_cli(capsys, "validate", str(path))[::2], "is incomplete: model.onnx is missing")


def test_changed_file(capsys, tmp_path):
    path = copy_bundle("fp32", tmp_path)
    data = bytearray((path / "model.onnx").read_bytes())
    data[-100] ^= 0xFF
    (path / "model.onnx").write_bytes(bytes(data))
    one_sentence(*run_cli(capsys, "validate", str(path))[::2], "does not match its checksum in the manifest")


def test_other_format_version(capsys, tmp_path):
    path = copy_bundle("fp32", tmp_path)
    manifest = json.loads((path / "manifest.json").read_text())
    manifest["format_version"] = 99
    (path / "manifest.json").write_text(json.dumps(manifest))
    one_sentence(*run_cli(capsys, "validate", str(path))[::2], "bundle format 99")


def test_prompt_past_the_context(capsys, tmp_path):
    code, _, err = run_cli(capsys, "generate", "--bundle", str(tiny_bundle("fp32")), "--prompt", "word " * 60)
    one_sentence(code, err, f"do not fit the context of {CONTEXT}")


def test_unsupported_scheme_for_the_target(capsys, tmp_path):
    code, _, err = run_cli(capsys, "--model", "tiny", "--target", "onnx", "--quant", "8da4w", "--out", str(tmp_path / "b"))
    one_sentence(code, err, "The onnx target does not take 8da4w")
    assert not (tmp_path / "b").exists()


def test_artifact_onnxruntime_cannot_load(capsys, tmp_path):
    path = copy_bundle("fp32", tmp_path)
    (path / "model.onnx").write_bytes(b"not a model")
    code, _, err = run_cli(capsys, "generate", "--bundle", str(path), "--prompt", "hello")
    one_sentence(code, err, "onnxruntime cannot load")


# -- perplexity (rung 4: the user's own text) ----------------------------------------------------------


def test_perplexity_of_a_bundle_matches_the_eager_model(capsys, tmp_path):
    from gemma3_export.perplexity import perplexity

    text = tmp_path / "text.txt"
    text.write_text("The keeper counted ships in the night.\nOne by one.")
    dump = tmp_path / "scores.npz"
    code, _, err = run_cli(capsys, "perplexity", "--bundle", str(tiny_bundle("fp32")), "--text", str(text), "--dump", str(dump))
    assert code == 0 and "perplexity" in err and "top-1 accuracy" in err, err
    got = perplexity(bundle=str(tiny_bundle("fp32")), text=text, log=lambda *_: None)
    eager = perplexity(model="tiny", text=text, log=lambda *_: None)
    assert got["scored"] == eager["scored"] == got["tokens"] - 1 and got["tokens"] < CONTEXT
    assert got["perplexity"] == pytest.approx(eager["perplexity"], rel=1e-3) and got["top1"] == eager["top1"]
    saved = np.load(dump)
    n = got["tokens"]
    assert saved["ids"].shape == (n,) and saved["top_ids"].shape == saved["top_logits"].shape == (n, 20)
    assert np.all(np.diff(saved["top_logits"], axis=1) <= 0) and np.all(saved["logsumexp"] >= saved["top_logits"][:, 0])
    assert np.mean(saved["top_ids"][:-1, 0] == saved["ids"][1:]) == pytest.approx(got["top1"])


def test_perplexity_needs_a_text_file(capsys, tmp_path):
    code, _, err = run_cli(capsys, "perplexity", "--model", "tiny", "--text", str(tmp_path / "missing.txt"))
    one_sentence(code, err, "No text file at")
