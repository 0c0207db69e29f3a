"""Vision (issue 8) on ExecuTorch and Core ML, and `validate` of a bundle's vision artifact: the tiny
multimodal preset with seeded random weights (the same encoder as tests/test_vision.py)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from gemma3_export import pipeline
from gemma3_export.bundle import read_bundle
from gemma3_export.config import VISION_PRESETS, preset
from gemma3_export.weights import build_vision, random_vision_state

from conftest import tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")
VCFG = VISION_PRESETS["tiny"]
QUIET = lambda *_: None  # noqa: E731


def tiny_vision(seed: int = 0):
    """The encoder a tiny --vision export holds (load_vision: seed 0)."""
    hidden = preset("tiny").hidden_size
    return build_vision(VCFG, hidden, random_vision_state(VCFG, hidden, seed), "random")


def pixels(n: int, seed: int = 3) -> torch.Tensor:
    s = VCFG.vision_config.image_size
    return torch.rand(n, 3, s, s, generator=torch.Generator().manual_seed(seed)) * 2 - 1


@pytest.fixture(scope="module")
def image_files(tmp_path_factory):
    from PIL import Image

    folder = tmp_path_factory.mktemp("images")
    for name, (w, h), seed in (("wide.png", (90, 40), 1), ("square.jpg", (30, 30), 2)):
        arr = np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)
        Image.fromarray(arr).save(folder / name)
    return [str(folder / "wide.png"), str(folder / "square.jpg")]


# -- ExecuTorch: vision.pte and a decoder that takes image_embeds ---------------------------------------


@pytest.fixture(scope="session")
def et_vision_bundle(tmp_path_factory):
    """A tiny fp32 ExecuTorch bundle exported with --vision (two lowerings: model.pte, vision.pte)."""
    out = tmp_path_factory.mktemp("tiny-et-vision") / "bundle"
    return pipeline.export(model="tiny", target="executorch", quant="fp32", context=64, chunk=8, out=out,
                           vision=True, validate=False, log=QUIET)


def test_the_et_vision_bundle_describes_both_programs(et_vision_bundle):
    m = read_bundle(et_vision_bundle, verify=True).manifest  # verify: schema, cross-field rules, checksums
    v = m["vision"]
    assert v["artifact"] == "vision.pte" and v["artifact"] in m["files"] and v["scheme"] == "fp32"
    assert v["inputs"] == [{"name": "pixels", "shape": [1, 3, 28, 28], "dtype": "float32"}]
    assert v["outputs"] == [{"name": "image_embeds", "shape": [1, 4, 64], "dtype": "float32"}]
    assert [i["name"] for i in m["inputs"]] == ["tokens", "input_pos", "image_embeds"]
    assert m["inputs"][-1]["shape"] == [1, "T", 64]


def test_vision_pte_matches_eager(et_vision_bundle):
    from gemma3_export.runtimes.executorch import ExecuTorchVisionEncoder

    x = pixels(3, seed=7)
    with torch.no_grad():
        ref = tiny_vision()(x).numpy()
    got = ExecuTorchVisionEncoder.from_bundle(read_bundle(et_vision_bundle))(x.numpy())
    assert got.shape == ref.shape == (3, 4, 64)
    np.testing.assert_allclose(got, ref, atol=1e-4, rtol=0)


def test_quantized_vision_pte_matches_torchao_eager(tmp_path):
    """8da8w (int8 dynamic activations x per-channel int8 weights): vision.pte against the eager encoder
    quantized by the same torchao config; and it is really quantized (off the float one)."""
    from gemma3_export.exporters.executorch import export_vision, simulate_vision
    from gemma3_export.runtimes.executorch import ExecuTorchVisionEncoder

    x = pixels(2, seed=8)
    float_vision = tiny_vision()
    with torch.no_grad():
        grid, full = simulate_vision(float_vision, "8da8w")(x).numpy(), float_vision(x).numpy()
    info = export_vision(tiny_vision(), tmp_path, "8da8w", log=QUIET)
    got = ExecuTorchVisionEncoder(tmp_path / info["artifact"])(x.numpy())
    scale = np.abs(full).max()
    assert np.abs(got - grid).max() <= 1e-4 * scale  # the grid it claims (measured 1e-6 of scale)
    off = np.abs(got - full).max() / scale
    assert 3e-4 < off < 0.03  # int8: visibly quantized, still the same function


def test_int4_vision_is_refused_where_xnnpack_cannot_take_it():
    """SigLIP's MLP width 4304 is no multiple of 32, which XNNPACK's int4 weights need even per channel."""
    from gemma3_export.errors import UserError
    from gemma3_export.pipeline import make_spec

    assert make_spec("tiny", "executorch", None, 64, 8, vision=True).scheme.name == "8da8w"
    for quant in ("8da4w", "8da4w-pc"):
        with pytest.raises(UserError, match="--vision on executorch takes --quant fp32, 8da8w"):
            make_spec("tiny", "executorch", quant, 64, 8, vision=True)


def test_prefill_with_images_et_matches_eager(et_vision_bundle, image_files):
    """Two images, a prompt of ~5 windows through chunks of 8, then decode: the bundle against the
    eager model (fp32, <= 1e-4)."""
    from gemma3_export.chat import open_source, with_images
    from gemma3_export.generate import EagerRunner

    runner, tok = open_source(bundle=str(et_vision_bundle), vision=True)
    ids, images = with_images(tok.encode("Describe these."), runner, tok, image_files, False, chat=False)
    assert len(ids) > 3 * 8 and sum(i == VCFG.image_token_index for i in ids) == 8
    eager_runner, _ = open_source(model="tiny", context=64, vision=True, log=QUIET)
    _, ref_images = with_images(tok.encode("Describe these."), eager_runner, tok, image_files, False, chat=False)
    np.testing.assert_allclose(images, ref_images, atol=1e-4, rtol=0)
    eager = EagerRunner(tiny_model(), max_context=64, chunk=8, image_token_id=VCFG.image_token_index)
    eager.model.model.image_token_id = VCFG.image_token_index
    np.testing.assert_allclose(runner.prefill(ids, images), eager.prefill(ids, ref_images), atol=1e-4, rtol=0)
    for tok_id in (300, 301):
        np.testing.assert_allclose(runner.decode(tok_id), eager.decode(tok_id), atol=1e-4, rtol=0)


def test_generate_with_an_image_et_bundle_matches_eager(et_vision_bundle, image_files):
    from gemma3_export.chat import generate_text

    kw = dict(prompt="What is it?", image=image_files[:1], pan_and_scan=True, max_new_tokens=6, chat=True, log=QUIET)
    assert generate_text(bundle=str(et_vision_bundle), **kw) == generate_text(model="tiny", context=64, **kw)


def test_text_steps_of_an_et_vision_bundle_match_eager(et_vision_bundle):
    """Text-only prompts through a vision bundle (zeros in image_embeds) are the text model's logits."""
    from gemma3_export.generate import EagerRunner

    runner = pipeline.open_runner(et_vision_bundle)
    eager = EagerRunner(tiny_model(), max_context=64, chunk=8)
    ids = [2, *range(120, 140)]
    np.testing.assert_allclose(runner.prefill(ids), eager.prefill(ids), atol=1e-4, rtol=0)
    np.testing.assert_allclose(runner.decode(7), eager.decode(7), atol=1e-4, rtol=0)


# -- Core ML: vision.mlpackage and a decoder that takes image_embeds (structure + the fp16 proxy) --------

PROXY_REL = 1e-2  # fp16 compute: largest |proxy - fp32 eager| over the output's scale (weights fp16-rounded)


@pytest.fixture(scope="session")
def coreml_vision_bundle(tmp_path_factory):
    """A tiny fp16 Core ML bundle exported with --vision: model.mlpackage and vision.mlpackage."""
    out = tmp_path_factory.mktemp("tiny-coreml-vision") / "bundle"
    return pipeline.export(model="tiny", target="coreml", context=64, chunk=8, out=out, vision=True,
                           validate=False, log=QUIET)


def test_the_coreml_vision_bundle_has_the_packages_its_manifest_describes(coreml_vision_bundle):
    from gemma3_export.runtimes.coreml import check_package, describe_package

    b = read_bundle(coreml_vision_bundle, verify=True)
    m, v = b.manifest, b.manifest["vision"]
    assert v["artifact"] == "vision.mlpackage" and v["scheme"] == "fp16" and v["compute_precision"] == "fp16"
    d = describe_package(coreml_vision_bundle / v["artifact"])
    main = d["functions"]["main"]
    assert main["inputs"] == v["inputs"] == [{"name": "pixels", "shape": [1, 3, 28, 28], "dtype": "float32"}]
    assert main["outputs"] == v["outputs"] == [{"name": "image_embeds", "shape": [1, 4, 64], "dtype": "float32"}]
    assert main["states"] == []
    n = sum(t.numel() for t in tiny_vision().state_dict().values() if t.dim() >= 2)
    assert 0.99 * n <= d["weight_elements"]["float16"]
    assert d["weight_elements"].get("float32", 0) <= 32  # only the projector's RMSNorm gain (an fp32 island)
    assert check_package(b.artifact, m) == []  # the decoder: both functions take image_embeds
    decode = describe_package(b.artifact)["functions"]["decode"]
    assert decode["inputs"][-1] == {"name": "image_embeds", "shape": [1, 1, 64], "dtype": "float32"}
    assert m["inputs"][-1] == {"name": "image_embeds", "shape": [1, "T", 64], "dtype": "float32"}


def test_coreml_vision_fp16_proxy_matches_eager(coreml_vision_bundle):
    from gemma3_export.runtimes.coreml import PROXY_NOTE, CoreMLVisionEncoder

    encoder = CoreMLVisionEncoder.from_bundle(read_bundle(coreml_vision_bundle), proxy=True)
    x = pixels(2, seed=7)
    with torch.no_grad():
        ref = tiny_vision()(x).numpy()
    got = encoder(x.numpy())
    assert encoder.runtime_note == PROXY_NOTE and got.shape == ref.shape
    rel = np.abs(got - ref).max() / np.abs(ref).max()
    assert 0 < rel < PROXY_REL  # fp16 compute: close, and not the fp32 graph


def test_coreml_int8_vision_package_holds_int8_weights_on_the_simulated_grid(tmp_path):
    from gemma3_export.exporters.coreml import export_vision, simulate_vision, trace_vision
    from gemma3_export.runtimes.coreml import vision_params

    vision = tiny_vision()
    info = export_vision(vision, tmp_path, "int8", log=QUIET)
    linear = sum(m.weight.numel() for m in vision.modules() if isinstance(m, torch.nn.Linear))
    proj = vision.multi_modal_projector.mm_input_projection_weight
    assert info["weight_elements"]["int8"] == linear + proj.numel()
    stored = vision_params(tmp_path / info["artifact"], trace_vision(tiny_vision()))  # what the proxy runs
    sim = dict(simulate_vision(vision, "int8").named_parameters())
    matrices = [k for k, w in sim.items() if w.dim() == 2 and "position_embedding" not in k]
    assert len(matrices) == 2 * 6 + 1  # q, k, v, out, fc1, fc2 per layer, the projector
    for name in matrices:  # the grid validate's reference uses is the package's, exactly
        assert torch.equal(stored[name], sim[name]), name
        assert not torch.equal(sim[name], dict(vision.named_parameters())[name])  # and it is a grid


def test_prefill_with_images_coreml_proxy_matches_eager(coreml_vision_bundle, image_files):
    """Two images through the Core ML proxy (each image block inside one full prefill chunk), then
    decode, against the fp32 eager model: fp16 proxy tolerances, the same greedy tokens."""
    from gemma3_export.chat import open_source, with_images
    from gemma3_export.generate import EagerRunner
    from gemma3_export.images import image_runs

    runner, tok = open_source(bundle=str(coreml_vision_bundle), vision=True)
    ids, images = with_images(tok.encode("Describe these."), runner, tok, image_files, False, chat=False)
    plan = runner.chunk_plan(len(ids), image_runs(ids, VCFG.image_token_index))
    starts = np.cumsum([0, *plan])
    assert sum(plan) == len(ids) and len(plan) > 3
    for a, b in image_runs(ids, VCFG.image_token_index):  # each block inside one prefill call of T = 8
        i = np.searchsorted(starts, a, side="right") - 1
        assert plan[i] == 8 and starts[i] + 8 >= b
    eager_runner, _ = open_source(model="tiny", context=64, vision=True, log=QUIET)
    _, ref_images = with_images(tok.encode("Describe these."), eager_runner, tok, image_files, False, chat=False)
    eager = EagerRunner(tiny_model(), max_context=64, chunk=8, image_token_id=VCFG.image_token_index)
    got, ref = runner.prefill(ids, images), eager.prefill(ids, ref_images)
    assert np.abs(got - ref).max() < 0.15 and got.argmax() == ref.argmax()
    for tok_id in (300, 301):
        got, ref = runner.decode(tok_id), eager.decode(tok_id)
        assert np.abs(got - ref).max() < 0.15 and got.argmax() == ref.argmax()


def test_coreml_chunk_plan_puts_each_image_in_one_full_chunk():
    from gemma3_export.errors import UserError
    from gemma3_export.runtimes.coreml import CoreMLRunner

    r = CoreMLRunner.__new__(CoreMLRunner)
    r.chunk = 8
    assert r.chunk_plan(20, [(3, 7)]) == [1, 1, 1, 8, 8, 1]  # the block starts a full chunk
    assert r.chunk_plan(12, [(8, 12)]) == [1, 1, 1, 1, 8]  # too few tokens follow: the chunk starts earlier
    assert r.chunk_plan(30, [(10, 14), (15, 19)]) == [1] * 7 + [8, 8, 7]  # ends before the next block
    assert r.chunk_plan(30, [(10, 13), (14, 17)]) == [8, 1, 1, 8, 8, 4]  # one chunk holds both blocks
    assert r.chunk_plan(10, []) == [8, 2]
    with pytest.raises(UserError, match="one full chunk of 8"):
        r.chunk_plan(6, [(1, 5)])


# -- validate: the vision artifact against the eager encoder -----------------------------------------


def test_validate_reports_the_et_vision_artifact(et_vision_bundle):
    from gemma3_export.validate import validate_bundle

    summary = validate_bundle(et_vision_bundle, log=QUIET)
    v = summary["vision"]
    assert summary["passed"] and v["passed"] and v["reference"] == "float"
    assert v["max_abs"] <= 1e-4 and v["min_cosine"] > 0.99999 and v["images"] == 2
    assert read_bundle(et_vision_bundle).manifest["validation"]["vision"]["max_abs"] == v["max_abs"]


def test_validate_judges_an_onnx_int8_vision_artifact(tmp_path):
    """An ONNX int8 bundle's vision.onnx against the eager encoder on its grid; another encoder in its
    place fails, and the report says why."""
    from gemma3_export.exporters.onnx import export_vision
    from gemma3_export.validate import validate_vision

    out = pipeline.export(model="tiny", target="onnx", quant="int8", context=64, chunk=8, out=tmp_path / "b",
                          vision=True, validate=False, log=QUIET)
    report = validate_vision(read_bundle(out), log=QUIET)
    assert report["passed"] and report["reference"] == "same grid" and report["max_rel"] <= 1e-4
    export_vision(tiny_vision(seed=1), tmp_path, "int8", log=QUIET)  # a different encoder in the bundle's place
    (out / "vision.onnx").write_bytes((tmp_path / "vision.onnx").read_bytes())
    bad = validate_vision(read_bundle(out), log=QUIET)
    assert not bad["passed"] and bad["max_rel"] > 0.1 and "of the output scale" in bad["failures"][0]


def test_validate_vision_of_a_coreml_bundle_runs_the_fp16_proxy(coreml_vision_bundle):
    from gemma3_export.runtimes.coreml import PROXY_NOTE
    from gemma3_export.validate import validate_vision

    report = validate_vision(read_bundle(coreml_vision_bundle), log=QUIET)
    assert report["passed"] and report["reference"] == "fp16" and report["runtime"] == PROXY_NOTE
    assert 0 < report["max_rel"] < PROXY_REL and report["min_cosine"] > 0.9999


# -- bad input ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("argv,message", [
    (("--model", "tiny", "--target", "executorch", "--vision", "--quant", "8da4w"), "takes --quant fp32, 8da8w"),
    (("--model", "tiny", "--target", "coreml", "--vision", "--quant", "int4"), "takes --quant fp16, fp32, int8"),
])
def test_unsupported_vision_exports_are_one_sentence(capsys, argv, message):
    from gemma3_export.cli import main

    code = main(list(argv))
    err = capsys.readouterr().err
    assert code == 2 and message in err and err.count("\n") == 1 and "Traceback" not in err
