import json
from pathlib import Path

import pytest

from gemma3_export.config import GLOBAL, LOCAL, PRESETS, Gemma3Config, preset
from gemma3_export.errors import UserError

# Copied from ../shared/reference/gemma3.json (the report, transformers' and Google's configs).
REFERENCE = json.loads((Path(__file__).parent / "data/gemma3_reference.json").read_text())


@pytest.mark.parametrize("name", ["270m", "1b", "4b", "12b", "27b"])
def test_presets_match_reference_numbers(name):
    ref = REFERENCE["text_configs"][name]
    c = preset(name)
    for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "head_dim", "query_pre_attn_scalar", "sliding_window",
                "max_position_embeddings", "vocab_size", "rope_theta", "rope_local_base_freq"):
        assert getattr(c, key) == ref[key], key
    assert c.rope_scaling_factor == (ref["rope_scaling"] or {}).get("factor", 1.0)


def test_layer_pattern_five_local_then_global():
    c = preset("1b")
    assert c.layer_types[:6] == (LOCAL,) * 5 + (GLOBAL,)
    assert [i for i, t in enumerate(c.layer_types) if t == GLOBAL] == [5, 11, 17, 23]


def test_tiny_keeps_the_structure():
    c = preset("tiny")
    assert c.num_key_value_heads < c.num_attention_heads  # GQA
    assert c.head_dim != c.hidden_size // c.num_attention_heads
    assert c.layer_types.count(GLOBAL) >= 2 and c.layer_types.count(LOCAL) >= 3
    assert c.sliding_window <= 16


def test_unknown_preset_lists_choices():
    with pytest.raises(UserError, match="choose one of tiny, 270m, 1b"):
        preset("2b")


OLD_STYLE = {  # google/gemma-3-4b-it text_config, transformers < 4.56 spelling
    "model_type": "gemma3_text", "hidden_size": 2560, "intermediate_size": 10240, "num_hidden_layers": 34,
    "num_attention_heads": 8, "num_key_value_heads": 4, "head_dim": 256, "query_pre_attn_scalar": 256,
    "sliding_window": 1024, "sliding_window_pattern": 6, "rope_theta": 1000000.0,
    "rope_local_base_freq": 10000.0, "rope_scaling": {"rope_type": "linear", "factor": 8.0},
    "max_position_embeddings": 131072, "vocab_size": 262208, "some_future_key": 1,
}


def test_from_hf_old_and_new_spellings_agree():
    old = Gemma3Config.from_hf({"architectures": ["Gemma3ForConditionalGeneration"], "text_config": OLD_STYLE})
    assert old == preset("4b")
    new = Gemma3Config.from_hf(preset("4b").to_hf())
    assert new == old


def test_to_hf_round_trips_through_transformers():
    from transformers import Gemma3TextConfig

    for name, c in PRESETS.items():
        hf = Gemma3TextConfig(**c.to_hf())
        assert hf.layer_types == list(c.layer_types)
        assert Gemma3Config.from_hf(hf.to_dict()).replace(embed_scale_dtype=c.embed_scale_dtype) == c, name


def test_embed_scale_both_conventions():
    c = preset("270m")
    assert c.embed_scale == 25.25  # transformers on a bf16 checkpoint
    assert c.replace(embed_scale_dtype="float32").embed_scale == pytest.approx(640**0.5)


def test_bad_config_file(tmp_path):
    with pytest.raises(UserError, match="No config file"):
        Gemma3Config.from_hf(tmp_path / "config.json")
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(UserError, match="not valid JSON"):
        Gemma3Config.from_hf(tmp_path / "config.json")
    with pytest.raises(UserError, match="not Gemma 3"):
        Gemma3Config.from_hf({"model_type": "llama", "hidden_size": 1})
