"""What ExecuTorch's stock C++ runner (the one inside the Android AAR) streams when it samples a stop id.

Builds a tiny ExecuTorch program whose `<end_of_turn>` (106) logit dominates after the prompt (its row of
the tied embedding is set along the prompt's final hidden state), runs it through `TextLLMRunner` with the
Hugging Face tokenizer.json and with tokenizer.model, and prints the pieces the runner streams. The
Android app's ReplyStream is written against this behaviour.

    python mobile_demo/shared/probe_stock_runner_stop.py      # about 1 to 3 minutes (an ExecuTorch export)
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import torch


def probe() -> dict[str, list[str]]:
    from executorch.extension.llm.runner import GenerationConfig, TextLLMRunner

    from gemma3_export.tokenizer import write_hf_tokenizer
    from gemma3_export.exporters.executorch import export
    from gemma3_export.generate import EagerRunner
    from gemma3_export.load import load_model
    from gemma3_export.pipeline import make_spec

    loaded = load_model("tiny", log=lambda *_: None)
    model, tok = loaded.model, loaded.tokenizer
    prompt = "Hello there"
    ids = tok.encode(prompt)  # no 106 in the prompt: its embedding row only feeds the (tied) head
    seen = {}
    hook = model.model.norm.register_forward_hook(lambda m, i, o: seen.update(h=o[0, -1].detach().clone()))
    EagerRunner(model, 64, 8).prefill(ids)
    hook.remove()
    with torch.no_grad():
        h = seen["h"]
        model.model.embed_tokens.weight[106] = 200 * h / h.dot(h)  # logit 200 for <end_of_turn>
    assert int(EagerRunner(model, 64, 8).prefill(ids).argmax()) == 106
    folder = Path(tempfile.mkdtemp(prefix="stop-probe-"))
    try:
        info = export(model, folder, make_spec("tiny", "executorch", "fp32", 64, 8), log=lambda *_: None)
        write_hf_tokenizer(tok, folder)
        tok.save(folder / "tokenizer.model")
        out = {}
        for name, text, bos in (("tokenizer.json", "<bos>" + prompt, 0), ("tokenizer.model", prompt, 1)):
            runner = TextLLMRunner(str(folder / info["artifact"]), str(folder / name))
            pieces: list[str] = []
            config = GenerationConfig(echo=False, max_new_tokens=5, temperature=0.0, num_bos=bos, num_eos=0)
            runner.generate(text, config, pieces.append)
            out[name] = pieces
        return out
    finally:
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    torch.set_num_threads(1)
    for name, pieces in probe().items():
        print(f"{name}: streamed {pieces!r}")
