"""Weights in and out: Hugging Face folders (safetensors, sharded, text-only or multimodal naming),
GGUF files through the `gguf` package, and seeded random initialisation.

Every loader returns a state dict in `Gemma3ForCausalLM` naming and goes through `load_strict`, which
names any missing, unexpected or mis-shaped tensor.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import torch

from .config import Gemma3Config, VisionConfig
from .errors import UserError
from .model import Gemma3ForCausalLM

# Multimodal checkpoints: the text decoder under one of these prefixes (older and newer transformers).
_TEXT_PREFIXES = ("language_model.model.", "model.language_model.", "language_model.")
# Multimodal checkpoints also hold the vision tower and projector; the text model does not load them.
_VISION_PREFIXES = ("vision_tower.", "multi_modal_projector.", "model.vision_tower.", "model.multi_modal_projector.")


def expected_shapes(config: Gemma3Config) -> dict[str, torch.Size]:
    """Parameter names and shapes of the text model (the tied LM head is not a separate tensor)."""
    with torch.device("meta"):
        model = Gemma3ForCausalLM(config)
    return {k: v.shape for k, v in model.state_dict().items() if k != "lm_head.weight"}


def load_strict(model: Gemma3ForCausalLM, state: dict[str, torch.Tensor], source: str) -> None:
    """Load `state` into `model`, naming any missing, unexpected or mis-shaped tensor."""
    expected = expected_shapes(model.config)
    state = {k: v for k, v in state.items() if k != "lm_head.weight"}  # tied to the embedding
    problems = []
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing:
        problems.append(f"missing {_names(missing)}")
    if unexpected:
        problems.append(f"unexpected {_names(unexpected)}")
    shaped = [
        f"{k} is {tuple(state[k].shape)}, the config needs {tuple(s)}"
        for k, s in expected.items()
        if k in state and state[k].shape != s
    ]
    if shaped:
        more = f" and {len(shaped) - 3} more" if len(shaped) > 3 else ""
        problems.append("mis-shaped " + "; ".join(shaped[:3]) + more)
    if problems:
        raise UserError(f"{source} does not match the config: {'; '.join(problems)}.")
    model.load_state_dict(state, strict=False, assign=True)
    model.lm_head.weight = model.model.embed_tokens.weight


def _names(keys: list[str]) -> str:
    return ", ".join(keys[:4]) + (f" and {len(keys) - 4} more" if len(keys) > 4 else "")


# -- random ---------------------------------------------------------------------------------------


def random_state(config: Gemma3Config, seed: int = 0) -> dict[str, torch.Tensor]:
    """Seeded random weights with the scale of a trained Gemma (norm gains not all zero)."""
    gen = torch.Generator().manual_seed(seed)
    state = {}
    for name, shape in expected_shapes(config).items():
        std = 0.3 if "norm" in name else (1.0 if "embed" in name else 0.02)
        state[name] = torch.randn(shape, generator=gen) * std
    return state


# -- Hugging Face folders -------------------------------------------------------------------------


def load_hf_state(folder: Path) -> dict[str, torch.Tensor]:
    """Read all safetensors of a folder (single file or sharded index) into `Gemma3ForCausalLM` names."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    state = {}
    for f in _safetensors_files(folder):
        try:
            state.update(load_file(f))
        except (SafetensorError, OSError, ValueError) as e:
            raise UserError(f"{f} is not a readable safetensors file ({e}).") from None
    return _text_names(state)


def _safetensors_files(folder: Path) -> list[Path]:
    index = folder / "model.safetensors.index.json"
    if index.exists():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        files = [folder / s for s in shards]
    else:
        files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise UserError(f"{folder} has no .safetensors files.")
    for f in files:
        if not f.exists():
            raise UserError(f"The shard {f.name} listed in {index.name} is missing from {folder}.")
    return files


def load_vision_state(folder: Path) -> dict[str, torch.Tensor]:
    """Only the vision tower and projector of a multimodal folder, in `vision.Gemma3Vision` names."""
    from safetensors import SafetensorError, safe_open

    state = {}
    for f in _safetensors_files(folder):
        try:
            with safe_open(f, framework="pt") as st:
                for name in st.keys():
                    if name.startswith(_VISION_PREFIXES):
                        state[vision_name(name)] = st.get_tensor(name).float()
        except (SafetensorError, OSError, ValueError) as e:
            raise UserError(f"{f} is not a readable safetensors file ({e}).") from None
    if not state:
        raise UserError(f"{folder} holds no vision tower: it is a text-only checkpoint.")
    return state


def vision_name(name: str) -> str:
    """Checkpoint name -> `vision.Gemma3Vision` name: `model.` dropped, and the `vision_model.` level
    that transformers 5 leaves out of `vision_tower` put back (Google's files keep it)."""
    name = name.removeprefix("model.")
    if name.startswith("vision_tower.") and not name.startswith("vision_tower.vision_model."):
        name = "vision_tower.vision_model." + name.removeprefix("vision_tower.")
    return name


def vision_shapes(config: VisionConfig, text_hidden: int) -> dict[str, torch.Size]:
    from .vision import Gemma3Vision

    with torch.device("meta"):
        model = Gemma3Vision(config, text_hidden)
    return {k: v.shape for k, v in model.state_dict().items()}


def random_vision_state(config: VisionConfig, text_hidden: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """Seeded random encoder and projector weights (LayerNorm gains near 1, RMSNorm gains near 0)."""
    gen = torch.Generator().manual_seed(seed + 1)
    state = {}
    for name, shape in vision_shapes(config, text_hidden).items():
        t = torch.randn(shape, generator=gen)
        if "layer_norm" in name or "layernorm" in name:
            t = (1.0 + 0.1 * t) if name.endswith("weight") else 0.02 * t
        else:
            t = t * (0.3 if "norm" in name else 0.02)
        state[name] = t
    return state


def build_vision(config: VisionConfig, text_hidden: int, state: dict[str, torch.Tensor], source: str):
    """The encoder and projector with `state` loaded strictly (missing, unexpected, mis-shaped named)."""
    from .vision import Gemma3Vision

    expected = vision_shapes(config, text_hidden)
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    shaped = [f"{k} is {tuple(state[k].shape)}, the config needs {tuple(s)}"
              for k, s in expected.items() if k in state and state[k].shape != s]
    problems = ([f"missing {_names(missing)}"] if missing else []) + (
        [f"unexpected {_names(unexpected)}"] if unexpected else []) + (
        ["mis-shaped " + "; ".join(shaped[:3])] if shaped else [])
    if problems:
        raise UserError(f"The vision tower of {source} does not match the config: {'; '.join(problems)}.")
    with torch.device("meta"):
        model = Gemma3Vision(config, text_hidden)
    model.load_state_dict(state, strict=True, assign=True)
    return model.eval().requires_grad_(False)


def _text_names(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for name, t in state.items():
        if name.startswith(_VISION_PREFIXES):
            continue
        for prefix in _TEXT_PREFIXES:
            if name.startswith(prefix):
                name = "model." + name[len(prefix):]
                break
        out[name] = t.float()
    return out


def save_hf_folder(model: Gemma3ForCausalLM, folder: Path, dtype: torch.dtype = torch.float32) -> None:
    """Write config.json and model.safetensors as transformers writes a Gemma3ForCausalLM."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(model.config.to_hf(), indent=2))
    state = {k: v.detach().to(dtype).contiguous() for k, v in model.state_dict().items() if k != "lm_head.weight"}
    save_file(state, folder / "model.safetensors", metadata={"format": "pt"})


# -- GGUF -----------------------------------------------------------------------------------------

_GGUF_NAMES = {
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "attn_q_norm": "self_attn.q_norm", "attn_k_norm": "self_attn.k_norm",
    "attn_norm": "input_layernorm", "post_attention_norm": "post_attention_layernorm",
    "ffn_norm": "pre_feedforward_layernorm", "post_ffw_norm": "post_feedforward_layernorm",
    "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
}
_HF_NAMES = {v: k for k, v in _GGUF_NAMES.items()}


def gguf_to_hf_name(name: str) -> str | None:
    """`blk.3.attn_q.weight` -> `model.layers.3.self_attn.q_proj.weight` (None if not a text tensor)."""
    if name == "token_embd.weight":
        return "model.embed_tokens.weight"
    if name == "output_norm.weight":
        return "model.norm.weight"
    m = re.fullmatch(r"blk\.(\d+)\.(\w+)\.weight", name)
    if m and m.group(2) in _GGUF_NAMES:
        return f"model.layers.{m.group(1)}.{_GGUF_NAMES[m.group(2)]}.weight"
    return None


def open_gguf(path: Path):
    import gguf

    try:
        return gguf.GGUFReader(path)
    except FileNotFoundError:
        raise UserError(f"No GGUF file at {path}.") from None
    except Exception as e:  # gguf raises ValueError/struct.error/IndexError on damaged files
        raise UserError(f"{path} is not a readable GGUF file ({type(e).__name__}: {e}).") from None


def gguf_field(reader, key: str, default=None):
    field = reader.fields.get(key)
    if field is None:
        return default
    value = field.contents()
    return value


def config_from_gguf(reader, path: Path) -> Gemma3Config:
    arch = gguf_field(reader, "general.architecture")
    if arch != "gemma3":
        raise UserError(f"{path} holds a {arch!r} model, not Gemma 3 (general.architecture must be 'gemma3').")
    a = "gemma3."
    n_layers = int(gguf_field(reader, a + "block_count"))
    embd = next(t for t in reader.tensors if t.name == "token_embd.weight")
    kw = dict(
        vocab_size=int(embd.shape[1]),
        hidden_size=int(gguf_field(reader, a + "embedding_length")),
        intermediate_size=int(gguf_field(reader, a + "feed_forward_length")),
        num_hidden_layers=n_layers,
        num_attention_heads=int(gguf_field(reader, a + "attention.head_count")),
        num_key_value_heads=int(gguf_field(reader, a + "attention.head_count_kv")),
        head_dim=int(gguf_field(reader, a + "attention.key_length")),
        sliding_window=int(gguf_field(reader, a + "attention.sliding_window", 512)),
        rope_theta=float(gguf_field(reader, a + "rope.freq_base", 1e6)),
        rms_norm_eps=float(gguf_field(reader, a + "attention.layer_norm_rms_epsilon", 1e-6)),
        max_position_embeddings=int(gguf_field(reader, a + "context_length", 32768)),
        rope_scaling_factor=float(gguf_field(reader, a + "rope.scaling.factor", 1.0) or 1.0),
        # llama.cpp writes the fp32 sqrt(hidden_size) scale and stores no query_pre_attn_scalar:
        # Gemma 3 uses head_dim except 27b (hidden / heads = 168), which llama.cpp also derives.
        embed_scale_dtype="float32",
    )
    kw["query_pre_attn_scalar"] = (
        kw["hidden_size"] // kw["num_attention_heads"] if kw["hidden_size"] == 5376 else kw["head_dim"]
    )
    return Gemma3Config(**kw)


def load_gguf_state(reader, path: Path) -> dict[str, torch.Tensor]:
    """Dequantize every text tensor to fp32 and undo llama.cpp's `1 + w` norm storage."""
    state = {}
    for t in reader.tensors:
        name = gguf_to_hf_name(t.name)
        if name is None:
            raise UserError(f"{path} has a tensor {t.name!r} that Gemma 3's text decoder does not use.")
        shape = tuple(int(d) for d in reversed(t.shape))  # GGUF lists ne0 (innermost) first
        tensor = torch.from_numpy(_dequantize(t, shape, path))
        if name.endswith("norm.weight"):
            tensor = tensor - 1.0
        state[name] = tensor
    return state


def _dequantize(t, shape: tuple[int, ...], path: Path, rows: int = 8192) -> np.ndarray:
    """fp32 values of a GGUF tensor, a block of rows at a time (bounded peak memory)."""
    from gguf.quants import dequantize

    data = t.data.reshape(-1, t.data.shape[-1]) if t.data.ndim > 1 else t.data[None]
    out = np.empty((data.shape[0], int(np.prod(shape)) // max(data.shape[0], 1)), dtype=np.float32)
    try:
        for r in range(0, data.shape[0], rows):
            out[r : r + rows] = dequantize(data[r : r + rows], t.tensor_type).reshape(out[r : r + rows].shape)
    except (NotImplementedError, ValueError) as e:
        raise UserError(f"{path} is truncated or damaged, or {t.name} ({t.tensor_type.name}) cannot be dequantized: {e}.") from None
    return out.reshape(shape)


def save_gguf(model: Gemma3ForCausalLM, path: Path, tokenizer_model: bytes | None = None,
              raw: dict[str, tuple] | None = None) -> None:
    """Write an fp32 GGUF as llama.cpp's converter would (norms stored as 1 + w). Used by tests.
    `raw` maps Hugging Face names to (GGMLQuantizationType, uint8 blocks [rows, bytes]) written instead."""
    import gguf

    c = model.config
    w = gguf.GGUFWriter(str(path), "gemma3")
    w.add_block_count(c.num_hidden_layers)
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_key_length(c.head_dim)
    w.add_value_length(c.head_dim)
    w.add_sliding_window(c.sliding_window)
    w.add_rope_freq_base(c.rope_theta)
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    if tokenizer_model is not None:
        from .tokenizer import add_gguf_vocab

        add_gguf_vocab(w, tokenizer_model)
    for name, t in model.state_dict().items():
        if name == "lm_head.weight":
            continue
        gname = _hf_to_gguf_name(name)
        if raw and name in raw:
            qtype, blocks = raw[name]
            w.add_tensor(gname, blocks, raw_dtype=qtype)
            continue
        data = t.detach().float() + (1.0 if name.endswith("norm.weight") else 0.0)
        w.add_tensor(gname, data.numpy())
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def _hf_to_gguf_name(name: str) -> str:
    if name == "model.embed_tokens.weight":
        return "token_embd.weight"
    if name == "model.norm.weight":
        return "output_norm.weight"
    m = re.fullmatch(r"model\.layers\.(\d+)\.(.+)\.weight", name)
    return f"blk.{m.group(1)}.{_HF_NAMES[m.group(2)]}.weight"

