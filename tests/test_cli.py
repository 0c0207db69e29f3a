"""The command line: user mistakes end in one sentence and exit status 2, never a traceback."""

import json
import subprocess
import sys

import pytest

from conftest import tiny_model
from gemma3_export.cli import main
from gemma3_export.weights import save_gguf, save_hf_folder


def run_cli(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_sentence(code, err, pattern):
    assert code == 2
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.strip() and not line.startswith("loaded ")]
    assert len(lines) == 1, err
    assert pattern in lines[0], lines[0]


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-hf")
    save_hf_folder(tiny_model(), folder)
    return folder


def test_unknown_preset_lists_choices(capsys):
    code, _, err = run_cli(capsys, "--model", "2b", "--target", "onnx")
    assert_one_sentence(code, err, "invalid choice: '2b' (choose from 'tiny', '270m', '1b', '4b', '12b', '27b')")


def test_unknown_flag(capsys):
    code, _, err = run_cli(capsys, "generate", "--model", "tiny", "--prompt", "x", "--temprature", "1")
    assert_one_sentence(code, err, "Unrecognized arguments: --temprature")


def test_missing_checkpoint(capsys, tmp_path):
    code, _, err = run_cli(capsys, "generate", "--model", "tiny", "--checkpoint", str(tmp_path / "nope"), "--prompt", "x")
    assert_one_sentence(code, err, "No checkpoint at")


def test_folder_without_weights(capsys, tmp_path, tiny_folder):
    (tmp_path / "config.json").write_text((tiny_folder / "config.json").read_text())
    code, _, err = run_cli(capsys, "generate", "--model", "tiny", "--checkpoint", str(tmp_path), "--prompt", "x")
    assert_one_sentence(code, err, "has no .safetensors files")


def test_truncated_safetensors(capsys, tmp_path, tiny_folder):
    for f in tiny_folder.iterdir():
        data = f.read_bytes()
        (tmp_path / f.name).write_bytes(data[: len(data) // 2] if f.suffix == ".safetensors" else data)
    code, _, err = run_cli(capsys, "generate", "--model", "tiny", "--checkpoint", str(tmp_path), "--prompt", "x")
    assert_one_sentence(code, err, "is not a readable safetensors file")


def test_config_disagrees_with_tensors(capsys, tmp_path, tiny_folder):
    config = json.loads((tiny_folder / "config.json").read_text())
    config["intermediate_size"] = 96
    (tmp_path / "config.json").write_text(json.dumps(config))
    (tmp_path / "model.safetensors").write_bytes((tiny_folder / "model.safetensors").read_bytes())
    code, _, err = run_cli(capsys, "generate", "--model", "tiny", "--checkpoint", str(tmp_path), "--prompt", "x")
    assert_one_sentence(code, err, "does not match the config: mis-shaped model.layers.0.mlp.gate_proj.weight is (128, 64), the config needs (96, 64)")


def test_checkpoint_of_another_size(capsys, tiny_folder):
    code, _, err = run_cli(capsys, "generate", "--model", "1b", "--checkpoint", str(tiny_folder), "--prompt", "x")
    assert_one_sentence(code, err, "not Gemma 3 1b; pass the matching --model")


def test_truncated_gguf(capsys, tmp_path):
    path = tmp_path / "tiny.gguf"
    save_gguf(tiny_model(), path)
    path.write_bytes(path.read_bytes()[: path.stat().st_size * 2 // 3])
    code, _, err = run_cli(capsys, "generate", "--model", "tiny", "--checkpoint", str(path), "--prompt", "x")
    assert_one_sentence(code, err, str(path))


def test_gguf_of_another_architecture(capsys, tmp_path):
    import gguf
    import numpy as np

    path = tmp_path / "other.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_tensor("token_embd.weight", np.zeros((4, 4), np.float32))
    w.write_header_to_file(); w.write_kv_data_to_file(); w.write_tensors_to_file(); w.close()
    code, _, err = run_cli(capsys, "generate", "--model", "tiny", "--checkpoint", str(path), "--prompt", "x")
    assert_one_sentence(code, err, "holds a 'llama' model, not Gemma 3")


def test_large_model_offline_names_the_alternatives(capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    code, _, err = run_cli(capsys, "generate", "--model", "1b", "--prompt", "x")
    assert_one_sentence(code, err, "--checkpoint DIR|FILE.gguf, or --random-weights")


def test_prompt_longer_than_the_context(capsys):
    code, _, err = run_cli(capsys, "generate", "--model", "tiny", "--context", "16", "--prompt", "word " * 40)
    assert_one_sentence(code, err, "do not fit the context of 16")


def test_bad_sampling_flags(capsys):
    code, _, err = run_cli(capsys, "generate", "--model", "tiny", "--prompt", "x", "--top-p", "0")
    assert_one_sentence(code, err, "0 < top_p <= 1")


def test_generate_tiny_streams_text(capsys, tiny_folder):
    code, out, err = run_cli(capsys, "generate", "--model", "tiny", "--checkpoint", str(tiny_folder),
                             "--prompt", "The lighthouse", "--max-new-tokens", "12")
    assert code == 0, err
    assert out.strip() and "tokens/s" in err


def test_console_script_exit_status():
    proc = subprocess.run([sys.executable, "-m", "gemma3_export.cli", "--model", "xl", "--target", "onnx"],
                          capture_output=True, text=True)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr and "invalid choice" in proc.stderr
