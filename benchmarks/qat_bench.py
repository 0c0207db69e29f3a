"""PTQ vs QAT on the real Gemma 3 270M, per scheme, on held-out text; training speed and memory; and
the FSDP2 memory plan for 1b..27b. Results: docs/qat.md.

    python benchmarks/qat_bench.py --schemes int4 int4b32 fp8 --steps 8 --freeze-embedding --json docs/qat_bench.json

- PTQ: round-to-nearest onto the same grid (the fake quantizer applied to the float weights).
- QAT: `gemma3-export qat` run as a subprocess (its own peak memory), then its checkpoint is loaded
  through `--checkpoint` exactly as an exporter would.
- Both are compared with the float model on held-out text (the bundled validation text, then the
  Apache-2.0 licence text; the training text is the Vim user manual): KL(float || quantized) and
  top-1 agreement at every position, and each model's perplexity of the text.
"""

from __future__ import annotations

import argparse
import copy
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from gemma3_export import fake_quant  # noqa: E402
from gemma3_export.load import load_model  # noqa: E402
from gemma3_export.qat import GiB, distill_metrics, memory_plan, memory_table  # noqa: E402
from gemma3_export.qat_data import pack, read_texts  # noqa: E402

TRAIN = [f"/usr/share/vim/vim90/doc/usr_0{i}.txt" for i in range(1, 6)]
HELD_OUT = [str(ROOT / "gemma3_export" / "data" / "validation.txt"), "/usr/share/common-licenses/Apache-2.0"]


def run_qat(scheme: str, args, work: Path) -> tuple[Path, float]:
    out = work / scheme
    shutil.rmtree(out, ignore_errors=True)
    cmd = [sys.executable, "-m", "gemma3_export.cli", "qat", "--model", "270m", "--scheme", scheme,
           "--steps", str(args.steps), "--out", str(out), "--seq-len", str(args.seq_len),
           "--batch-size", str(args.batch_size), "--lr", str(args.lr), "--warmup-steps", str(args.warmup_steps),
           "--save-every", str(args.steps), "--top-k", str(args.top_k)]
    cmd += ["--freeze-embedding"] if args.freeze_embedding else []
    cmd += ["--self-generated", "--samples", str(args.steps * args.batch_size)] if args.self_generated else ["--data", *TRAIN]
    start = time.perf_counter()
    subprocess.run(cmd, check=True, cwd=ROOT)
    return out, time.perf_counter() - start


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--schemes", nargs="+", default=["int4", "int4b32", "fp8"])
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--top-k", type=int, default=256)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--warmup-steps", type=int, default=2)
    p.add_argument("--eval-seqs", type=int, default=4, help="held-out sequences of --seq-len tokens")
    p.add_argument("--self-generated", action="store_true", help="train on teacher samples instead of text")
    p.add_argument("--freeze-embedding", action="store_true", help="do not train the tied embedding (memory)")
    p.add_argument("--work", default="/tmp/qat-bench")
    p.add_argument("--json", help="write the results here")
    args = p.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)

    trained = {}
    for scheme in args.schemes:  # first all training runs: nothing else of ours holds memory meanwhile
        out, wall = run_qat(scheme, args, work)
        shutil.rmtree(out / "training", ignore_errors=True)  # 4.3 GB of optimizer state
        trained[scheme] = (out, wall)
    teacher = load_model("270m")
    held_out = pack(read_texts(HELD_OUT), teacher.tokenizer, args.seq_len)[: args.eval_seqs]
    print(f"held-out: {held_out.numel()} tokens; training: {'self-generated' if args.self_generated else ', '.join(TRAIN)}")
    results = {"settings": vars(args), "machine": f"{torch.get_num_threads()} threads, torch {torch.__version__}",
               "held_out_tokens": held_out.numel(), "schemes": {}}
    for scheme, (out, wall) in trained.items():
        ptq = distill_metrics(teacher.model, fake_quant.prepare(copy.deepcopy(teacher.model), scheme), held_out)
        summary = json.loads((out / "qat.json").read_text())
        student = load_model("270m", checkpoint=str(out), log=lambda *_: None).model
        qat = distill_metrics(teacher.model, student, held_out)
        del student
        row = {"ptq": ptq, "qat": qat, "kl_gap_closed": 1 - qat["kl"] / ptq["kl"],
               "train_tokens_per_s": summary["tokens_per_s"], "peak_rss_gib": summary["peak_rss_bytes_rank0"] / GiB,
               "qat_wall_s": wall, "train_loss": [h["loss"] for h in summary["history"]]}
        results["schemes"][scheme] = row
        print(f"{scheme} PTQ: {ptq}\n{scheme} QAT: {qat}; gap closed {row['kl_gap_closed']:.1%}; "
              f"{row['train_tokens_per_s']:.1f} tok/s; peak {row['peak_rss_gib']:.2f} GiB; {wall:.0f} s", flush=True)
    plan = memory_plan("270m", 1, args.seq_len, args.batch_size, args.top_k, activation_checkpointing=False)
    results["plan_270m_1rank_gib"] = plan["total"] / GiB
    results["memory_table"] = memory_table(seq_len=512, batch_size=1, top_k=256)
    print(report(results))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


def report(r: dict) -> str:
    lines = ["| scheme | KL PTQ | KL QAT | gap closed | top-1 PTQ | top-1 QAT | ppl float | ppl PTQ | ppl QAT | tok/s | peak GiB |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, s in r["schemes"].items():
        p, q = s["ptq"], s["qat"]
        lines.append(f"| {name} | {p['kl']:.4f} | {q['kl']:.4f} | {s['kl_gap_closed']:.1%} | {p['top1']:.3f} | "
                     f"{q['top1']:.3f} | {p['ppl_teacher']:.2f} | {p['ppl_student']:.2f} | {q['ppl_student']:.2f} | "
                     f"{s['train_tokens_per_s']:.1f} | {s['peak_rss_gib']:.2f} |")
    lines.append(f"\nplanned peak for 270m on 1 rank (no activation checkpointing): {r['plan_270m_1rank_gib']:.2f} GiB")
    lines.append("\nper-rank GiB, seq 512, batch 1 per rank, top-256, activation checkpointing:\n" + r["memory_table"])
    return "\n".join(lines)


if __name__ == "__main__":
    main()
