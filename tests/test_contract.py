"""The bundle contract: every exported manifest validates against the schema, broken and future ones are
refused in one sentence, and the shared vectors (read by the Kotlin and Swift unit tests too) are what
the Python code produces today."""

from __future__ import annotations

import copy
import json
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from gemma3_export import contract
from gemma3_export.bundle import FORMAT_VERSION, MANIFEST, read_bundle, write_manifest
from gemma3_export.errors import UserError

ROOT = Path(__file__).resolve().parents[1]
VECTORS = ROOT / "mobile_demo" / "shared" / "test_vectors"
KOTLIN_LOGIC = ROOT / "mobile_demo" / "android" / "logic"


def vectors(name: str) -> dict:
    return json.loads((VECTORS / name).read_text(encoding="utf-8"))


def one_sentence(message: str) -> bool:
    return message.endswith(".") and "\n" not in message and ". " not in message


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def loaded():
    from gemma3_export.load import load_model

    return load_model("tiny", log=lambda *_: None)


@pytest.fixture(scope="module")
def onnx_bundle(tmp_path_factory) -> Path:
    """A tiny ONNX bundle written by pipeline.export, as a user would."""
    from gemma3_export import pipeline

    out = tmp_path_factory.mktemp("contract") / "tiny-onnx"
    return pipeline.export(model="tiny", target="onnx", out=out, validate=False, log=lambda *_: None)


# -- the schema -------------------------------------------------------------------------------------

def test_schema_is_a_valid_2020_12_schema_of_the_current_format():
    from jsonschema import Draft202012Validator

    Draft202012Validator.check_schema(contract.schema())
    assert contract.schema()["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    assert contract.newest_format() == FORMAT_VERSION


def test_exported_manifest_validates_and_matches_the_example(onnx_bundle):
    manifest = json.loads((onnx_bundle / MANIFEST).read_text())
    contract.check_manifest(manifest)
    assert read_bundle(onnx_bundle, verify=True).manifest == manifest
    example = contract.example_manifest("onnx")
    assert set(example) == set(manifest) - {"validation"}  # the example has every field an export writes
    assert set(example["files"]) == set(manifest["files"])  # tokenizer.json and its config included
    for key in ("inputs", "outputs", "cache", "prefill_chunks", "bos_id", "stop_ids", "chat_template", "config",
                "hf_tokenizer"):
        assert example[key] == manifest[key], key


def test_executorch_example_carries_the_exporters_runner_metadata(loaded):
    from gemma3_export.exporters.executorch import metadata

    example = contract.example_manifest("executorch")
    assert example["target_info"]["metadata"] == metadata(loaded.model, example["max_context"], example["prefill_chunk"])


def test_write_manifest_refuses_a_manifest_off_the_schema(tmp_path):
    m = contract.example_manifest("onnx")
    m.pop("stop_ids")
    (tmp_path / "model.onnx").write_bytes(b"")
    (tmp_path / "tokenizer.model").write_bytes(b"")
    with pytest.raises(UserError, match="'stop_ids' is a required property") as e:
        write_manifest(tmp_path, {k: v for k, v in m.items() if k not in ("files", "versions", "format_version")})
    assert one_sentence(str(e.value))
    assert not (tmp_path / MANIFEST).exists()


def test_future_and_broken_manifests_are_refused_by_read_bundle(onnx_bundle, tmp_path):
    bundle = tmp_path / "b"
    shutil.copytree(onnx_bundle, bundle)
    real = json.loads((onnx_bundle / MANIFEST).read_text())
    table = vectors("manifests.json")
    refused = table["refused"]
    def future(case):
        version = case["set"].get("format_version")
        return isinstance(version, int) and version > FORMAT_VERSION

    assert any(future(c) for c in refused)
    for case in refused:
        m = contract.refused_manifest({"valid": [real, real]}, case)  # the same changes to a real manifest
        (bundle / MANIFEST).write_text(json.dumps(m))
        with pytest.raises(UserError) as e:
            read_bundle(bundle)
        message = str(e.value)
        assert one_sentence(message), message
        if future(case):
            assert "newer gemma3-export" in message and "upgrade" in message
        with pytest.raises(UserError):
            contract.check_manifest(contract.refused_manifest(table, case))


# -- the shared vectors -----------------------------------------------------------------------------

def test_vectors_are_what_the_code_writes_today():
    """Regenerate every vector file and compare byte for byte: they cannot go stale."""
    fresh = contract.build_vectors()
    assert sorted(p.name for p in VECTORS.iterdir()) == sorted(contract.VECTOR_FILES)
    for name, obj in fresh.items():
        assert (VECTORS / name).read_text(encoding="utf-8") == contract.dumps(obj), (
            f"{name} is stale; run {contract.REGENERATE}")


def test_token_vectors(loaded):
    tok = loaded.tokenizer
    t = vectors("tokens.json")
    assert t["special"] == {"pad": 0, "eos": 1, "bos": 2, "unk": 3, "start_of_turn": 105, "end_of_turn": 106}
    for case in t["cases"]:
        assert tok.encode(case["text"], bos=False) == case["ids"]
        assert tok.decode(case["ids"]) == case["text"] == case["decoded"]
    typed = next(c for c in t["cases"] if c["text"].startswith("<start_of_turn>"))
    assert 105 not in typed["ids"]  # SentencePiece never parses a control piece out of text


def test_chat_vectors(loaded):
    from gemma3_export.chat import Conversation
    from gemma3_export.tokenizer import encode_chat, format_chat

    tok = loaded.tokenizer
    c = vectors("chat.json")
    for case in c["cases"]:
        assert format_chat(case["messages"], case["add_generation_prompt"]) == case["text"]
        assert encode_chat(tok, case["messages"], case["add_generation_prompt"]) == case["ids"]
        assert "".join(p["text"] for p in case["parts"]) == case["text"]
    for case in c["refused"]:
        with pytest.raises(UserError):
            format_chat(case["messages"])
    for turn in c["turns"]:
        conv = Conversation(None, tok, system=turn["system"])
        if not turn["first_turn"]:
            conv.fed, conv.pending = [2, 105, 50], turn["pending"]
        assert conv.next_ids(turn["user"]) == turn["ids"]


def test_chunk_vectors():
    from gemma3_export.generate import Runner
    from gemma3_export.runtimes.coreml import CoreMLRunner

    class Recorder(CoreMLRunner):
        """CoreMLRunner's own chunking (prefill for whole chunks, decode for the rest), recorded."""

        def __init__(self, chunk):
            Runner.__init__(self)
            self.max_context, self.chunk, self.calls = 128, chunk, []

        def _call(self, function, tokens, pos):
            self.calls.append(tokens.shape[1])
            return np.zeros(4, np.float32)

    c = vectors("chunks.json")
    for case in c["cases"]:
        accepted, C = case["prefill_chunks"], case["chunk"]
        if accepted == list(range(1, C + 1)):
            r = Runner()
            r.chunk = C
            assert r.chunk_plan(case["n"]) == case["plan"]
        else:
            assert accepted == [C, 1]
            rec = Recorder(C)
            rec.prefill(list(range(case["n"])))
            assert rec.calls == case["plan"]
    for room in c["room"]:
        r = Runner()
        r.max_context, r.pos = room["max_context"], room["pos"]
        if room["fits"]:
            r._check_room(room["n"])
        else:
            with pytest.raises(UserError, match="do not fit the context"):
                r._check_room(room["n"])


def test_stop_vectors():
    cases = vectors("stops.json")["cases"]
    assert {c["stop_token"] for c in cases} >= {1, 106}
    assert {c["reason"] for c in cases} == {"stop", "length", "context"}
    for c in cases:
        assert not set(c["emitted"]) & set(c["stop_ids"])
        assert c["fed"] + ([c["pending"]] if c["pending"] is not None else []) == c["emitted"]
    base_model = next(c for c in cases if c["stop_ids"] == [1])
    assert 106 in base_model["emitted"]  # without 106 in stop_ids, <end_of_turn> is ordinary text


def test_sampling_vectors_match_generate_sampling():
    from gemma3_export.generate import Sampling

    for case in vectors("sampling.json")["cases"]:
        logits = np.asarray(case["logits"], np.float32)
        settings = dict(temperature=case["temperature"], top_k=case["top_k"], top_p=case["top_p"])
        draws = {Sampling(**settings, seed=s)(logits) for s in range(300)}
        assert draws <= set(case["kept"]), case
        assert int(np.argmax(logits)) in draws
        if case["temperature"] == 0:
            assert draws == set(case["kept"]) == {Sampling()(logits)}


def test_greedy_vectors_eager_at_every_chunk_size(loaded):
    from gemma3_export.generate import EagerRunner, generate

    g = vectors("greedy.json")
    for chunk in (g["chunk"], 3, 1):
        runner = EagerRunner(loaded.model, g["max_context"], chunk)
        for case in g["cases"]:
            runner.reset()
            assert [int(i) for i in np.argsort(-runner.prefill(case["prompt_ids"]), kind="stable")[:5]] == case["top5_after_prompt"]
            runner.reset()
            assert list(generate(runner, case["prompt_ids"], g["max_new_tokens"], g["stop_ids"])) == case["continuation"]


def test_greedy_vectors_through_the_onnx_bundle(onnx_bundle, loaded):
    """The exported artifact, in its own runtime, continues the shared prompts exactly as the vectors say."""
    from gemma3_export.generate import generate
    from gemma3_export.pipeline import open_runner

    g = vectors("greedy.json")
    runner = open_runner(onnx_bundle)
    assert runner.max_context == g["max_context"]
    for case in g["cases"]:
        runner.reset()
        got = list(generate(runner, case["prompt_ids"], g["max_new_tokens"], g["stop_ids"]))
        assert got == case["continuation"]
        assert loaded.tokenizer.decode(got) == case["text"]


def test_manifest_vectors():
    table = vectors("manifests.json")
    assert table["supported_format_version"] == FORMAT_VERSION
    assert [m["target"] for m in table["valid"]] == ["onnx", "executorch", "coreml"]
    for m in table["valid"]:
        contract.check_manifest(copy.deepcopy(m))
    whys = set()
    for case in table["refused"]:
        with pytest.raises(UserError) as e:
            contract.check_manifest(contract.refused_manifest(table, case))
        assert one_sentence(str(e.value)), str(e.value)
        whys.add(case["why"])
    assert len(whys) == len(table["refused"])


# -- the apps' logic modules ----------------------------------------------------------------------

def _junit_classpath() -> list[str]:
    jars = [Path("/usr/share/java") / j for j in ("junit4.jar", "hamcrest-core.jar", "kotlin-stdlib.jar")]
    missing = [str(j) for j in jars if not j.is_file()]
    if missing:
        pytest.fail(f"kotlinc is installed but {', '.join(missing)} is not: apt-get install -y kotlin junit4")
    return [str(j) for j in jars]


# .ci/run installs kotlinc, so CI never skips this; elsewhere it needs `apt-get install -y kotlin junit4`.
@pytest.mark.skipif(shutil.which("kotlinc") is None and not os.environ.get("CI"),
                    reason="kotlinc not on PATH (apt-get install -y kotlin junit4)")
def test_kotlin_logic_module_passes_its_junit_tests_on_the_shared_vectors(tmp_path):
    """The Android app's plain-Kotlin module, compiled and tested here (Debian's kotlinc 1.3 + JUnit 4)."""
    classpath = _junit_classpath()
    jar = tmp_path / "logic.jar"
    build = subprocess.run(
        ["kotlinc", "src/main/kotlin", "src/test/kotlin", "-cp", classpath[0], "-d", str(jar)],
        cwd=KOTLIN_LOGIC, capture_output=True, text=True, timeout=300,
    )
    assert build.returncode == 0, build.stdout + build.stderr
    tests = sorted(f"org.gemma3export.logic.{p.stem}" for p in (KOTLIN_LOGIC / "src/test/kotlin").rglob("*Test.kt"))
    run = subprocess.run(
        ["java", f"-Dvectors={VECTORS}", "-cp", ":".join([str(jar), *classpath]), "org.junit.runner.JUnitCore", *tests],
        capture_output=True, text=True, timeout=120,
    )
    assert run.returncode == 0 and "OK (" in run.stdout, run.stdout[-4000:] + run.stderr[-2000:]
    ran = int(run.stdout.rsplit("OK (", 1)[1].split()[0])
    assert ran >= 20, run.stdout[-500:]


def test_no_app_source_is_a_placeholder():
    """The app code CI cannot build is at least free of stubs."""
    sources = [p for p in (ROOT / "mobile_demo").rglob("*") if p.suffix in (".kt", ".swift", ".kts", ".yml", ".xml")]
    assert len(sources) > 20
    for path in sources:
        text = path.read_text(encoding="utf-8")
        for marker in ("TODO", "FIXME", "fatalError(\"unimplemented", "NotImplementedError", "placeholder"):
            assert marker not in text, f"{path.relative_to(ROOT)} contains {marker}"
