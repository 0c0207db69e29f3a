"""Weights in and out: Hugging Face folders and GGUF files reload to identical logits; strict loading
names what is wrong."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import tiny_model
from gemma3_export.errors import UserError
from gemma3_export.model import Gemma3ForCausalLM
from gemma3_export.weights import (
    config_from_gguf, load_gguf_state, load_hf_state, load_strict, open_gguf, save_gguf, save_hf_folder,
)

X = torch.randint(0, 512, (1, 30), generator=torch.Generator().manual_seed(0))


def reload(config, state):
    model = Gemma3ForCausalLM(config)
    load_strict(model, state, "test")
    return model.eval()


def test_hf_folder_round_trip(tiny, tmp_path):
    save_hf_folder(tiny, tmp_path)
    from gemma3_export.config import Gemma3Config

    config = Gemma3Config.from_hf(tmp_path / "config.json")
    assert config == tiny.config.replace(embed_scale_dtype="bfloat16")
    with torch.no_grad():
        assert torch.equal(reload(tiny.config, load_hf_state(tmp_path))(X), tiny(X))


def test_sharded_and_multimodal_naming(tiny, tmp_path):
    state = {k: v for k, v in tiny.state_dict().items() if k != "lm_head.weight"}
    renamed = {k.replace("model.", "model.language_model.", 1): v for k, v in state.items()}
    renamed["model.vision_tower.vision_model.embeddings.patch_embedding.weight"] = torch.zeros(2, 2)
    names = sorted(renamed)
    half = len(names) // 2
    save_file({k: renamed[k] for k in names[:half]}, tmp_path / "model-00001-of-00002.safetensors")
    save_file({k: renamed[k] for k in names[half:]}, tmp_path / "model-00002-of-00002.safetensors")
    index = {"weight_map": {k: f"model-0000{1 + (i >= half)}-of-00002.safetensors" for i, k in enumerate(names)}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    with torch.no_grad():
        assert torch.equal(reload(tiny.config, load_hf_state(tmp_path))(X), tiny(X))


def test_gguf_round_trip(tiny, tmp_path):
    path = tmp_path / "tiny.gguf"
    save_gguf(tiny, path)
    reader = open_gguf(path)
    config = config_from_gguf(reader, path)
    for key in ("hidden_size", "num_hidden_layers", "head_dim", "sliding_window", "num_key_value_heads"):
        assert getattr(config, key) == getattr(tiny.config, key)
    state = load_gguf_state(reader, path)
    assert torch.allclose(state["model.norm.weight"], tiny.model.norm.weight, atol=1e-6)  # 1 + w stored, w loaded
    with torch.no_grad():
        assert (reload(tiny.config, state)(X) - tiny(X)).abs().max() <= 1e-6


def test_strict_loading_names_the_problem(tiny):
    state = {k: v for k, v in tiny.state_dict().items() if k != "lm_head.weight"}
    missing = {k: v for k, v in state.items() if "layers.2.mlp.up_proj" not in k}
    with pytest.raises(UserError, match=r"missing model\.layers\.2\.mlp\.up_proj\.weight"):
        reload(tiny.config, missing)
    with pytest.raises(UserError, match=r"unexpected model\.layers\.9\.foo"):
        reload(tiny.config, {**state, "model.layers.9.foo": torch.zeros(1)})
    bad = dict(state, **{"model.norm.weight": torch.zeros(65)})
    with pytest.raises(UserError, match=r"mis-shaped model\.norm\.weight is \(65,\), the config needs \(64,\)"):
        reload(tiny.config, bad)


def test_truncated_safetensors(tiny, tmp_path):
    save_hf_folder(tiny, tmp_path)
    f = tmp_path / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    with pytest.raises(UserError, match="not a readable safetensors file"):
        load_hf_state(tmp_path)


def test_truncated_and_foreign_gguf(tiny, tmp_path):
    path = tmp_path / "tiny.gguf"
    save_gguf(tiny, path)
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(UserError, match="not a readable GGUF|truncated or damaged"):
        load_gguf_state(open_gguf(cut), cut)
    import gguf

    other = tmp_path / "llama.gguf"
    w = gguf.GGUFWriter(str(other), "llama")
    w.add_block_count(1)
    w.add_tensor("token_embd.weight", torch.zeros(4, 4).numpy())
    w.write_header_to_file(); w.write_kv_data_to_file(); w.write_tensors_to_file(); w.close()
    with pytest.raises(UserError, match="'llama' model, not Gemma 3"):
        config_from_gguf(open_gguf(other), other)
