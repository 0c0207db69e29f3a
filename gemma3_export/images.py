"""Images in: reading a file, Pan & Scan, and preprocessing to the encoder's pixels, exactly as
transformers' Gemma3ImageProcessor (its Pillow backend) does it; and the prompt's image blocks.

Per image: convert to RGB (transparency composited on white), optionally cut Pan & Scan crops from the
original, resize each (the whole image first, then the crops) to `image_size` square with Pillow's
bilinear filter on uint8, rescale by 1/255, normalize with mean = std = 0.5.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .config import VisionConfig
from .errors import UserError

MAX_PIXELS = 50_000_000  # larger images are refused (a decompression bomb or a mistake), see load_image
MIN_SIDE = 1


@dataclass(frozen=True)
class PanAndScan:
    """transformers' `pan_and_scan_*` options (Gemma 3's processor_config.json values)."""

    min_crop_size: int = 256
    max_num_crops: int = 4
    min_ratio_to_activate: float = 1.2


def load_image(path: str | Path):
    """An RGB Pillow image; a non-image, empty or huge file is one sentence (UserError)."""
    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    if not path.is_file():
        raise UserError(f"No image file at {path}.")
    if path.stat().st_size == 0:
        raise UserError(f"{path} is empty, not an image.")
    try:
        with Image.open(path) as img:
            w, h = img.size
            if w < MIN_SIDE or h < MIN_SIDE:
                raise UserError(f"{path} is a zero-size image ({w}x{h}).")
            if w * h > MAX_PIXELS:
                raise UserError(f"{path} is {w}x{h}: it has more than the {MAX_PIXELS:,} pixels this tool reads.")
            img.load()
            return to_rgb(img)
    except Image.DecompressionBombError:  # Pillow refuses at open past ~179 megapixels
        raise UserError(f"{path} has more than the {MAX_PIXELS:,} pixels this tool reads.") from None
    except UnidentifiedImageError as e:
        raise UserError(f"{path} is not an image Pillow can read ({type(e).__name__}).") from None
    except (OSError, SyntaxError, ValueError) as e:  # truncated or damaged files
        raise UserError(f"{path} is a damaged image ({e}).") from None


def to_rgb(img):
    """RGB, with any transparency composited onto white (transformers' convert_to_rgb)."""
    from PIL import Image

    if "A" in img.getbands() or img.info.get("transparency") is not None:
        rgba = img.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba).convert("RGB")
    return img.convert("RGB")


def pan_and_scan_boxes(width: int, height: int, pas: PanAndScan) -> list[tuple[int, int, int, int]]:
    """Crop boxes (left, top, right, bottom) along the long side; [] when the image is not elongated
    enough or the crops would be smaller than `min_crop_size` (Gemma3ImageProcessor.pan_and_scan)."""
    long, short = max(width, height), min(width, height)
    if long / short < pas.min_ratio_to_activate:
        return []
    n = int(math.floor(long / short + 0.5))  # half rounds up
    n = min(int(math.floor(long / pas.min_crop_size)), n)
    n = min(pas.max_num_crops, max(2, n))
    n_w, n_h = (n, 1) if width >= height else (1, n)
    crop_w, crop_h = int(math.ceil(width / n_w)), int(math.ceil(height / n_h))
    if min(crop_w, crop_h) < pas.min_crop_size:
        return []
    return [
        (x, y, min(x + crop_w, width), min(y + crop_h, height))
        for y, x in itertools.product(range(0, crop_h * n_h, crop_h), range(0, crop_w * n_w, crop_w))
    ]


def preprocess(img, size: int) -> np.ndarray:
    """One RGB image -> float32 [3, size, size]: bilinear resize of the uint8 pixels, /255, (x-0.5)/0.5."""
    from PIL import Image

    resized = np.asarray(img.resize((size, size), resample=Image.BILINEAR))  # [H, W, 3] uint8
    x = (resized.astype(np.float64) * (1 / 255)).astype(np.float32)
    x = (x - np.float32(0.5)) / np.float32(0.5)
    return np.ascontiguousarray(x.transpose(2, 0, 1))


def image_pixels(img, size: int, pan_and_scan: PanAndScan | None = None) -> np.ndarray:
    """float32 [1 + crops, 3, size, size]: the whole image, then its Pan & Scan crops (if asked)."""
    img = to_rgb(img)
    arr = np.asarray(img)
    boxes = pan_and_scan_boxes(img.width, img.height, pan_and_scan) if pan_and_scan else []
    from PIL import Image

    crops = [Image.fromarray(arr[t:b, l:r]) for l, t, r, b in boxes]
    return np.stack([preprocess(im, size) for im in [img, *crops]])


def image_block(config: VisionConfig, newline_ids: list[int]) -> list[int]:
    """One image in the prompt: `\\n\\n<start_of_image>` + soft tokens + `<end_of_image>\\n\\n`."""
    return [*newline_ids, config.boi_token_index, *[config.image_token_index] * config.mm_tokens_per_image,
            config.eoi_token_index, *newline_ids]


def image_runs(ids: list[int], image_token: int) -> list[tuple[int, int]]:
    """(start, end) of every maximal run of image soft tokens in `ids` (end exclusive)."""
    runs, start = [], None
    for i, t in enumerate([*ids, None]):
        if t == image_token and start is None:
            start = i
        elif t != image_token and start is not None:
            runs.append((start, i))
            start = None
    return runs


def vision_config_of(manifest_vision: dict) -> VisionConfig:
    """The VisionConfig a bundle's manifest `vision` entry describes."""
    from .config import SiglipVisionConfig

    v = manifest_vision
    return VisionConfig(vision_config=SiglipVisionConfig(**v["vision_config"]), mm_tokens_per_image=v["mm_tokens_per_image"],
                        image_token_index=v["image_token_id"], boi_token_index=v["boi_id"], eoi_token_index=v["eoi_id"])


def prompt_images(paths: list[str], config: VisionConfig, encode, tokenizer, pan_and_scan: bool = False) -> tuple[list[int], np.ndarray]:
    """Token ids for the images (one block each, and with Pan & Scan the crops' blocks after the
    processor's wording) and their embeddings [blocks, tokens, hidden] from `encode(pixels)`."""
    newline = tokenizer.encode("\n\n", bos=False)
    block = image_block(config, newline)
    pas = PanAndScan() if pan_and_scan else None
    ids, pixels = [], []
    for path in paths:
        px = image_pixels(load_image(path), config.vision_config.image_size, pas)
        pixels.append(px)
        if len(px) == 1:
            ids += block
        else:  # transformers' Gemma3Processor: the whole image, then its crops
            ids += tokenizer.encode("Here is the original image ", bos=False) + block
            ids += tokenizer.encode(" and here are some crops to help you see better ", bos=False)
            for i in range(1, len(px)):
                ids += (tokenizer.encode(" ", bos=False) if i > 1 else []) + block
    return ids, encode(np.concatenate(pixels))
