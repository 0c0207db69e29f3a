"""Rung 1 and 2 of the validation ladder: the eager model against transformers, and the cached
model against the full-sequence forward around the sliding window."""

import pytest
import torch

from conftest import hf_reference, tiny_model
from gemma3_export.cache import RingKVCache
from gemma3_export.model import Gemma3ForCausalLM

W = 8  # tiny preset's sliding window
N = 5 * W + 3  # longer than 3 windows: crosses W-1, W, W+1, 2W, 3W+5


def tokens(n=N, seed=1, vocab=512):
    return torch.randint(0, vocab, (1, n), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("scale_dtype", ["float32", "bfloat16"])
def test_full_logits_match_transformers(scale_dtype):
    model = tiny_model(embed_scale_dtype=scale_dtype)
    hf = hf_reference(model)
    x = tokens()
    with torch.no_grad():
        ours, ref = model(x), hf(x).logits
    assert ref.abs().max() > 1  # the comparison is not between near-zero logits
    assert (ours - ref).abs().max() <= 1e-4
    assert torch.equal(ours.argmax(-1), ref.argmax(-1))


def test_cached_last_token_logits_match_transformers(tiny):
    hf = hf_reference(tiny)
    x = tokens()
    tiny.setup_caches(64)
    with torch.no_grad():
        ref = hf(x).logits[0]
        for p in range(N):  # decode token by token
            got = tiny(x[:, p : p + 1], torch.tensor([p]))[0]
            assert (got - ref[p]).abs().max() <= 1e-4, p


def test_the_window_is_w_keys():
    """A local query at p sees p-W+1..p: changing token p-W must not change layer 0's output at p."""
    model = tiny_model()
    x = tokens(3 * W)
    attn = model.model.layers[0].self_attn
    assert attn.window == W
    outs = []
    for t in (x, x.clone().index_fill_(1, torch.tensor([W]), 7)):  # change position W only
        captured = {}
        handle = attn.register_forward_hook(lambda m, i, o: captured.setdefault("o", o))
        with torch.no_grad():
            model(t)
        handle.remove()
        outs.append(captured["o"][0])
    diff = (outs[0] - outs[1]).abs().amax(-1)  # per position
    assert torch.all(diff[W : 2 * W] > 0)  # positions W..2W-1 see position W
    assert torch.all(diff[2 * W :] == 0)  # position 2W is W past it: out of the window


@pytest.mark.parametrize("chunk", [1, 3, W - 1, W])
@pytest.mark.parametrize("decode_from", [N // 2, N])
def test_chunked_prefill_and_decode_match_full_forward(tiny, chunk, decode_from):
    """Every position 0..N-1, after prefill in chunks (straddling W, 2W, ...) and then decode."""
    x = tokens()
    with torch.no_grad():
        full = tiny.model(x)[0]  # [N, hidden]: hidden states of the full-sequence forward
    tiny.setup_caches(64)
    got = []
    with torch.no_grad():
        p = 0
        while p < decode_from:
            size = min(chunk, decode_from - p)
            got.append(tiny.model(x[:, p : p + size], torch.tensor([p]))[0])
            p += size
        for p in range(decode_from, N):
            got.append(tiny.model(x[:, p : p + 1], torch.tensor([p]))[0])
    got = torch.cat(got)
    err = (got - full).abs().amax(-1)
    assert err.max() <= 1e-4, f"worst position {int(err.argmax())}: {float(err.max())}"


def test_last_token_logits_after_chunked_prefill(tiny):
    x = tokens()
    with torch.no_grad():
        full = tiny(x)[0]
        tiny.setup_caches(64)
        for start in range(0, N, W):
            last = tiny(x[:, start : start + W], torch.tensor([start]))[0]
            end = min(start + W, N) - 1
            assert (last - full[end]).abs().max() <= 1e-4


def test_cache_shapes_are_static_and_local_layers_keep_only_the_window(tiny):
    c = tiny.config
    tiny.setup_caches(64)
    x = tokens()
    with torch.no_grad():
        for p in range(N):
            tiny(x[:, p : p + 1], torch.tensor([p]))
    for i, cache in enumerate(tiny.caches):
        slots = W if c.is_local(i) else 64
        assert isinstance(cache, RingKVCache) == c.is_local(i)
        assert cache.k.shape == cache.v.shape == (1, c.num_key_value_heads, slots, c.head_dim)


def test_reset_starts_a_new_sequence(tiny):
    x, y = tokens(20, seed=2), tokens(20, seed=3)
    tiny.setup_caches(64)
    with torch.no_grad():
        tiny(x, torch.tensor([0]))
        tiny.reset_caches()
        after_reset = tiny(y[:, :W], torch.tensor([0]))
        fresh = tiny(y[:, :W])[:, -1]
    assert (after_reset - fresh).abs().max() <= 1e-5


def test_global_rope_scaling_is_not_applied_to_local_layers():
    from gemma3_export.config import preset

    model = Gemma3ForCausalLM(preset("tiny").replace(rope_scaling_factor=8.0))
    text = model.model
    assert torch.allclose(text.rope_global.inv_freq * 8, 1.0 / (1e6 ** (torch.arange(0, 32, 2) / 32)))
    assert torch.allclose(text.rope_local.inv_freq, 1.0 / (1e4 ** (torch.arange(0, 32, 2) / 32)))


def test_scaled_rope_matches_transformers():
    model = tiny_model(rope_scaling_factor=8.0)
    hf = hf_reference(model)
    x = tokens()
    with torch.no_grad():
        assert (model(x) - hf(x).logits).abs().max() <= 1e-4
