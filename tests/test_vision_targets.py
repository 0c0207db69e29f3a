"""Vision (issue 8) on ExecuTorch: the tiny
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
    """8da4w-pc (int8 dynamic activations x per-channel int4 weights): vision.pte against the eager
    encoder quantized by the same torchao config; and it is really quantized (far from the float one)."""
    from gemma3_export.exporters.executorch import export_vision, simulate_vision
    from gemma3_export.runtimes.executorch import ExecuTorchVisionEncoder

    x = pixels(2, seed=8)
    float_vision = tiny_vision()
    with torch.no_grad():
        grid, full = simulate_vision(float_vision, "8da4w-pc")(x).numpy(), float_vision(x).numpy()
    info = export_vision(tiny_vision(), tmp_path, "8da4w-pc", log=QUIET)
    got = ExecuTorchVisionEncoder(tmp_path / info["artifact"])(x.numpy())
    scale = np.abs(full).max()
    assert np.abs(got - grid).max() <= 1e-3 * scale  # the grid it claims, up to activation rounding
    off = np.abs(got - full).max() / scale
    assert 0.01 < off < 0.3  # int4 weights: visibly quantized, still the same function


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


# -- bad input ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("argv,message", [
    (("--model", "tiny", "--target", "executorch", "--vision", "--quant", "8da4w"), "takes --quant fp32, 8da4w-pc, 8da8w"),
    (("--model", "tiny", "--target", "coreml", "--vision"), "so far, not coreml"),
])
def test_unsupported_vision_exports_are_one_sentence(capsys, argv, message):
    from gemma3_export.cli import main

    code = main(list(argv))
    err = capsys.readouterr().err
    assert code == 2 and message in err and err.count("\n") == 1 and "Traceback" not in err
