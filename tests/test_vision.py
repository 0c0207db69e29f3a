"""Vision (issue 8): the SigLIP encoder + projector, Pan & Scan and the multimodal prefill against
transformers' Gemma3ForConditionalGeneration and Gemma3ImageProcessor (Pillow backend), on the tiny
multimodal preset with seeded random weights."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from gemma3_export.config import VISION_PRESETS, preset
from gemma3_export.images import PanAndScan, image_block, image_pixels, pan_and_scan_boxes
from gemma3_export.weights import build_vision, random_vision_state

from conftest import tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")
VCFG = VISION_PRESETS["tiny"]


def tiny_vision(seed: int = 0):
    return build_vision(VCFG, preset("tiny").hidden_size, random_vision_state(VCFG, preset("tiny").hidden_size, seed), "random")


def hf_multimodal(text, vision):
    """transformers' Gemma3ForConditionalGeneration holding the same weights."""
    from transformers import Gemma3Config as HFConfig, Gemma3ForConditionalGeneration

    hf = Gemma3ForConditionalGeneration(HFConfig(**VCFG.to_hf(text.config))).eval()
    state = {f"model.language_model.{k.removeprefix('model.')}": v for k, v in text.state_dict().items() if k != "lm_head.weight"}
    state |= {f"model.{k.replace('vision_model.', '')}": v for k, v in vision.state_dict().items()}
    state["lm_head.weight"] = text.lm_head.weight
    hf.load_state_dict(state, strict=True)
    hf.model.language_model.embed_tokens.embed_scale.fill_(text.config.embed_scale)
    return hf


@pytest.fixture(scope="module")
def pair():
    text, vision = tiny_model(), tiny_vision()
    return text, vision, hf_multimodal(text, vision)


def pixels(n: int, seed: int = 3) -> torch.Tensor:
    s = VCFG.vision_config.image_size
    return torch.rand(n, 3, s, s, generator=torch.Generator().manual_seed(seed)) * 2 - 1


# -- encoder + projector -----------------------------------------------------------------------------


def test_encoder_and_projector_match_transformers(pair):
    _, vision, hf = pair
    x = pixels(2)
    with torch.no_grad():
        ours = vision(x)
        ref = hf.model.get_image_features(x, return_dict=True).pooler_output
    assert ours.shape == (2, VCFG.mm_tokens_per_image, preset("tiny").hidden_size)
    assert (ours - ref).abs().max().item() <= 1e-4
    assert ours.abs().max().item() > 0.1  # not trivially zero


def test_vision_weights_load_strictly():
    from gemma3_export.errors import UserError

    state = random_vision_state(VCFG, 64)
    state.pop("multi_modal_projector.mm_soft_emb_norm.weight")
    with pytest.raises(UserError, match="missing multi_modal_projector.mm_soft_emb_norm.weight"):
        build_vision(VCFG, 64, state, "x")


# -- preprocessing and Pan & Scan ---------------------------------------------------------------


def _hf_processor(size: int):
    from transformers.models.gemma3.image_processing_pil_gemma3 import Gemma3ImageProcessorPil

    return Gemma3ImageProcessorPil(
        size={"height": size, "width": size}, image_mean=[0.5] * 3, image_std=[0.5] * 3, do_pan_and_scan=True,
        pan_and_scan_min_crop_size=256, pan_and_scan_max_num_crops=4, pan_and_scan_min_ratio_to_activate=1.2,
    )


def _image(w: int, h: int, mode: str = "RGB", seed: int = 0):
    from PIL import Image

    bands = len(mode)
    arr = np.random.default_rng(seed).integers(0, 256, (h, w, bands), dtype=np.uint8)
    return Image.fromarray(arr if bands > 1 else arr[..., 0], mode=mode)


@pytest.mark.parametrize("w,h,crops", [(1000, 300, 3), (300, 1100, 4), (640, 640, 0), (700, 600, 0),
                                       (1900, 260, 4), (600, 300, 2), (400, 300, 0)])
def test_pan_and_scan_matches_transformers(w, h, crops):
    """Wide, tall, square and barely-elongated images: the same crops, the same pixels (896 x 896)."""
    img = _image(w, h)
    ref = _hf_processor(896)(img, return_tensors="np")
    ours = image_pixels(img, 896, PanAndScan())
    assert int(ref["num_crops"][0]) == crops == len(pan_and_scan_boxes(w, h, PanAndScan()))
    assert ours.shape == ref["pixel_values"].shape == (1 + crops, 3, 896, 896)
    np.testing.assert_allclose(ours, ref["pixel_values"], atol=1e-6, rtol=0)


def test_preprocessing_composites_transparency_on_white_like_transformers():
    img = _image(50, 30, "RGBA", seed=1)
    ref = _hf_processor(28)(img, do_pan_and_scan=False, return_tensors="np")["pixel_values"]
    np.testing.assert_allclose(image_pixels(img, 28), ref, atol=1e-6, rtol=0)


def test_the_prompt_block_has_markers_around_the_soft_tokens():
    block = image_block(VCFG, [9])
    n = VCFG.mm_tokens_per_image
    assert block == [9, VCFG.boi_token_index, *[VCFG.image_token_index] * n, VCFG.eoi_token_index, 9]


# -- the multimodal prefill ----------------------------------------------------------------------------

NEWLINES = [108 % 512]  # any text id stands for "\n\n" here; tokenization is not under test


def mm_prompt(n_images: int, text: int = 7, seed: int = 5) -> list[int]:
    """bos, text, then per image a block and more text: long enough to cross the window of 8 often."""
    rng = np.random.default_rng(seed)
    words = lambda: rng.integers(110, 500, text).tolist()  # noqa: E731
    ids = [2, *words()]
    for _ in range(n_images):
        ids += image_block(VCFG, NEWLINES) + words()
    return ids


def hf_logits(hf, ids: list[int], px: torch.Tensor) -> torch.Tensor:
    t = torch.tensor([ids])
    with torch.no_grad():
        return hf(input_ids=t, pixel_values=px, token_type_ids=(t == VCFG.image_token_index).long()).logits[0]


@pytest.mark.parametrize("n_images", [1, 2])
def test_full_sequence_logits_with_images_match_transformers(pair, n_images):
    text, vision, hf = pair
    ids, px = mm_prompt(n_images), pixels(n_images, seed=n_images)
    with torch.no_grad():
        emb = vision(px).reshape(-1, text.config.hidden_size)
        t = torch.tensor([ids])
        embeds = torch.zeros(1, len(ids), text.config.hidden_size)
        embeds[t == VCFG.image_token_index] = emb
        ours = text(t, image_embeds=embeds)[0]
    ref = hf_logits(hf, ids, px)
    assert len(ids) > 2 * text.config.sliding_window
    assert (ours - ref).abs().max().item() <= 1e-4
    # the bidirectional block matters: without it the logits differ
    text_only = hf(input_ids=t, pixel_values=px).logits[0].detach()
    assert (text_only - ref).abs().max().item() > 1e-3


@pytest.mark.parametrize("n_images,chunk", [(1, 8), (2, 8), (2, 5), (2, 4)])
def test_chunked_prefill_and_decode_with_images_match_transformers(pair, n_images, chunk):
    """Ring caches across chunk boundaries: prompts of 2.5-4 windows, chunks that would cut a block
    (the plan ends them before it), then decode steps; every step's logits against transformers'
    full forward over the same sequence."""
    from gemma3_export.generate import EagerRunner

    text, vision, hf = pair
    ids, px = mm_prompt(n_images), pixels(n_images, seed=n_images)
    runner = EagerRunner(text, max_context=64, chunk=chunk, image_token_id=VCFG.image_token_index)
    with torch.no_grad():
        images = vision(px).numpy()
    from gemma3_export.images import image_runs

    plan = runner.chunk_plan(len(ids), image_runs(ids, VCFG.image_token_index))
    assert sum(plan) == len(ids) and len(plan) > 2
    logits = runner.prefill(ids, images)
    extra = [300, 301, 302]
    ref = hf_logits(hf, ids + extra, px)
    np.testing.assert_allclose(logits, ref[len(ids) - 1].numpy(), atol=1e-4, rtol=0)
    for i, tok in enumerate(extra):
        np.testing.assert_allclose(runner.decode(tok), ref[len(ids) + i].numpy(), atol=1e-4, rtol=0)


def test_chunk_plan_never_cuts_an_image_block():
    from gemma3_export.errors import UserError
    from gemma3_export.generate import Runner

    r = Runner()
    r.chunk = 4
    assert r.chunk_plan(12, [(3, 7)]) == [3, 4, 4, 1]
    assert r.chunk_plan(12, [(4, 8)]) == [4, 4, 4]
    with pytest.raises(UserError, match="does not fit the prefill chunk of 4"):
        r.chunk_plan(12, [(2, 7)])


def test_images_to_a_text_only_runner_are_refused(tiny):
    from gemma3_export.errors import UserError
    from gemma3_export.generate import EagerRunner

    runner = EagerRunner(tiny, max_context=32, chunk=8)
    with pytest.raises(UserError, match="reads text only"):
        runner.prefill(mm_prompt(1), np.zeros((1, 4, 64), np.float32))


def test_vision_weights_load_from_a_transformers_folder(pair, tmp_path):
    from gemma3_export.weights import load_vision_state

    text, vision, hf = pair
    hf.save_pretrained(tmp_path)
    state = load_vision_state(tmp_path)
    loaded = build_vision(VCFG, 64, state, str(tmp_path))
    for k, v in vision.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k


# -- export: vision.onnx and a decoder that takes image_embeds ------------------------------------------


@pytest.fixture(scope="session")
def vision_bundle(tmp_path_factory):
    """A tiny fp32 ONNX bundle exported with --vision (the user's path), once per session."""
    from gemma3_export import pipeline

    out = tmp_path_factory.mktemp("tiny-onnx-vision") / "bundle"
    return pipeline.export(model="tiny", target="onnx", context=64, chunk=8, out=out, vision=True,
                           validate=False, log=lambda *_: None)


@pytest.fixture(scope="module")
def image_files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("images")
    _image(90, 40, seed=1).save(folder / "wide.png")
    _image(30, 30, seed=2).save(folder / "square.jpg")
    return [str(folder / "wide.png"), str(folder / "square.jpg")]


def test_the_vision_bundle_describes_both_artifacts(vision_bundle):
    from gemma3_export.bundle import read_bundle

    m = read_bundle(vision_bundle, verify=True).manifest
    v = m["vision"]
    assert v["artifact"] in m["files"] and v["mm_tokens_per_image"] == 4 and v["image_token_id"] == 262144
    assert [i["name"] for i in v["inputs"]] == ["pixels"] and v["outputs"][0]["shape"] == ["N", 4, 64]
    assert m["inputs"][-1] == {"name": "image_embeds", "shape": [1, "T", 64], "dtype": "float32"}


def test_vision_onnx_matches_eager(vision_bundle):
    from gemma3_export.bundle import read_bundle
    from gemma3_export.runtimes.onnx import OnnxVisionEncoder

    x = pixels(3, seed=7)
    with torch.no_grad():
        ref = tiny_vision()(x).numpy()  # the bundle's encoder: the same seeded weights
    got = OnnxVisionEncoder.from_bundle(read_bundle(vision_bundle))(x.numpy())
    np.testing.assert_allclose(got, ref, atol=1e-4, rtol=0)


@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_quantized_vision_onnx_matches_its_grid(tmp_path, scheme):
    from gemma3_export.exporters.onnx import export_vision, simulate_vision
    from gemma3_export.runtimes.onnx import OnnxVisionEncoder

    vision, x = tiny_vision(), pixels(2, seed=8)
    info = export_vision(vision, tmp_path, scheme, log=lambda *_: None)
    got = OnnxVisionEncoder(tmp_path / info["artifact"])(x.numpy())
    with torch.no_grad():
        grid, full = simulate_vision(vision, scheme)(x).numpy(), vision(x).numpy()
    np.testing.assert_allclose(got, grid, atol=1e-4, rtol=0)  # exactly the grid it claims
    rel = np.abs(got - full).max() / np.abs(full).max()
    assert rel < (0.02 if scheme == "int8" else 0.2) and rel > 0  # and it is quantized
    fp32 = sum(t.numel() * 4 for t in vision.state_dict().values())
    assert info["weight_bytes"] < fp32 * (0.5 if scheme == "int8" else 0.4)


def test_prefill_with_images_onnx_matches_eager(vision_bundle, image_files, pair):
    """Two images, a prompt of ~5 windows through chunks of 8 on both runners, then decode."""
    from gemma3_export.chat import open_source, with_images
    from gemma3_export.generate import EagerRunner

    runner, tok = open_source(bundle=str(vision_bundle), vision=True)
    ids, images = with_images(tok.encode("Describe these."), runner, tok, image_files, False, chat=False)
    text = pair[0]
    eager = EagerRunner(text, max_context=64, chunk=8, image_token_id=VCFG.image_token_index)
    with torch.no_grad():
        ref_images = tiny_vision()(torch.from_numpy(
            np.concatenate([image_pixels(__import__("PIL.Image").Image.open(f), 28) for f in image_files]))).numpy()
    np.testing.assert_allclose(images, ref_images, atol=1e-4, rtol=0)
    np.testing.assert_allclose(runner.prefill(ids, images), eager.prefill(ids, ref_images), atol=1e-4, rtol=0)
    for tok_id in (300, 301):
        np.testing.assert_allclose(runner.decode(tok_id), eager.decode(tok_id), atol=1e-4, rtol=0)


def test_generate_with_an_image_bundle_matches_eager(vision_bundle, image_files, capsys):
    from gemma3_export.chat import generate_text

    quiet = lambda *_: None  # noqa: E731
    kw = dict(prompt="What is it?", image=image_files[:1], pan_and_scan=True, max_new_tokens=6, chat=True, log=quiet)
    assert generate_text(bundle=str(vision_bundle), **kw) == generate_text(model="tiny", context=64, **kw)


# -- bad input: one sentence, exit status 2 --------------------------------------------------------------


def _cli(capsys, *argv):
    from gemma3_export.cli import main

    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, err


@pytest.mark.parametrize("content,message", [(b"", "is empty"), (b"not an image at all", "not an image Pillow can read")])
def test_bad_image_files_are_one_sentence(capsys, tmp_path, content, message):
    bad = tmp_path / "bad.png"
    bad.write_bytes(content)
    code, err = _cli(capsys, "generate", "--model", "tiny", "--prompt", "x", "--image", str(bad))
    assert code == 2 and message in err and "Traceback" not in err and err.count("\n") == 1


def test_huge_and_zero_size_images_are_refused(tmp_path):
    import struct
    import zlib

    from gemma3_export.errors import UserError
    from gemma3_export.images import load_image

    def png(w, h):  # a valid header is all Pillow reads before the size check
        ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
        chunk = lambda t, d: struct.pack(">I", len(d)) + t + d + struct.pack(">I", zlib.crc32(t + d))  # noqa: E731
        return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b"")

    (tmp_path / "huge.png").write_bytes(png(20000, 20000))
    (tmp_path / "zero.png").write_bytes(png(0, 10))
    (tmp_path / "large.png").write_bytes(png(10000, 6000))  # under Pillow's own limit, over ours
    for name in ("huge.png", "large.png"):
        with pytest.raises(UserError, match="more than the 50,000,000 pixels"):
            load_image(tmp_path / name)
    with pytest.raises(UserError, match="zero-size|not an image|damaged"):
        load_image(tmp_path / "zero.png")


@pytest.mark.parametrize("argv", [
    ("generate", "--model", "1b", "--random-weights", "--prompt", "x", "--image", "{img}"),
    ("--model", "270m", "--target", "onnx", "--vision"),
    ("--model", "1b", "--target", "onnx", "--vision", "--random-weights"),
    ("--model", "tiny", "--target", "onnx", "--vision", "--chunk", "2"),
])
def test_images_for_text_only_models_are_one_sentence(capsys, image_files, argv):
    code, err = _cli(capsys, *[a.format(img=image_files[0]) for a in argv])
    assert code == 2 and err.count("\n") == 1 and "Traceback" not in err
    assert "reads text only" in err or "at least 4" in err


def test_an_image_to_a_text_only_bundle_is_one_sentence(capsys, tiny_bundle_of, image_files):
    code, err = _cli(capsys, "generate", "--bundle", str(tiny_bundle_of("onnx")), "--prompt", "x", "--image", image_files[0])
    assert code == 2 and "exported without --vision" in err and err.count("\n") == 1
