"""Run an ExecuTorch bundle the way the Android app does, on Linux, and compare with the Python reference.

The Android app hands prompt text to ExecuTorch's stock C++ runner (`TextLLMRunner`, the runner inside
the executorch-android AAR) together with a Hugging Face tokenizer.json. This script drives the same
runner through ExecuTorch's Python bindings over a few chat turns, sending exactly the texts the app's
ChatSession sends (the first turn rendered whole, later turns as deltas after a stopped reply, the whole
conversation again after a cut one), and checks for every turn that

- the runner read the prompt text as exactly as many tokens as `encode_chat` gives for the same turn
  (the turn markers and `<bos>` parsed as control tokens, not spelled out), and
- its greedy reply is the text of the Python ExecuTorchRunner's greedy reply over the same .pte,
- and that its statistics JSON has the fields the app's RunStats reads.

    python mobile_demo/shared/check_stock_runner.py BUNDLE [--max-new-tokens N]

BUNDLE is an ExecuTorch bundle; if it has no tokenizer.json, one is written (into a temporary copy) from
its tokenizer.model, as the Core ML exporter writes it. Exit status 1 when a turn differs.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

TURNS = ["Hello there!", "And then?", "Go on."]
STATS_FIELDS = ("prompt_tokens", "generated_tokens", "prompt_eval_end_ms", "inference_end_ms")


def check(bundle_dir: str, max_new_tokens: int = 6, log=print) -> list[dict]:
    from executorch.extension.llm.runner import GenerationConfig, TextLLMRunner

    from gemma3_export.bundle import read_bundle
    from gemma3_export.tokenizer import write_hf_tokenizer
    from gemma3_export.generate import generate
    from gemma3_export.pipeline import open_runner
    from gemma3_export.tokenizer import END_OF_TURN, Tokenizer, _chat_parts, encode_chat, format_chat

    bundle = read_bundle(bundle_dir)
    if bundle.target != "executorch":
        raise SystemExit(f"{bundle_dir} is a {bundle.target} bundle, not an ExecuTorch one.")
    tok = Tokenizer(bundle.tokenizer_path)
    stops = bundle.manifest["stop_ids"]
    work = Path(tempfile.mkdtemp(prefix="stock-runner-"))
    try:
        shutil.copy(bundle.artifact, work / "model.pte")
        hf = [name for name in bundle.manifest.get("hf_tokenizer", []) if name.endswith("tokenizer.json")]
        if hf:
            shutil.copy(bundle.path / hf[0], work / "tokenizer.json")
        else:
            write_hf_tokenizer(tok, work)
        runner = TextLLMRunner(str(work / "model.pte"), str(work / "tokenizer.json"))
        reference = open_runner(bundle)
        messages: list[dict] = []
        in_sync, results = False, []
        for user in TURNS:
            turn = [*messages, {"role": "user", "content": user}]
            if not in_sync:  # first turn, or after a cut reply: rewind and send everything
                runner.reset()
                reference.reset()
                text, ids = format_chat(turn), encode_chat(tok, turn)
            else:  # after a stopped reply: close the model's turn, then the user's
                parts = [(True, END_OF_TURN), (False, "\n"), *list(_chat_parts(turn[-1:], True))[1:]]
                text = "".join(t for _, t in parts)
                ids = [i for control, t in parts for i in ([tok.id_of(t)] if control else tok.encode(t, bos=False))]
            if (0 if not in_sync else reference.pos) + len(ids) + max_new_tokens > reference.max_context:
                raise SystemExit(f"Turn {len(results) + 1} does not fit the bundle's context of {reference.max_context}; "
                                 "export with a larger --context or pass a smaller --max-new-tokens.")
            pieces, stats = [], []
            config = GenerationConfig(echo=False, max_new_tokens=max_new_tokens, temperature=0.0, num_bos=0, num_eos=0)
            runner.generate(text, config, pieces.append, stats.append)
            new = list(generate(reference, ids, max_new_tokens, stops))
            stop_pieces = {tok.sp.id_to_piece(s) for s in stops}
            ended_by_stop = bool(pieces) and pieces[-1] in stop_pieces
            streamed = "".join(pieces[:-1] if ended_by_stop else pieces)
            fields = json.loads(stats[-1].to_json_string()) if stats else {}
            result = {
                "user": user,
                "sent": "delta" if in_sync else "whole conversation",
                "prompt_tokens": {"runner": stats[-1].num_prompt_tokens if stats else None, "python": len(ids)},
                "reply": {"runner": streamed, "python": tok.decode(new)},
                "ended_by_stop": ended_by_stop,
                "stats_fields": all(f in fields for f in STATS_FIELDS),
            }
            result["ok"] = (result["prompt_tokens"]["runner"] == len(ids) and streamed == tok.decode(new)
                            and result["stats_fields"])
            log(json.dumps(result, ensure_ascii=False))
            results.append(result)
            messages = [*turn, {"role": "model", "content": streamed}]
            in_sync = ended_by_stop
        return results
    finally:
        shutil.rmtree(work, ignore_errors=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("bundle")
    parser.add_argument("--max-new-tokens", type=int, default=6)
    args = parser.parse_args()
    results = check(args.bundle, args.max_new_tokens)
    ok = all(r["ok"] for r in results)
    print(f"{sum(r['ok'] for r in results)}/{len(results)} turns match")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
