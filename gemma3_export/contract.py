"""The bundle contract shared with the mobile apps: the manifest schema and the shared test vectors.

`check_manifest` validates a manifest against `data/manifest.schema.json` (JSON Schema 2020-12, one
schema per `format_version`) plus the cross-field rules a schema cannot state. `write_test_vectors`
writes the cases that the Python tests and the apps' unit tests (JUnit, XCTest) both check: token ids
of the tiny tokenizer, chat renderings, chunk plans, stop handling, sampling filters, manifests to
accept or refuse, and greedy continuations of the tiny model. Regenerate them with

    python -m gemma3_export.contract mobile_demo/shared/test_vectors
"""

from __future__ import annotations

import copy
import functools
import hashlib
import json
import sys
from importlib import resources
from pathlib import Path

from .errors import UserError

SCHEMA = "data/manifest.schema.json"
VECTOR_FILES = ("tokens.json", "chat.json", "chunks.json", "stops.json", "sampling.json", "manifests.json", "greedy.json")
REGENERATE = "python -m gemma3_export.contract mobile_demo/shared/test_vectors"


@functools.lru_cache(maxsize=1)
def schema() -> dict:
    """The manifest schema (the newest format this gemma3-export reads)."""
    return json.loads(resources.files("gemma3_export").joinpath(SCHEMA).read_text())


def newest_format() -> int:
    """The highest `format_version` the schema describes (bundle.FORMAT_VERSION must equal it)."""
    return schema()["properties"]["format_version"]["maximum"]


@functools.lru_cache(maxsize=1)
def _validator():
    from jsonschema import Draft202012Validator

    Draft202012Validator.check_schema(schema())
    return Draft202012Validator(schema())


def check_manifest(manifest: dict, name: str = "The manifest") -> None:
    """Raise UserError (one sentence, naming `name`) unless `manifest` is a valid bundle manifest."""
    from jsonschema.exceptions import best_match

    if not isinstance(manifest, dict):
        raise UserError(f"{name} is not a JSON object.")
    version = manifest.get("format_version")
    if not isinstance(version, int) or isinstance(version, bool):
        raise UserError(f"{name} has no integer format_version.")
    if version > newest_format():
        raise UserError(
            f"{name} is bundle format {version}, newer than the {newest_format()} this gemma3-export reads; "
            "upgrade gemma3-export."
        )
    error = best_match(_validator().iter_errors(manifest))
    if error is not None:
        where = "/".join(str(p) for p in error.absolute_path) or "the top level"
        raise UserError(f"{name} does not match bundle format {version} at {where}: {error.message.rstrip('.')}.")
    problem = _cross_field_problem(manifest)
    if problem:
        raise UserError(f"{name} is inconsistent: {problem}.")


def _cross_field_problem(m: dict) -> str | None:
    """What the schema cannot say: fields that must agree with each other."""
    chunks, files = m["prefill_chunks"], m["files"]
    if m["prefill_chunk"] not in chunks:
        return f"prefill_chunk {m['prefill_chunk']} is not one of prefill_chunks {chunks}"
    if max(chunks) > m["max_context"]:
        return f"a prefill chunk of {max(chunks)} does not fit max_context {m['max_context']}"
    if len(m["cache"]) != m["config"]["num_hidden_layers"]:
        return f"cache lists {len(m['cache'])} layers, the config has {m['config']['num_hidden_layers']}"
    if m["bos_id"] in m["stop_ids"]:
        return f"bos_id {m['bos_id']} is also a stop id"
    if max([m["bos_id"], *m["stop_ids"]]) >= m["config"]["vocab_size"]:
        return "a special token id is outside the vocabulary"
    vision = m.get("vision")
    for path in [m["artifact"], m["tokenizer"], *m.get("hf_tokenizer", []), *([vision["artifact"]] if vision else [])]:
        if path not in files and not any(f.startswith(path.rstrip("/") + "/") for f in files):
            return f"{path} is not among its files"
    if vision and "image_embeds" not in [v["name"] for v in m["inputs"]]:
        return "a vision bundle's decoder must take image_embeds"
    if vision and vision["mm_tokens_per_image"] > m["prefill_chunk"]:
        return f"an image's {vision['mm_tokens_per_image']} tokens do not fit prefill_chunk {m['prefill_chunk']}"
    return None


# -- example manifests ----------------------------------------------------------------------------

_EXAMPLE_CONTEXT, _EXAMPLE_CHUNK = 128, 8


def example_manifest(target: str) -> dict:
    """A valid manifest of a tiny bundle for `target`, written the way pipeline.export writes one
    (common fields) plus the fields that target's exporter returns; checksums are of empty files."""
    from dataclasses import asdict

    from .bundle import cache_layout
    from .config import preset
    from .quant import check_scheme
    from .tokenizer import CHAT_TEMPLATE

    config, ctx, C = preset("tiny"), _EXAMPLE_CONTEXT, _EXAMPLE_CHUNK
    empty = hashlib.sha256(b"").hexdigest()
    vocab, n = config.vocab_size, config.num_hidden_layers
    token_dtype, cache_dtype = ("int32", "float16") if target == "coreml" else ("int64", "float32")
    common = {
        "format_version": newest_format(),
        "target": target,
        "model": "tiny",
        "weights": "random (seed 0)",
        "source": {"model": "tiny", "checkpoint": None, "random_weights": False},
        "config": config.to_hf(),
        "max_context": ctx,
        "prefill_chunk": C,
        "quant": asdict(check_scheme(target, None)),
        # ONNX: GroupQueryAttention's windowed local caches of window + chunk rows (exporters/onnx_attention.py)
        "cache": cache_layout(config, ctx, cache_dtype, config.sliding_window + C if target == "onnx" else None),
        "tokenizer": "tokenizer.model",
        "hf_tokenizer": ["tokenizer.json", "tokenizer_config.json"],
        "bos_id": 2,
        "stop_ids": [1, 106],
        "chat_template": CHAT_TEMPLATE,
        "inputs": [{"name": "tokens", "shape": [1, "T"], "dtype": token_dtype},
                   {"name": "input_pos", "shape": [1], "dtype": token_dtype}],
        "outputs": [{"name": "logits", "shape": [1, vocab], "dtype": "float32"}],
        "cache_dtype": cache_dtype,
        "prefill_chunks": list(range(1, C + 1)),
    }
    if target == "onnx":
        caches = [(f"{kv}_cache_{i}", layer["shape"]) for i, layer in enumerate(common["cache"]) for kv in "kv"]
        common["inputs"] += [{"name": nm, "shape": shape, "dtype": "float32"} for nm, shape in caches]
        common["outputs"] += [{"name": nm.replace("_cache_", "_cache_out_"), "shape": shape, "dtype": "float32"}
                              for nm, shape in caches]
        extra = {"artifact": "model.onnx", "target_info": {"opset": 21, "layers": n, "external_data": "model.onnx.data"}}
        files = ["model.onnx", "model.onnx.data"]
    elif target == "executorch":
        metadata = {"get_max_seq_len": C, "get_max_context_len": ctx, "get_vocab_size": vocab, "get_bos_id": 2,
                    "get_eos_ids": [1, 106], "use_kv_cache": True, "enable_dynamic_shape": C > 1}
        extra = {"artifact": "model.pte", "target_info": {"method": "forward", "backend": "XNNPACK", "metadata": metadata}}
        files = ["model.pte"]
    elif target == "coreml":
        extra = {"artifact": "model.mlpackage", "prefill_chunks": [C, 1],
                 "target_info": {"minimum_deployment_target": "iOS18",
                                 "functions": {"prefill": {"T": C}, "decode": {"T": 1}}}}
        files = ["model.mlpackage/Manifest.json", "model.mlpackage/Data/com.apple.CoreML/model.mlmodel"]
    else:
        raise ValueError(target)
    files += ["tokenizer.model", "tokenizer.json", "tokenizer_config.json"]
    return {**common, **extra, "files": {f: empty for f in sorted(files)},
            "versions": {"gemma3-export": "example", "python": "example"}}


def _refused_manifests() -> list[dict]:
    """Changes that make the executorch example (valid[1]) a manifest every reader must refuse: `set`
    replaces top-level fields, `remove` deletes fields by slash path."""

    def case(why: str, replace: dict | None = None, remove: list[str] | None = None) -> dict:
        return {"why": why, "base": 1, "set": replace or {}, "remove": remove or []}

    return [
        case("written by a newer format (major version 2)", replace={"format_version": 2}),
        case("no format_version", remove=["format_version"]),
        case("format_version is a string", replace={"format_version": "1"}),
        case("no stop ids", remove=["stop_ids"]),
        case("empty stop ids", replace={"stop_ids": []}),
        case("stop ids are strings", replace={"stop_ids": ["<eos>", "<end_of_turn>"]}),
        case("no bos_id", remove=["bos_id"]),
        case("no prefill chunks", replace={"prefill_chunks": []}),
        case("prefill_chunk is not an accepted chunk", replace={"prefill_chunk": 16}),
        case("a prefill chunk larger than the context", replace={"max_context": 4}),
        case("max_context is zero", replace={"max_context": 0}),
        case("unknown target", replace={"target": "tflite"}),
        case("no chat template", remove=["chat_template"]),
        case("no artifact", remove=["artifact"]),
        case("config without vocab_size", remove=["config/vocab_size"]),
        case("bos_id outside the vocabulary", replace={"bos_id": 512}),
        case("bos_id is a stop id", replace={"bos_id": 1}),
    ]


def refused_manifest(vectors: dict, case: dict) -> dict:
    """The manifest a `refused` case of manifests.json describes (its base with the changes applied)."""
    m = copy.deepcopy(vectors["valid"][case["base"]])
    m.update(case["set"])
    for path in case["remove"]:
        *parents, leaf = path.split("/")
        node = m
        for key in parents:
            node = node[key]
        del node[leaf]
    return m


# -- vectors ----------------------------------------------------------------------------------------

_TEXTS = [
    "Hello world",
    "The lighthouse keeper climbed the stairs.",
    "  two  spaces\nand a new line",
    "digits 12345 split one by one",
    "caf\u00e9 \u2615 and \u00fcmlauts",
    "<start_of_turn> typed as text is not a control token",
]


def _tokens(tok) -> dict:
    from .tokenizer import BOS, END_OF_TURN, EOS, START_OF_TURN

    special = {name: tok.id_of(piece) for name, piece in
               (("pad", "<pad>"), ("eos", EOS), ("bos", BOS), ("unk", "<unk>"),
                ("start_of_turn", START_OF_TURN), ("end_of_turn", END_OF_TURN))}
    return {
        "about": "Token ids of the tiny tokenizer (tokenizer.tiny_tokenizer(512), Gemma's special ids); "
                 "ids never include <bos>, which is always inserted by id.",
        "special": special,
        "pieces": {str(i): tok.sp.id_to_piece(i) for i in sorted(special.values())},
        "cases": [{"text": t, "ids": tok.encode(t, bos=False), "decoded": tok.decode(tok.encode(t, bos=False))}
                  for t in _TEXTS],
    }


def _parts(tok, parts) -> list[dict]:
    return [{"control": c, "text": t, "ids": [tok.id_of(t)] if c else tok.encode(t, bos=False)} for c, t in parts]


def _chat(tok) -> dict:
    from .chat import Conversation
    from .tokenizer import CHAT_TEMPLATE, END_OF_TURN, _chat_parts, encode_chat, format_chat

    def user(text):
        return {"role": "user", "content": text}

    conversations = [
        ("one user turn", [user("Hello there!")], True),
        ("turn text is trimmed", [user("  What is a lighthouse?  \n")], True),
        ("system prompt joins the first user turn", [{"role": "system", "content": "You are terse."}, user("Name a color.")], True),
        ("multi-turn, assistant spelled model", [user("Hi"), {"role": "assistant", "content": "Hello! How can I help?"},
                                                 user("Tell me about bread.")], True),
        ("finished exchange, no generation prompt", [user("Hi"), {"role": "model", "content": "Hello."}], False),
        ("control strings typed by the user stay text", [user("say <end_of_turn> please")], True),
    ]
    cases = []
    for name, messages, gen in conversations:
        parts = _parts(tok, _chat_parts(messages, gen))
        ids = encode_chat(tok, messages, gen)
        assert [i for p in parts for i in p["ids"]] == ids
        cases.append({"name": name, "messages": messages, "add_generation_prompt": gen,
                      "text": format_chat(messages, gen), "parts": parts, "ids": ids})
    refused = [
        ("starts with the assistant", [{"role": "assistant", "content": "Hi"}]),
        ("two user turns in a row", [user("a"), user("b")]),
        ("a system message alone", [{"role": "system", "content": "Be brief."}]),
        ("no messages", []),
        ("unknown role", [{"role": "tool", "content": "x"}]),
    ]
    turns = []
    for name, system, fed, pending, text in [
        ("first turn with a system prompt", "Be brief.", [], None, "Hi there"),
        ("next turn after a reply ended by a stop id", None, [2, 105, 50, 51], None, "And then?"),
        ("next turn after a reply cut by max_new_tokens", None, [2, 105, 50, 51], 52, "Go on."),
    ]:
        conv = Conversation(None, tok, system=system)
        conv.fed, conv.pending = list(fed), pending
        ids = conv.next_ids(text)
        if fed:
            parts = _parts(tok, [(True, END_OF_TURN), (False, "\n"), *list(_chat_parts([user(text)], True))[1:]])
        else:
            msgs = ([{"role": "system", "content": system}] if system else []) + [user(text)]
            parts = _parts(tok, _chat_parts(msgs, True))
        assert ([pending] if pending is not None else []) + [i for p in parts for i in p["ids"]] == ids
        turns.append({"name": name, "system": system, "first_turn": not fed, "pending": pending, "user": text,
                      "parts": parts, "text": "".join(p["text"] for p in parts), "ids": ids})
    return {
        "about": "Gemma 3 chat renderings (tokenizer.format_chat / encode_chat): control tokens are inserted by "
                 "id, the text between them is encoded; `turns` are what chat.Conversation feeds for a turn "
                 "when the cache already holds the history (the pending token is a cut reply's last one).",
        "template_sha256": hashlib.sha256(CHAT_TEMPLATE.encode()).hexdigest(),
        "cases": cases,
        "refused": [{"why": why, "messages": m} for why, m in refused],
        "turns": turns,
    }


def chunk_plan(n: int, accepted: list[int]) -> list[int]:
    """Forward-call sizes that prefill n tokens: greedily the largest accepted size that fits. For
    prefill_chunks 1..C this is Runner.chunk_plan (full chunks, then the rest); for Core ML's [C, 1]
    it is the prefill calls and then the rest token by token, as CoreMLRunner does."""
    plan, left = [], n
    while left:
        size = max(s for s in accepted if s <= left)
        plan.append(size)
        left -= size
    return plan


def _chunks() -> dict:
    cases = []
    for C, accepted in [(1, [1]), (4, [1, 2, 3, 4]), (8, list(range(1, 9))), (8, [8, 1]), (5, [5, 1])]:
        for n in (1, 3, 4, 5, 8, 9, 17, 24):
            cases.append({"n": n, "chunk": C, "prefill_chunks": accepted, "plan": chunk_plan(n, accepted)})
    room = [{"pos": p, "n": n, "max_context": 128, "fits": p + n <= 128} for p, n in
            [(0, 128), (0, 129), (120, 8), (120, 9), (127, 1), (128, 1)]]
    return {"about": "Prefill chunk plans over a bundle's prefill_chunks, and whether n more tokens fit "
                     "the context at position pos (past max_context is an error, never a wrap).",
            "cases": cases, "room": room}


def _stops() -> dict:
    import numpy as np

    from .generate import Runner, Sampling, generate

    class Scripted(Runner):
        def __init__(self, script, max_context):
            super().__init__()
            self.script, self.max_context, self.chunk, self.decoded = list(script), max_context, 4, []

        def _step(self, tokens, pos):
            if tokens.shape[1] == 1 and pos > 0:
                self.decoded.append(int(tokens[0, 0]))
            logits = np.zeros(512, np.float32)
            logits[self.script.pop(0)] = 1
            return logits

        def _reset(self):
            pass

    cases = []
    for stop_ids, sampled, max_new, ctx in [
        ([1, 106], [40, 41, 106, 42], 10, 64),
        ([1, 106], [40, 1, 42], 10, 64),
        ([1, 106], [106, 40], 10, 64),
        ([1, 106], [40, 41, 42, 43, 44], 3, 64),
        ([1, 106], [40, 41, 42, 43, 44, 45], 10, 4),
        ([1], [40, 106, 41, 1, 42], 10, 64),
    ]:
        runner = Scripted(sampled, ctx)
        emitted = list(generate(runner, [2], max_new, stop_ids, Sampling()))
        consumed = len(sampled) - len(runner.script)
        stopped = sampled[consumed - 1] in stop_ids
        reason = "stop" if stopped else ("length" if len(emitted) == max_new else "context")
        pending = None if stopped else emitted[-1]
        assert runner.decoded == emitted[: len(emitted) - (0 if stopped else 1)]
        cases.append({"prompt": [2], "max_context": ctx, "stop_ids": stop_ids, "max_new_tokens": max_new,
                      "sampled": sampled, "emitted": emitted, "fed": runner.decoded, "pending": pending,
                      "reason": reason, "stop_token": sampled[consumed - 1] if stopped else None})
    return {"about": "generate.generate over scripted samples: a stop id ends the reply and is neither "
                     "emitted nor fed; a reply cut by max_new_tokens or the full context leaves its last "
                     "token sampled but not fed (pending).",
            "cases": cases}


def kept_tokens(logits: list[float], temperature: float, top_k: int, top_p: float) -> list[int]:
    """The token ids generate.Sampling can draw from `logits` (temperature 0: the greedy argmax)."""
    import numpy as np
    import torch

    if temperature == 0:
        return [int(np.argmax(np.asarray(logits, np.float32)))]
    x = torch.tensor(logits, dtype=torch.float32) / temperature
    if top_k:
        kth = torch.topk(x, min(top_k, x.numel())).values[-1]
        x = x.masked_fill(x < kth, float("-inf"))
    probs = x.softmax(-1)
    if top_p < 1:
        sorted_p, order = probs.sort(descending=True)
        before = sorted_p.cumsum(-1) - sorted_p
        margin = (before - top_p).abs().min().item()
        assert margin > 1e-3, f"top_p {top_p} is too close to a cumulative probability to be portable"
        probs[order[before > top_p]] = 0
    return sorted(int(i) for i in torch.nonzero(probs).flatten())


def _sampling() -> dict:
    logits = [1.5, -0.5, 3.25, 0.0, 2.75, -2.0, 0.5, 1.0]
    cases = [{"logits": lg, "temperature": t, "top_k": k, "top_p": p, "kept": kept_tokens(lg, t, k, p)}
             for lg, t, k, p in [
                 (logits, 0.0, 64, 0.95),
                 ([1.0, 3.0, 3.0, 0.0], 0.0, 64, 0.95),  # ties: the first maximum
                 (logits, 1.0, 1, 1.0),
                 (logits, 1.0, 3, 1.0),
                 ([2.0, 2.0, 2.0, 1.0, 0.0], 1.0, 2, 1.0),  # ties at the k-th value are all kept
                 (logits, 1.0, 0, 0.5),
                 (logits, 1.0, 0, 0.8),
                 (logits, 0.5, 0, 0.9),
                 (logits, 2.0, 4, 0.9),
                 (logits, 1.0, 64, 0.95),
             ]]
    return {"about": "generate.Sampling's filter: temperature 0 is greedy (first maximum); otherwise the "
                     "top_k largest (ties at the k-th kept), then the smallest set whose probability reaches "
                     "top_p. `kept` lists the ids that can be drawn. Draws themselves are seeded per runtime "
                     "and are not compared across languages.",
            "cases": cases}


def _manifests() -> dict:
    return {"about": "Manifests every reader (Python, Kotlin, Swift) accepts (`valid`: onnx, executorch, "
                     "coreml) or refuses (`refused`: valid[base] with `set` fields replaced and `remove` "
                     "paths deleted). A reader refuses a format_version above the one it supports.",
            "supported_format_version": newest_format(),
            "valid": [example_manifest(t) for t in ("onnx", "executorch", "coreml")],
            "refused": _refused_manifests()}


GREEDY_CONTEXT, GREEDY_CHUNK, GREEDY_NEW = 128, 8, 12


def _greedy(loaded) -> dict:
    import numpy as np

    from .generate import EagerRunner, generate
    from .tokenizer import BOS, _chat_parts, encode_chat

    tok = loaded.tokenizer
    runner = EagerRunner(loaded.model, GREEDY_CONTEXT, GREEDY_CHUNK)
    cases = []
    for prompt, chat in [("The lighthouse keeper climbed the stairs and", False),
                         ("Once upon a time", False),
                         ("Tell me about the bakery on the corner.", True)]:
        messages = [{"role": "user", "content": prompt}]
        ids = encode_chat(tok, messages) if chat else tok.encode(prompt)
        parts = _parts(tok, _chat_parts(messages, True) if chat else [(True, BOS), (False, prompt)])
        assert [i for p in parts for i in p["ids"]] == ids
        runner.reset()
        top5 = [int(i) for i in np.argsort(-runner.prefill(ids), kind="stable")[:5]]
        runner.reset()
        new = list(generate(runner, ids, GREEDY_NEW, tok.stop_ids))
        cases.append({"prompt": prompt, "chat": chat, "parts": parts, "prompt_ids": ids, "top5_after_prompt": top5,
                      "continuation": new, "text": tok.decode(new)})
    return {"about": "Greedy continuations of the tiny model (load_model('tiny'): seeded random weights), "
                     "eager, prompt prefilled in chunks; stops on stop_ids. top5_after_prompt: the five "
                     "largest logits after the prompt, largest first.",
            "model": "tiny", "max_context": GREEDY_CONTEXT, "chunk": GREEDY_CHUNK, "max_new_tokens": GREEDY_NEW,
            "stop_ids": tok.stop_ids, "cases": cases}


def build_vectors() -> dict[str, dict]:
    """Every vector file's content, by file name."""
    from .load import load_model

    loaded = load_model("tiny", log=lambda *_: None)
    tok = loaded.tokenizer
    content = {"tokens.json": _tokens(tok), "chat.json": _chat(tok), "chunks.json": _chunks(),
               "stops.json": _stops(), "sampling.json": _sampling(), "manifests.json": _manifests(),
               "greedy.json": _greedy(loaded)}
    return {name: {"generated_by": REGENERATE, **content[name]} for name in VECTOR_FILES}


def dumps(obj: dict) -> str:
    """The exact text of a vector file (stable across runs, UTF-8, one trailing newline)."""
    return json.dumps(obj, indent=1, ensure_ascii=False) + "\n"


def write_test_vectors(folder: str | Path) -> list[Path]:
    """Write the vector files into `folder` (created if needed); returns their paths."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, obj in build_vectors().items():
        (folder / name).write_text(dumps(obj), encoding="utf-8")
        paths.append(folder / name)
    return paths


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m gemma3_export.contract FOLDER", file=sys.stderr)
        return 2
    for path in write_test_vectors(argv[0]):
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
