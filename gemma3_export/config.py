"""Gemma 3 text-decoder configuration: Hugging Face key names, presets, and both config.json spellings.

Preset numbers come from ../shared/reference/gemma3.json, which collects them from the Gemma 3 report
(arXiv 2503.19786), transformers' configs and Google's JAX configs.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import UserError

LOCAL, GLOBAL = "sliding_attention", "full_attention"


@dataclass(frozen=True)
class Gemma3Config:
    """The text decoder's hyper-parameters, spelled as in a Hugging Face `config.json`."""

    vocab_size: int = 262144
    hidden_size: int = 640
    intermediate_size: int = 2048
    num_hidden_layers: int = 18
    num_attention_heads: int = 4
    num_key_value_heads: int = 1
    head_dim: int = 256
    query_pre_attn_scalar: float = 256
    sliding_window: int = 512
    sliding_window_pattern: int = 6
    layer_types: tuple[str, ...] = ()
    rope_theta: float = 1_000_000.0
    rope_local_base_freq: float = 10_000.0
    rope_scaling_factor: float = 1.0  # linear scaling of global layers' positions (4b+: 8)
    max_position_embeddings: int = 32768
    rms_norm_eps: float = 1e-6
    hidden_activation: str = "gelu_pytorch_tanh"
    tie_word_embeddings: bool = True
    bos_token_id: int = 2
    eos_token_id: int = 1
    pad_token_id: int = 0
    # transformers rounds sqrt(hidden_size) to the checkpoint dtype (bf16: 25.25 for 640); llama.cpp
    # and ExecuTorch use the fp32 value. "bfloat16" follows transformers on bf16 checkpoints.
    embed_scale_dtype: str = "bfloat16"

    def __post_init__(self) -> None:
        if not self.layer_types:
            types = tuple(
                GLOBAL if (i + 1) % self.sliding_window_pattern == 0 else LOCAL
                for i in range(self.num_hidden_layers)
            )
            object.__setattr__(self, "layer_types", types)
        object.__setattr__(self, "layer_types", tuple(self.layer_types))
        if len(self.layer_types) != self.num_hidden_layers:
            raise UserError(
                f"The config lists {len(self.layer_types)} layer types for "
                f"{self.num_hidden_layers} layers."
            )
        unknown = set(self.layer_types) - {LOCAL, GLOBAL}
        if unknown:
            raise UserError(f"The config has unknown layer types {sorted(unknown)}.")

    def is_local(self, layer: int) -> bool:
        return self.layer_types[layer] == LOCAL

    @property
    def embed_scale(self) -> float:
        """sqrt(hidden_size), rounded through `embed_scale_dtype` as transformers does."""
        import torch

        scale = torch.tensor(self.hidden_size**0.5, dtype=getattr(torch, self.embed_scale_dtype), device="cpu")
        return float(scale.float())

    def replace(self, **changes: Any) -> Gemma3Config:
        if "num_hidden_layers" in changes and "layer_types" not in changes:
            changes["layer_types"] = ()
        return dataclasses.replace(self, **changes)

    # -- Hugging Face config.json --------------------------------------------------------------

    @classmethod
    def from_hf(cls, source: str | Path | dict) -> Gemma3Config:
        """Read a transformers config (a `config.json` path or its dict).

        Accepts the older spelling (`rope_local_base_freq`, `sliding_window_pattern`, `rope_scaling`)
        and the newer one (`layer_types`, `rope_parameters`), text-only and multimodal
        (`text_config`) layouts. Unknown keys are ignored.
        """
        if isinstance(source, dict):
            raw = source
        else:
            path = Path(source)
            try:
                raw = json.loads(path.read_text())
            except FileNotFoundError:
                raise UserError(f"No config file at {path}.") from None
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise UserError(f"{path} is not valid JSON ({e}).") from None
        if "text_config" in raw:  # Gemma3ForConditionalGeneration
            raw = {**raw["text_config"], "model_type": raw["text_config"].get("model_type")}
        if raw.get("model_type") not in (None, "gemma3_text", "gemma3"):
            raise UserError(f"The config is for model_type {raw.get('model_type')!r}, not Gemma 3.")
        names = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: v for k, v in raw.items() if k in names and v is not None}
        if "_sliding_window_pattern" in raw:
            kwargs.setdefault("sliding_window_pattern", raw["_sliding_window_pattern"])
        kwargs.update(_rope_from_hf(raw))
        # head_dim is never derived from hidden_size / num_attention_heads (1b: 1152 / 4 != 256).
        missing = [k for k in ("hidden_size", "num_hidden_layers", "head_dim") if k not in kwargs]
        if missing:
            raise UserError(f"The config lacks {', '.join(missing)}.")
        if isinstance(kwargs.get("eos_token_id"), list):
            kwargs["eos_token_id"] = kwargs["eos_token_id"][0]
        kwargs["layer_types"] = tuple(raw.get("layer_types") or ())
        return cls(**kwargs)

    def to_hf(self) -> dict:
        """The config as transformers' `Gemma3TextConfig` reads it (newer spelling)."""
        out = {
            "architectures": ["Gemma3ForCausalLM"],
            "model_type": "gemma3_text",
            **{
                f.name: getattr(self, f.name)
                for f in dataclasses.fields(self)
                if f.name
                not in ("rope_theta", "rope_local_base_freq", "rope_scaling_factor", "embed_scale_dtype")
            },
        }
        out["layer_types"] = list(self.layer_types)
        out["rope_parameters"] = {
            LOCAL: {"rope_type": "default", "rope_theta": self.rope_local_base_freq},
            GLOBAL: (
                {"rope_type": "default", "rope_theta": self.rope_theta}
                if self.rope_scaling_factor == 1.0
                else {"rope_type": "linear", "rope_theta": self.rope_theta, "factor": self.rope_scaling_factor}
            ),
        }
        out["final_logit_softcapping"] = None
        out["attn_logit_softcapping"] = None
        return out


def _rope_from_hf(raw: dict) -> dict:
    out: dict[str, Any] = {}
    params = raw.get("rope_parameters")
    if isinstance(params, dict) and GLOBAL in params:  # newer: per layer type
        out["rope_theta"] = params[GLOBAL].get("rope_theta", 1_000_000.0)
        out["rope_local_base_freq"] = params.get(LOCAL, {}).get("rope_theta", 10_000.0)
        if params[GLOBAL].get("rope_type", "default") == "linear":
            out["rope_scaling_factor"] = float(params[GLOBAL]["factor"])
        return out
    scaling = raw.get("rope_scaling")  # older: one scaling dict for the global layers
    if isinstance(scaling, dict) and scaling.get("rope_type", scaling.get("type")) == "linear":
        out["rope_scaling_factor"] = float(scaling["factor"])
    return out


# -- presets ------------------------------------------------------------------------------------


def _preset(**kw: Any) -> Gemma3Config:
    return Gemma3Config(**kw)


PRESETS: dict[str, Gemma3Config] = {
    # For tests: a few MB, GQA (4 heads, 2 kv), head_dim 32 != 64 / 4, globals at layers 2 and 5
    # among local ones, window 8 so test sequences cross it several times.
    "tiny": _preset(
        vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=6,
        num_attention_heads=4, num_key_value_heads=2, head_dim=32, query_pre_attn_scalar=32,
        sliding_window=8, sliding_window_pattern=3, max_position_embeddings=128,
    ),
    # gemma3.json text_configs (Gemma 3 report, HF google/gemma-3-*-pt config.json).
    "270m": _preset(
        hidden_size=640, intermediate_size=2048, num_hidden_layers=18, num_attention_heads=4,
        num_key_value_heads=1, head_dim=256, query_pre_attn_scalar=256, sliding_window=512,
    ),
    "1b": _preset(
        hidden_size=1152, intermediate_size=6912, num_hidden_layers=26, num_attention_heads=4,
        num_key_value_heads=1, head_dim=256, query_pre_attn_scalar=256, sliding_window=512,
    ),
    "4b": _preset(
        vocab_size=262208, hidden_size=2560, intermediate_size=10240, num_hidden_layers=34,
        num_attention_heads=8, num_key_value_heads=4, head_dim=256, query_pre_attn_scalar=256,
        sliding_window=1024, rope_scaling_factor=8.0, max_position_embeddings=131072,
    ),
    "12b": _preset(
        vocab_size=262208, hidden_size=3840, intermediate_size=15360, num_hidden_layers=48,
        num_attention_heads=16, num_key_value_heads=8, head_dim=256, query_pre_attn_scalar=256,
        sliding_window=1024, rope_scaling_factor=8.0, max_position_embeddings=131072,
    ),
    "27b": _preset(
        vocab_size=262208, hidden_size=5376, intermediate_size=21504, num_hidden_layers=62,
        num_attention_heads=32, num_key_value_heads=16, head_dim=128, query_pre_attn_scalar=168,
        sliding_window=1024, rope_scaling_factor=8.0, max_position_embeddings=131072,
    ),
}


def preset(name: str) -> Gemma3Config:
    """The named preset; an unknown name lists the choices."""
    try:
        return PRESETS[name]
    except KeyError:
        raise UserError(f"Unknown model {name!r}; choose one of {', '.join(PRESETS)}.") from None


# -- vision (4b, 12b, 27b) ----------------------------------------------------------------------


@dataclass(frozen=True)
class SiglipVisionConfig:
    """The SigLIP image encoder's hyper-parameters, spelled as in `vision_config` of a Gemma 3
    `config.json` (transformers' `SiglipVisionConfig`)."""

    hidden_size: int = 1152
    intermediate_size: int = 4304
    num_hidden_layers: int = 27
    num_attention_heads: int = 16
    num_channels: int = 3
    image_size: int = 896
    patch_size: int = 14
    layer_norm_eps: float = 1e-6
    hidden_act: str = "gelu_pytorch_tanh"

    @property
    def patches_per_side(self) -> int:
        return self.image_size // self.patch_size


@dataclass(frozen=True)
class VisionConfig:
    """What a multimodal (`Gemma3ForConditionalGeneration`) checkpoint adds to the text decoder: the
    encoder, the number of soft tokens per image, and the image token ids (top-level config keys)."""

    vision_config: SiglipVisionConfig = SiglipVisionConfig()
    mm_tokens_per_image: int = 256
    image_token_index: int = 262144
    boi_token_index: int = 255999
    eoi_token_index: int = 256000

    def __post_init__(self) -> None:
        side = round(self.mm_tokens_per_image**0.5)
        patches = self.vision_config.patches_per_side
        if side * side != self.mm_tokens_per_image or patches % side:
            raise UserError(
                f"{self.mm_tokens_per_image} image tokens do not pool evenly from a {patches}x{patches} patch grid."
            )

    @classmethod
    def from_hf(cls, raw: dict) -> VisionConfig | None:
        """The vision part of a transformers config dict; None for a text-only config."""
        if "vision_config" not in raw:
            return None
        names = {f.name for f in dataclasses.fields(SiglipVisionConfig)}
        vision = SiglipVisionConfig(**{k: v for k, v in raw["vision_config"].items() if k in names})
        aliases = {"image_token_id": "image_token_index", "boi_token_id": "boi_token_index", "eoi_token_id": "eoi_token_index"}
        top = {aliases.get(k, k): v for k, v in raw.items()}
        keys = ("mm_tokens_per_image", "image_token_index", "boi_token_index", "eoi_token_index")
        return cls(vision_config=vision, **{k: top[k] for k in keys if top.get(k) is not None})

    def to_hf(self, text: Gemma3Config) -> dict:
        """A `Gemma3ForConditionalGeneration` config.json around the text decoder's."""
        return {
            "architectures": ["Gemma3ForConditionalGeneration"],
            "model_type": "gemma3",
            "text_config": text.to_hf(),
            "vision_config": {"model_type": "siglip_vision_model", "vision_use_head": False,
                              **dataclasses.asdict(self.vision_config)},
            "mm_tokens_per_image": self.mm_tokens_per_image,
            "image_token_index": self.image_token_index,
            "boi_token_index": self.boi_token_index,
            "eoi_token_index": self.eoi_token_index,
        }


_SIGLIP_896 = VisionConfig()  # gemma3.json vision_config: 4b, 12b and 27b share the 400M SigLIP encoder
VISION_PRESETS: dict[str, VisionConfig] = {
    # For tests: a 28x28 image in 7-pixel patches (4x4 grid) pooled 2x2 to 4 soft tokens, so an image
    # block (4 soft tokens + 4 markers) fits tiny's window of 8 and prompts with images cross it.
    # The markers take tiny's unused control ids; the soft token stays outside the 512-piece vocabulary
    # (transformers then looks up id 0 there, as for any out-of-vocabulary image id).
    "tiny": VisionConfig(
        vision_config=SiglipVisionConfig(
            hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
            image_size=28, patch_size=7,
        ),
        mm_tokens_per_image=4, boi_token_index=100, eoi_token_index=101,
    ),
    "4b": _SIGLIP_896,
    "12b": _SIGLIP_896,
    "27b": _SIGLIP_896,
}


def vision_preset(name: str) -> VisionConfig:
    """The named model's vision encoder; text-only sizes say so in one sentence."""
    preset(name)  # an unknown name lists the choices
    if name not in VISION_PRESETS:
        raise UserError(
            f"Gemma 3 {name} reads text only; images need one of {', '.join(VISION_PRESETS)}."
        )
    return VISION_PRESETS[name]
