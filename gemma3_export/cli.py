"""The command line: a thin shell where each command calls one library function with keyword
arguments named like its flags. A mistake the user can make ends in one sentence and exit status 2.

    gemma3-export --model 1b --target coreml [...]        export (the default command)
    gemma3-export generate|chat|validate|perplexity|memory ...
"""

from __future__ import annotations

import argparse
import sys

from .config import PRESETS
from .errors import UserError
from .pipeline import TARGETS
from .quant import GPTQ_SCHEMES, SCHEMES

COMMANDS = ("export", "generate", "chat", "validate", "perplexity", "memory", "qat", "gptq")


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line instead of usage + message
        raise UserError(f"{message[0].upper()}{message[1:]} (see {self.prog} --help).")


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _add_source(p: argparse.ArgumentParser, required: bool = True) -> None:
    p.add_argument("--model", choices=PRESETS, required=required, help="model size preset")
    p.add_argument("--checkpoint", help="Hugging Face folder, .gguf file or hub id (default: see README)")
    p.add_argument("--random-weights", action="store_true", help="seeded random weights")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="gemma3-export", description="Export Gemma 3 to ONNX, ExecuTorch and Core ML bundles.")
    sub = parser.add_subparsers(dest="command", parser_class=_Parser)

    p = sub.add_parser("export", help="write one bundle folder (the default command)")
    _add_source(p)
    p.add_argument("--target", choices=TARGETS, required=True)
    p.add_argument("--quant", choices=SCHEMES, help="quantization scheme (default per target)")
    p.add_argument("--context", type=int, help="KV cache capacity in tokens (default 2048)")
    p.add_argument("--chunk", type=int, help="largest prefill chunk (default 128, at most the window)")
    p.add_argument("--out", help="bundle folder (default bundles/gemma3-MODEL-TARGET-QUANT)")
    p.add_argument("--no-validate", dest="validate", action="store_false", help="skip the parity check")
    p.add_argument("--recipe", help="TOML file whose [export] values are defaults; flags override them")
    p.add_argument("--vision", action="store_true", help="also export the image encoder as a second artifact (4b, 12b, 27b)")
    p.add_argument("--max-size", help="largest artifact, e.g. 260MB: with gguf/int8 schemes round the least used table "
                   "rows to int4 until it fits; with int4b32[-asym] raise the most sensitive matrices to int8 while it fits")
    p.add_argument("--data", nargs="+", metavar="FILE", help="text or JSONL files --max-size measures on "
                   "(default: text sampled from the float model)")

    p = sub.add_parser("generate", help="stream a continuation of a prompt")
    _add_source(p, required=False)
    p.add_argument("--bundle", help="run an exported bundle instead of the eager model")
    p.add_argument("--prompt", required=True)
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the chat template")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-k", type=int, default=64)
    p.add_argument("--top-p", type=float, default=0.95)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--context", type=int, help="eager model's cache size (default 2048)")
    _add_images(p)

    p = sub.add_parser("chat", help="interactive multi-turn chat with a bundle")
    p.add_argument("bundle")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=0)
    _add_images(p)

    p = sub.add_parser("validate", help="parity report of a bundle against the eager model")
    p.add_argument("bundle")

    p = sub.add_parser("perplexity", help="teacher-forced perplexity and top-1 accuracy of a text")
    _add_source(p, required=False)
    p.add_argument("--bundle")
    p.add_argument("--text", required=True, help="a UTF-8 text file")
    p.add_argument("--dump", help="save token ids and top-20 logits per position (.npz)")

    p = sub.add_parser("memory", help="memory of bundles beside the report's Table 3")
    p.add_argument("--bundle", action="append", default=[])
    p.add_argument("--context", type=int, default=32768)
    _add_qat(sub)
    p = sub.add_parser("gptq", help="round a model to int4 by GPTQ into a checkpoint the exporters store exactly")
    _add_source(p)
    p.add_argument("--scheme", choices=GPTQ_SCHEMES, required=True)
    p.add_argument("--out", required=True, help="checkpoint folder (exporters read it with --checkpoint)")
    p.add_argument("--data", nargs="+", metavar="FILE",
                   help="calibration text: UTF-8 text or JSONL files (default: text sampled from the model)")
    p.add_argument("--samples", type=int,
                   help="calibration sequences of 96 tokens sampled from the model (default 64; with --data: "
                        "the text's first 4x that many windows)")
    p.add_argument("--act-order", action="store_true",
                   help="round the columns with the largest inputs first (block scales fixed beforehand)")
    return parser


def _add_images(p: argparse.ArgumentParser) -> None:
    p.add_argument("--image", action="append", metavar="FILE", help="an image before the prompt (repeatable; 4b, 12b, 27b)")
    p.add_argument("--pan-and-scan", action="store_true", help="add crops of elongated images (more image tokens)")


def _add_qat(sub) -> None:
    from .fake_quant import QAT_SCHEMES

    p = sub.add_parser("qat", help="quantization-aware training distilled from the float model")
    _add_source(p)
    p.add_argument("--scheme", choices=QAT_SCHEMES, required=True)
    p.add_argument("--steps", type=int, required=True)
    p.add_argument("--out", required=True, help="checkpoint folder (exporters read it with --checkpoint)")
    p.add_argument("--data", nargs="+", metavar="FILE", help="UTF-8 text or JSONL (\"text\" field) files")
    p.add_argument("--self-generated", action="store_true", help="sample the data from the teacher (the default)")
    p.add_argument("--samples", type=int, help="self-generated sequences (default min(steps x batch, 256))")
    for flag, kind in (("--lr", float), ("--warmup-steps", int), ("--seq-len", int), ("--batch-size", int),
                       ("--seed", int), ("--top-k", int), ("--save-every", int), ("--grad-clip", float)):
        p.add_argument(flag, type=kind, help="default: see `qat.qat`")
    p.add_argument("--resume", action="store_true", help="continue the training state in --out")
    p.add_argument("--activation-checkpointing", action="store_true", help="recompute layers in backward")
    p.add_argument("--freeze-embedding", action="store_true", help="do not train the tied embedding / LM head")
    p.add_argument("--recipe", help="TOML file whose [qat] values are defaults; flags override them")


def run(args: argparse.Namespace) -> int:
    kw = {k: v for k, v in vars(args).items() if k not in ("command", "recipe")}
    if args.command == "export":
        from .pipeline import export

        export(**kw, log=_log)
    elif args.command == "generate":
        from .chat import generate_text

        generate_text(**kw, log=_log)
    elif args.command == "chat":
        from .chat import chat

        chat(**kw, log=_log)
    elif args.command == "validate":
        from .validate import validate_bundle

        return 0 if validate_bundle(kw["bundle"], log=_log)["passed"] else 1
    elif args.command == "perplexity":
        from .perplexity import perplexity

        perplexity(**kw, log=_log)
    elif args.command == "memory":
        from .memory import memory_report

        memory_report(bundles=kw["bundle"], context=kw["context"], log=_log)
    elif args.command == "qat":
        from .qat import qat

        qat(**{k: v for k, v in kw.items() if v is not None}, log=_log)
    elif args.command == "gptq":
        from .gptq import gptq_checkpoint

        gptq_checkpoint(**{k: v for k, v in kw.items() if v is not None}, log=_log)
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] not in COMMANDS and argv[0] not in ("-h", "--help"):
        argv.insert(0, "export")  # `gemma3-export --model 1b --target coreml`
    try:
        from .recipes import parse_args

        args = parse_args(build_parser(), argv)
        if args.command is None:
            build_parser().print_help()
            return 2
        return run(args)
    except UserError as e:
        print(f"gemma3-export: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("gemma3-export: interrupted.", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
