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
