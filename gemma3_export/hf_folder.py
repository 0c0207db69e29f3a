"""Write a loaded model as a Hugging Face checkpoint folder, the input other tools' builders read
(onnxruntime-genai's model builder, optimum-executorch, transformers):

    python -m gemma3_export.hf_folder --model 270m --out bundles/hf-270m    # the embedded real 270M
    python -m gemma3_export.hf_folder --model 1b --checkpoint FILE.gguf --out DIR [--dtype bfloat16]

The folder holds `config.json` (`Gemma3ForCausalLM`, `gemma3_text`), `generation_config.json`
(BOS, stop ids [1, 106]), `model.safetensors`, `tokenizer.model` and the `tokenizer.json` +
`tokenizer_config.json` (with the chat template) that `AutoTokenizer` reads. A GGUF source is
dequantized: the folder holds the float weights llama.cpp's file decodes to.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

import torch

from .config import PRESETS
from .errors import UserError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def write_hf_folder(
    model: str,
    out: str,
    checkpoint: str | None = None,
    random_weights: bool = False,
    dtype: str = "float32",
    log=print,
) -> Path:
    """Load `model` (as `gemma3-export` does) and write it to the folder `out` (replaced if it exists,
    written to a temporary folder first so an interruption leaves nothing half-written)."""
    from .load import load_model
    from .tokenizer import write_hf_tokenizer
    from .weights import save_hf_folder

    if dtype not in DTYPES:
        raise UserError(f"Unknown dtype {dtype!r}; choose from {', '.join(DTYPES)}.")
    loaded = load_model(model, checkpoint=checkpoint, random_weights=random_weights, log=log)
    target = Path(out)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        save_hf_folder(loaded.model, tmp, dtype=DTYPES[dtype])
        config = json.loads((tmp / "config.json").read_text())
        config["torch_dtype"] = config["dtype"] = dtype
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        tok = loaded.tokenizer
        (tmp / "generation_config.json").write_text(json.dumps(
            {"bos_token_id": tok.bos_id, "eos_token_id": tok.stop_ids, "pad_token_id": tok.pad_id,
             "do_sample": False}, indent=2))
        tok.save(tmp / "tokenizer.model")
        write_hf_tokenizer(tok, tmp)
        _add_bos(tmp, tok.bos_id)
        if target.exists():
            shutil.rmtree(target)
        tmp.rename(target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log(f"wrote {target} ({loaded.source}, {dtype})")
    return target


def _add_bos(folder: Path, bos_id: int) -> None:
    """Make `tokenizer.json` prepend `<bos>` as Google's checkpoints do (Gemma needs it; the converted
    SentencePiece model does not add it), and drop the converter's temporary `vocab_file` path."""
    tok = json.loads((folder / "tokenizer.json").read_text())
    bos = {"SpecialToken": {"id": "<bos>", "type_id": 0}}
    tok["post_processor"] = {
        "type": "TemplateProcessing",
        "single": [bos, {"Sequence": {"id": "A", "type_id": 0}}],
        "pair": [bos, {"Sequence": {"id": "A", "type_id": 0}}, bos, {"Sequence": {"id": "B", "type_id": 1}}],
        "special_tokens": {"<bos>": {"id": "<bos>", "ids": [bos_id], "tokens": ["<bos>"]}},
    }
    (folder / "tokenizer.json").write_text(json.dumps(tok, ensure_ascii=False))
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config.pop("vocab_file", None)
    config["add_bos_token"], config["add_eos_token"] = True, False
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m gemma3_export.hf_folder", description=__doc__.splitlines()[0])
    p.add_argument("--model", choices=PRESETS, required=True)
    p.add_argument("--checkpoint", help="Hugging Face folder, .gguf file or hub id (default: as gemma3-export)")
    p.add_argument("--random-weights", action="store_true")
    p.add_argument("--dtype", choices=DTYPES, default="float32")
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    try:
        write_hf_folder(**vars(args), log=lambda m: print(m, file=sys.stderr, flush=True))
    except UserError as e:
        print(f"gemma3_export.hf_folder: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
