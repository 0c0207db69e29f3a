"""The Hugging Face folder other tools' builders read: config, weights and tokenizer round-trip."""

import json

import torch

from gemma3_export.hf_folder import main, write_hf_folder
from gemma3_export.load import load_model


def test_folder_round_trips_and_transformers_reads_it(tmp_path):
    out = write_hf_folder("tiny", str(tmp_path / "hf"), log=lambda *_: None)
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "generation_config.json", "model.safetensors", "tokenizer.model",
            "tokenizer.json", "tokenizer_config.json"} <= names
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary folder left
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["Gemma3ForCausalLM"] and config["torch_dtype"] == "float32"
    assert json.loads((out / "generation_config.json").read_text())["eos_token_id"][0] == 1

    original = load_model("tiny", log=lambda *_: None)
    again = load_model("tiny", checkpoint=str(out), log=lambda *_: None)
    for k, v in original.model.state_dict().items():
        assert torch.equal(v, again.model.state_dict()[k]), k

    from transformers import AutoConfig, AutoTokenizer

    assert AutoConfig.from_pretrained(out).head_dim == original.model.config.head_dim
    text = "Hello world"
    assert AutoTokenizer.from_pretrained(out)(text)["input_ids"] == original.tokenizer.encode(text)


def test_command_line_writes_bf16_and_refuses_bad_checkpoint(tmp_path, capsys):
    assert main(["--model", "tiny", "--dtype", "bfloat16", "--out", str(tmp_path / "bf16")]) == 0
    assert json.loads((tmp_path / "bf16" / "config.json").read_text())["torch_dtype"] == "bfloat16"
    assert main(["--model", "tiny", "--checkpoint", str(tmp_path / "nothing"), "--out", str(tmp_path / "x")]) == 2
    assert "No checkpoint" in capsys.readouterr().err and not (tmp_path / "x").exists()
