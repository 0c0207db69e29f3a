"""ONNX export and the onnxruntime runner (tiny preset): parity with the eager cached model across the
sliding window, the cache bound in place, every scheme against its eager simulation.

Exports are slow (~10-20 s each), so bundles are built once per test session by `tiny_bundle`
(test_validate.py and test_memory.py use it too) and the scheme tests share one float graph.
"""

from __future__ import annotations

import atexit
import copy
import io
import shutil
import tempfile
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper

from conftest import split_siblings, tiny_model
from gemma3_export.bundle import read_bundle
from gemma3_export.exporters import onnx as onnx_export
from gemma3_export.exporters.onnx_attention import resident
from gemma3_export.generate import EagerRunner
from gemma3_export.load import load_model
from gemma3_export.pipeline import export, make_spec, open_runner
from gemma3_export.runtimes.onnx import OnnxRunner

CONTEXT, CHUNK, W = 48, 6, 8  # tiny: sliding window 8, globals at layers 2 and 5
GLOBAL = (2, 5)
# Step sizes: prefill chunks and decode steps mixed; positions W-1, W, W+1, chunks straddling 2W and
# 4W, ring wrap-around, over 5+ windows.
PLAN = [3, 4, 1, 1, 1, 5, 3, 6, 1, 1, 2, 6] + [1] * 8
_BUNDLES: dict[str, Path] = {}


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_bundle(scheme: str) -> Path:
    """A tiny bundle (context 48, chunk 6) exported through the pipeline, once per test session."""
    if scheme not in _BUNDLES:
        root = Path(tempfile.mkdtemp(prefix="gemma3-onnx-test-"))
        atexit.register(shutil.rmtree, root, True)
        _BUNDLES[scheme] = export(model="tiny", target="onnx", quant=scheme, context=CONTEXT, chunk=CHUNK,
                                  out=root / scheme, validate=False, log=lambda *_: None)
    return _BUNDLES[scheme]


def token_ids(n: int, seed: int = 0) -> list[int]:
    return [2] + np.random.default_rng(seed).integers(3, 512, n - 1).tolist()


def run_plan(runner, ids: list[int]) -> tuple[list[int], list[np.ndarray]]:
    """Feed ids in PLAN's step sizes; return the last position and logits of every step."""
    runner.reset()
    positions, logits = [], []
    for size in PLAN:
        logits.append(runner.prefill(ids[runner.pos : runner.pos + size]))
        positions.append(runner.pos - 1)
    return positions, logits


def test_plan_crosses_the_window_where_gemma_breaks():
    ends = np.cumsum(PLAN) - 1
    starts = ends - np.asarray(PLAN) + 1
    assert {W - 1, W, W + 1} <= set(ends[np.asarray(PLAN) == 1].tolist())
    assert any(s < 2 * W <= e for s, e in zip(starts, ends)) and any(s < 4 * W <= e for s, e in zip(starts, ends))
    assert ends[-1] + 1 >= 5 * W and max(PLAN) == CHUNK


@pytest.fixture(scope="module")
def fp32_runner():
    return OnnxRunner.from_bundle(read_bundle(tiny_bundle("fp32")))


def test_fp32_matches_the_eager_cached_model(fp32_runner, tiny):
    ids = token_ids(sum(PLAN))
    positions, got = run_plan(fp32_runner, ids)
    _, ref = run_plan(EagerRunner(tiny, CONTEXT, CHUNK), ids)
    diffs = [float(np.abs(a - b).max()) for a, b in zip(got, ref)]
    assert max(diffs) <= 1e-4, dict(zip(positions, diffs))
    with torch.no_grad():  # and the uncached full-sequence forward (rung 2), at every step's last token
        full = tiny(torch.tensor([ids]))[0].numpy()
    assert max(float(np.abs(g - full[p]).max()) for p, g in zip(positions, got)) <= 1e-4
    # The caches hold the same keys and values: global layers slot for slot; local layers the last
    # window's positions, in onnxruntime's windowed layout (the eager model's in its ring).
    n, diffs = fp32_runner.pos, []
    for layer, (eager, ours) in enumerate(zip(tiny.caches, zip(*[iter(fp32_runner.cache_arrays())] * 2))):
        for e, o in zip((eager.k.numpy(), eager.v.numpy()), ours):
            if layer in GLOBAL:
                diffs.append(np.abs(o[:, :, :n] - e[:, :, :n]).max())
            else:
                held = resident(n, o.shape[2], W)
                assert held >= W
                last = np.arange(n - W, n)  # row of position p: p - (n - held); ring slot: p % W
                diffs.append(np.abs(o[:, :, last - (n - held)] - e[:, :, last % W]).max())
    assert max(diffs) <= 1e-5


def test_generation_is_the_eager_one(fp32_runner, tiny):
    from gemma3_export.generate import generate

    prompt = token_ids(11, seed=3)
    fp32_runner.reset()
    got = list(generate(fp32_runner, prompt, 30, stop_ids=()))
    want = list(generate(EagerRunner(tiny, CONTEXT, CHUNK), prompt, 30, stop_ids=()))
    assert got == want and fp32_runner.pos == 11 + 29


def test_manifest_describes_the_graph(fp32_runner):
    b = read_bundle(tiny_bundle("fp32"), verify=True)
    m = b.manifest
    names = [v["name"] for v in m["inputs"]]
    assert names[:2] == ["tokens", "input_pos"] and names[2:6] == ["k_cache_0", "v_cache_0", "k_cache_1", "v_cache_1"]
    assert [v["name"] for v in m["outputs"]][:3] == ["logits", "k_cache_out_0", "v_cache_out_0"]
    assert m["inputs"][0]["shape"] == [1, "T"] and m["prefill_chunks"] == list(range(1, CHUNK + 1))
    shapes = {v["name"]: v["shape"] for v in m["inputs"]}
    # local: onnxruntime's windowed cache, window + chunk rows; global: full length
    assert shapes["k_cache_0"] == [1, 2, W + CHUNK, 32] and shapes["k_cache_2"] == [1, 2, CONTEXT, 32]
    assert [layer["shape"] for layer in m["cache"]] == [shapes[f"k_cache_{i}"] for i in range(6)]
    assert [layer["cache"] for layer in m["cache"]] == ["full" if i in GLOBAL else "window" for i in range(6)]
    assert m["target_info"]["attention"].startswith("GroupQueryAttention")
    assert m["cache_dtype"] == "float32" and m["quant"]["name"] == "fp32" and m["artifact"] == "model.onnx"
    session = fp32_runner.session
    assert [v.name for v in session.get_inputs()] == names
    assert session.get_inputs()[0].shape == [1, "T"]


@pytest.mark.parametrize("scheme", ["fp32", "int4b32"])
def test_every_rms_norm_is_one_fused_node(scheme):
    """4 norms per layer, q- and k-norm, the final norm: SimplifiedLayerNormalization each, scale 1 + w
    (the parity tests above run these graphs)."""
    graph = onnx.load(tiny_bundle(scheme) / "model.onnx").graph
    ops = [n.op_type for n in graph.node]
    assert ops.count("SimplifiedLayerNormalization") == 6 * 6 + 1
    assert not {"Pow", "Sqrt", "Reciprocal", "ReduceMean"} & set(ops)
    model = load_model("tiny", log=lambda *_: None).model
    want = {(1 + m.weight.detach()).numpy().tobytes() for m in model.modules() if type(m).__name__ == "RMSNorm"}
    norms = [n for n in graph.node if n.op_type == "SimplifiedLayerNormalization"]
    assert {_initializer(graph, n.input[1]).tobytes() for n in norms} == want and len(want) == len(norms)


def test_cache_is_bound_in_place_and_never_copied_through_numpy(fp32_runner, monkeypatch):
    fp32_runner.reset()
    pointers = [v.data_ptr() for v in fp32_runner._caches]
    assert pointers == [a.ctypes.data for a in fp32_runner.cache_numpy]  # OrtValues wrap the arrays
    monkeypatch.setattr(fp32_runner.session, "run", lambda *a, **k: pytest.fail("session.run copies the cache"))
    fp32_runner.prefill(token_ids(7))
    for _ in range(3):
        fp32_runner.decode(5)
    assert [v.data_ptr() for v in fp32_runner._caches] == pointers
    assert np.abs(fp32_runner.cache_numpy[4]).sum() > 0  # the graph wrote into the bound array (layer 2, k)


def _optimized_graph(bundle: Path, tmp_path: Path):
    """The graph as onnxruntime runs it, after its own optimizations."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(str(bundle / "model.onnx"), options)
    return onnx.load(tmp_path / "optimized.onnx", load_external_data=False).graph  # the nodes, not the weights


def test_attention_is_one_fused_node_per_layer_writing_its_cache_in_place(tmp_path):
    """fp32 (and every float-compute scheme): one GroupQueryAttention per layer whose past input is the
    layer's cache input and whose present output is its cache output, so the runner's one buffer per
    cache is both (onnxruntime's past_present_share_buffer); no decomposed attention is left."""
    graph = _optimized_graph(tiny_bundle("fp32"), tmp_path)
    ops = [n.op_type for n in graph.node]
    assert not {"Softmax", "ScatterElements", "Where"} & set(ops)
    gqa = [n for n in graph.node if n.op_type == "GroupQueryAttention"]
    assert len(gqa) == 6
    for i, node in enumerate(gqa):
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        assert list(node.input[3:5]) == [f"k_cache_{i}", f"v_cache_{i}"]
        assert list(node.output[1:3]) == [f"k_cache_out_{i}", f"v_cache_out_{i}"]
        local = i not in GLOBAL
        assert (attrs["local_window_size"], attrs["sliding_window_cache"]) == ((W, 1) if local else (-1, 0))
        assert attrs["do_rotary"] == 1 and attrs["scale"] == pytest.approx(32**-0.5)


def test_decomposed_writes_follow_the_reads(tmp_path):
    """fp16 keeps the decomposed attention. onnxruntime skips ScatterElements' copy when input and
    output share a buffer. Global caches are read after the write; ring caches must be written from the
    attended copy, not from the graph input, or the write could land before the read. Checked on
    onnxruntime's optimized graph."""
    graph = _optimized_graph(tiny_bundle("fp16"), tmp_path)
    assert "GroupQueryAttention" not in {n.op_type for n in graph.node}
    inputs = {v.name for v in graph.input}
    data = {n.output[0]: n.input[0] for n in graph.node if n.op_type == "ScatterElements"}
    for i in range(6):
        for kv in "kv":
            source = data[f"{kv}_cache_out_{i}"]
            if i in GLOBAL:
                assert source == f"{kv}_cache_{i}"
            else:
                assert source not in inputs


def test_reset_forgets_the_conversation(fp32_runner):
    ids = token_ids(9)
    fp32_runner.prefill(token_ids(20, seed=7))
    fp32_runner.reset()
    first = fp32_runner.prefill(ids)
    fp32_runner.decode(9)
    fp32_runner.reset()
    assert fp32_runner.pos == 0 and np.array_equal(fp32_runner.prefill(ids), first)


_NO_TORCH = """
import io, json, sys
from gemma3_export.chat import Conversation, open_source
from gemma3_export.cli import main
from gemma3_export.generate import Sampling, generate

bundle, prompt = sys.argv[1], json.loads(sys.argv[2])
runner, tok = open_source(bundle=bundle)
greedy = list(generate(runner, prompt, 30, stop_ids=()))
runner.reset()
sampled = list(generate(runner, prompt, 12, stop_ids=(), sampling=Sampling(temperature=1.0, top_k=20, seed=4)))
runner.reset()
reply, _ = Conversation(runner, tok).say("hello there", 6, Sampling(), out=io.StringIO())
code = main(["generate", "--bundle", bundle, "--prompt", "hello", "--max-new-tokens", "3"])
print(json.dumps({"greedy": greedy, "sampled": sampled, "reply": reply, "code": code, "torch": "torch" in sys.modules}))
"""


def test_running_a_bundle_never_imports_torch(fp32_runner, tiny):
    """`import torch` alone adds ~220 MB of peak RSS: loading an ONNX bundle and generating from it
    (library, chat and CLI paths) stays numpy-only, with the tokens of the in-process runners."""
    import json
    import subprocess
    import sys

    from gemma3_export.chat import Conversation
    from gemma3_export.generate import Sampling, generate
    from gemma3_export.tokenizer import Tokenizer

    prompt = token_ids(11, seed=3)
    run = subprocess.run([sys.executable, "-c", _NO_TORCH, str(tiny_bundle("fp32")), json.dumps(prompt)],
                         capture_output=True, text=True, check=True)
    got = json.loads(run.stdout.splitlines()[-1])
    assert not got["torch"] and got["code"] == 0
    assert got["greedy"] == list(generate(EagerRunner(tiny, CONTEXT, CHUNK), prompt, 30, stop_ids=()))
    fp32_runner.reset()
    sampling = Sampling(temperature=1.0, top_k=20, seed=4)
    assert got["sampled"] == list(generate(fp32_runner, prompt, 12, stop_ids=(), sampling=sampling))
    fp32_runner.reset()
    tok = Tokenizer(read_bundle(tiny_bundle("fp32")).tokenizer_path)
    assert got["reply"] == Conversation(fp32_runner, tok).say("hello there", 6, Sampling(), out=io.StringIO())[0]


# -- int4 blocks of 32 through the pipeline ----------------------------------------------------------


def test_int4b32_agrees_with_the_eager_model():
    bundle = read_bundle(tiny_bundle("int4b32"))
    runner = open_runner(bundle)
    model = load_model("tiny", log=lambda *_: None).model
    ids = token_ids(CONTEXT, seed=1)
    _, got = run_plan(runner, ids)
    _, float_ref = run_plan(EagerRunner(model, CONTEXT, CHUNK), ids)
    _, sim_ref = run_plan(EagerRunner(onnx_export.simulate(model, "int4b32"), CONTEXT, CHUNK), ids)
    assert bundle.manifest["target_info"]["accuracy_level"] == onnx_export.ACCURACY_LEVEL == 4
    agree = np.mean([a.argmax() == b.argmax() for a, b in zip(got, float_ref)])
    assert agree >= 0.95
    # The same grid, int8 activations included: run-time roundings flip on last-digit differences, so
    # agreement and KL, not max abs (the exact comparison is test_scheme_matches_its_simulation's).
    top1, kl = agreement(got, sim_ref)
    assert top1 >= 0.95 and kl <= 2e-3


def _initializer(graph, name: str) -> np.ndarray:
    return numpy_helper.to_array(next(t for t in graph.initializer if t.name == name))


def test_int4b32_stores_the_simulated_grid_once():
    graph = onnx.load(tiny_bundle("int4b32") / "model.onnx").graph
    ops = [n.op_type for n in graph.node]
    inits = {t.name for t in graph.initializer}
    assert ops.count("MatMulNBits") == 6 * 4 + 1  # per layer: q/k/v in one, o, gate/up in one, down; the head
    assert not [n.name for n in graph.node if n.op_type in ("MatMul", "Gemm") and set(n.input) & inits]
    assert not [t for t in graph.initializer if sorted(t.dims) == [64, 512]]  # no float embedding or head
    head = next(n for n in graph.node if n.op_type == "MatMulNBits" and n.input[1].startswith("head_t"))
    gather = next(n for n in graph.node if n.op_type == "GatherBlockQuantized")
    # one stored table and one set of scales for the embedding and the head, read through initializers of
    # their own (`alias_gathered_tables`): the same bytes of the data file, the scales without a Reshape
    places = _places(tiny_bundle("int4b32"))
    for gathered, head_input in ((gather.input[0], head.input[1]), (gather.input[2], head.input[2])):
        assert gathered != head_input and places[gathered] == places[head_input]
    assert not [n for n in graph.node if n.op_type == "Reshape" and gather.input[2] in n.output]
    # Every matrix (the head included) holds exactly the codes and scales of the eager simulation.
    stored = []
    for n in graph.node:
        if n.op_type == "MatMulNBits":
            packed, scales = _initializer(graph, n.input[1]), _initializer(graph, n.input[2])
            rows, blocks = scales.shape
            codes = np.stack([packed & 0xF, packed >> 4], -1).reshape(rows, -1).astype(np.float32) - 8
            stored += [w for (w,) in split_siblings(graph, n, codes * np.repeat(scales, 32, axis=1))]  # q/k/v, gate/up
    model = load_model("tiny", log=lambda *_: None).model
    for linear in [m for m in model.modules() if isinstance(m, torch.nn.Linear)]:
        want = onnx_export.fake_nbits(linear.weight, 4, 32).numpy()
        assert any(s.shape == want.shape and np.array_equal(s, want) for s in stored)


def _places(bundle: Path) -> dict[str, tuple[str, int, int]]:
    """Each initializer's place in the bundle's data file: (file, offset, length); inline ones left out."""
    graph = onnx.load(str(bundle / "model.onnx"), load_external_data=False).graph
    places = {}
    for t in graph.initializer:
        if t.data_location == onnx.TensorProto.EXTERNAL:
            e = {x.key: x.value for x in t.external_data}
            places[t.name] = (e["location"], int(e.get("offset", 0)), int(e["length"]))
    return places


def test_weights_are_stored_once_in_the_data_file():
    """Every weight over 1 KB is in model.onnx.data; the file is exactly the bytes the initializers name
    (aliases share theirs: nothing stored twice, nothing left unreferenced)."""
    bundle = tiny_bundle("int4b32")
    graph = onnx.load(str(bundle / "model.onnx"), load_external_data=False).graph
    inline = [t.name for t in graph.initializer if t.data_location != onnx.TensorProto.EXTERNAL and t.ByteSize() > 1100]
    assert not inline
    covered, end = 0, 0
    for _, offset, length in sorted(set(_places(bundle).values()), key=lambda p: p[1]):
        assert offset >= end  # ranges are either the same (an alias) or apart
        covered, end = covered + length, offset + length
    assert covered == (bundle / "model.onnx.data").stat().st_size
    manifest = read_bundle(bundle).manifest
    assert manifest["target_info"]["external_data"] == "model.onnx.data"
    assert manifest["target_info"]["gathered_tables"] == ["head_t_Q4", "head_t_scales"]


def test_a_head_split_into_pieces_computes_the_same_logits(tmp_path):
    """`split_heads` (the 270M's head: 4 pieces of 65,536 rows) on the tiny head in pieces of 200 rows
    (512 = 200 + 200 + 112): each piece over its own slice of the head's bytes, the same logits."""
    whole = tiny_bundle("int4b32")
    split = tmp_path / "split"
    shutil.copytree(whole, split)
    model = onnx.load(str(split / "model.onnx"), load_external_data=False)
    head = next(n for n in model.graph.node if n.op_type == "MatMulNBits" and n.input[1].startswith("head_t"))
    assert onnx_export.split_heads(model.graph, 200) == 3
    onnx.save_model(model, split / "model.onnx")
    places = _places(split)
    pieces = [n for n in model.graph.node if n.op_type == "MatMulNBits" and n.name.startswith(head.name)]
    assert [onnx_export._attrs(n)["N"] for n in pieces] == [200, 200, 112]
    for i in (1, 2):  # B and scales: the pieces tile the head's bytes in order
        tiles = [places[n.input[i]] for n in pieces]
        assert all(a[1] + a[2] == b[1] for a, b in zip(tiles, tiles[1:]))
        assert (tiles[0][1], sum(t[2] for t in tiles)) == _places(whole)[head.input[i]][1:]
    runners = [OnnxRunner.from_bundle(read_bundle(b, verify=False), threads=1) for b in (whole, split)]
    ids = token_ids(20)
    logits = [r.prefill(ids) for r in runners]
    for token in (7, 300, 511):
        logits += [r.decode(token) for r in runners]
    for a, b in zip(logits[0::2], logits[1::2]):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-5)


def _resident_bytes_of(path: Path) -> int:
    """Bytes of `path` mapped into this process and resident (/proc/self/smaps), over all its mappings."""
    total, inside = 0, False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        fields = line.split()
        if fields and "-" in fields[0] and ":" not in fields[0]:  # a mapping's header line
            inside = fields[-1] == str(path)
        elif inside and fields[0] == "Rss:":
            total += int(fields[1]) * 1024
    return total


@pytest.mark.skipif(not Path("/proc/self/smaps").exists(), reason="reads /proc/self/smaps (Linux)")
@pytest.mark.parametrize("layout", ["as saved", "one initializer for both"])
def test_the_gathered_table_stays_out_of_resident_memory(tmp_path, layout):
    """An 80 MB int4 table (64 MB of codes, 16 MB of scales) that a MatMulNBits head and a
    GatherBlockQuantized embedding both read. As `save` lays it out, onnxruntime packs the head's pieces
    and unmaps their codes (it keeps their scales); the gather's own mappings hold only the pages of the
    rows it looked up, which the kernel maps in pieces of up to 2 MiB (ext4's large folios; 4 KiB
    elsewhere). The control (the two nodes on one initializer, as before `save`'s aliases) keeps the
    whole table resident: the measurement tells the two apart."""
    import onnxruntime as ort
    from onnx import TensorProto, helper

    vocab, hidden, block = 1 << 18, 512, 32
    rng = np.random.default_rng(0)
    table = rng.integers(0, 256, (vocab, hidden // block, block // 2), dtype=np.uint8)
    scales = rng.uniform(0.01, 0.02, (vocab, hidden // block)).astype(np.float32)
    nodes = [helper.make_node("Reshape", ["head_t_scales", "shape"], ["scales_3d"]),
             helper.make_node("GatherBlockQuantized", ["head_t_Q4", "tokens", "scales_3d"], ["embedded"],
                              domain="com.microsoft", gather_axis=0, quantize_axis=2, block_size=block, bits=4),
             helper.make_node("MatMulNBits", ["x", "head_t_Q4", "head_t_scales"], ["logits"], domain="com.microsoft",
                              K=hidden, N=vocab, bits=4, block_size=block, accuracy_level=4)]
    graph = helper.make_graph(
        nodes, "tied", [helper.make_tensor_value_info("tokens", TensorProto.INT64, [1, None]),
                        helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, hidden])],
        [helper.make_tensor_value_info("embedded", TensorProto.FLOAT, None),
         helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, vocab])],
        [numpy_helper.from_array(table, "head_t_Q4"), numpy_helper.from_array(scales, "head_t_scales"),
         numpy_helper.from_array(np.array([vocab, hidden // block, 1], np.int64), "shape")])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)])
    if layout == "as saved":
        record = onnx_export.save(proto, tmp_path, piece_rows=1 << 16)
        assert record == {"gathered_tables": ["head_t_Q4", "head_t_scales"], "head_pieces": 4}
    else:
        onnx.save_model(proto, tmp_path / "model.onnx", save_as_external_data=True, location="model.onnx.data")
    session = ort.InferenceSession(str(tmp_path / "model.onnx"), providers=["CPUExecutionProvider"])
    tokens = np.array([[1000, 200000]], np.int64)
    embedded, logits = session.run(None, {"tokens": tokens, "x": np.ones((1, hidden), np.float32)})
    codes = np.stack([table & 0xF, table >> 4], -1).reshape(vocab, hidden).astype(np.float32) - 8
    rows = codes * np.repeat(scales, block, axis=1)
    np.testing.assert_allclose(embedded.reshape(2, hidden), rows[tokens[0]], rtol=1e-6)
    np.testing.assert_allclose(logits[0], rows.sum(1), rtol=2e-2, atol=0.5)  # int8 inputs: 1.0 is exact
    stored = table.nbytes + scales.nbytes
    resident = _resident_bytes_of(tmp_path / "model.onnx.data")
    if layout == "as saved":  # the pieces' scales, and for each token a page of codes and one of scales
        assert resident <= scales.nbytes + 2 * 2 * (2 << 20), resident
    else:
        assert resident >= 0.95 * stored, resident


@pytest.mark.skipif(not Path("/proc/self/smaps").exists(), reason="reads /proc/self/smaps (Linux)")
def test_the_runner_drops_the_pages_onnxruntime_read_to_pack(tmp_path):
    """onnxruntime alone leaves the data file's pages it read while packing resident; the runner drops
    them (`release_mapped_weights`), and reads that follow fault back only what they touch."""
    import onnxruntime as ort

    bundle = tmp_path / "bundle"
    shutil.copytree(tiny_bundle("int4b32"), bundle)  # a folder of its own: no other test's mappings
    data = (bundle / "model.onnx.data").resolve()
    session = ort.InferenceSession(str(bundle / "model.onnx"), providers=["CPUExecutionProvider"])
    packed_alone = _resident_bytes_of(data)
    assert packed_alone > 0  # (on the tiny model: 100 of its 217 KB)
    runner = OnnxRunner.from_bundle(read_bundle(bundle), threads=1)  # drops the control session's pages too
    assert _resident_bytes_of(data) == 0
    logits = runner.prefill(token_ids(12))
    assert np.isfinite(logits).all() and _resident_bytes_of(data) < packed_alone
    del session


def test_int4b32_asym_stores_zero_points_for_the_layers_and_a_symmetric_table(small, tmp_path):
    model, _, _ = small
    onnx_export.export(model, tmp_path, make_spec("tiny", "onnx", "int4b32-asym", CONTEXT, CHUNK), log=lambda *_: None)
    graph = onnx.load(tmp_path / "model.onnx").graph
    stored, head = [], None
    for n in graph.node:
        if n.op_type != "MatMulNBits":
            continue
        packed, scales = _initializer(graph, n.input[1]), _initializer(graph, n.input[2])
        rows, blocks = scales.shape
        u = np.stack([packed & 0xF, packed >> 4], -1).reshape(rows, -1).astype(np.float32)
        if n.input[1].startswith("head_t"):
            assert len(n.input) == 3  # no zero points: the embedding gathers this table
            head = (u - 8) * np.repeat(scales, 32, axis=1)
            continue
        zp = _initializer(graph, n.input[3]).reshape(rows, -1)
        zp = np.stack([zp & 0xF, zp >> 4], -1).reshape(rows, -1)[:, :blocks].astype(np.float32)
        assert (zp != 8).any()  # real zero points, not the symmetric default
        stored += [w for (w,) in split_siblings(graph, n, (u - np.repeat(zp, 32, axis=1)) * np.repeat(scales, 32, axis=1))]
    layers = [m.weight for m in model.modules() if isinstance(m, torch.nn.Linear) and m is not model.lm_head]
    for w in layers:  # exactly the simulated asymmetric grid
        want = onnx_export.fake_nbits_asym(w, 4, 32).numpy()
        assert any(s.shape == want.shape and np.array_equal(s, want) for s in stored)
    assert np.array_equal(head, onnx_export.fake_nbits(model.lm_head.weight, 4, 32).numpy())
    # What the zero point buys: a block that is not centred on 0 keeps 16 levels over its range, not ~8.
    skewed = torch.rand(64, 64, generator=torch.Generator().manual_seed(0)) + 0.5
    err_asym = (onnx_export.fake_nbits_asym(skewed, 4, 32) - skewed).abs().mean()
    assert err_asym < 0.6 * (onnx_export.fake_nbits(skewed, 4, 32) - skewed).abs().mean()


# -- every scheme on a smaller model, one float graph shared ----------------------------------------


@pytest.fixture(scope="module")
def small():
    """Two layers (local, global), the float graph with a separate head, and its spec. The matrices
    lie on a coarse grid, like a GGUF's: rounding ties everywhere, where rounding modes differ."""
    model = tiny_model(seed=2, num_hidden_layers=2, sliding_window_pattern=2)
    gen = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for linear in [m for m in model.modules() if isinstance(m, torch.nn.Linear)]:
            scale = 0.25 if linear is model.lm_head else 0.004  # the tied embedding needs the larger one
            linear.weight.copy_(torch.randint(-16, 17, linear.weight.shape, generator=gen) * scale)
    spec = make_spec("tiny", "onnx", "int4b32", CONTEXT, CHUNK)
    return model, spec, onnx_export._torch_export(model, spec, "int4b32")


def _open(proto, folder: Path, dtype: str = "float32") -> OnnxRunner:
    folder.mkdir()
    onnx.save_model(proto, folder / "model.onnx")
    inputs, outputs = onnx_export._describe(proto)
    return OnnxRunner(folder / "model.onnx", inputs, outputs, CONTEXT, CHUNK)


def agreement(got: list[np.ndarray], ref: list[np.ndarray]) -> tuple[float, float]:
    """Share of steps with the same greedy token, and the mean KL(ref || got) per step."""
    top1 = np.mean([a.argmax() == b.argmax() for a, b in zip(got, ref)])
    kl = np.mean([float(torch.nn.functional.kl_div(torch.from_numpy(a).log_softmax(-1), torch.from_numpy(b).log_softmax(-1),
                                                   log_target=True, reduction="sum")) for a, b in zip(got, ref)])
    return float(top1), float(kl)


@pytest.mark.parametrize("scheme, bits_per_weight", [("int8", 8), ("int4", 4), ("int4b32", 4), ("int4b32-asym", 4), ("fp8", 8)])
def test_scheme_matches_its_simulation(small, tmp_path, scheme, bits_per_weight):
    """At accuracy_level 0 (fp32 compute) the artifact is its simulation up to float rounding."""
    model, spec, proto = small
    proto = copy.deepcopy(proto)
    float_bytes = sum(onnx_export._tensor_bytes(t) for t in proto.graph.initializer)
    proto = onnx_export.quantize_fp8(proto) if scheme == "fp8" else onnx_export.quantize_nbits(proto, scheme, 0)
    runner = _open(proto, tmp_path / scheme)
    ids = token_ids(sum(PLAN), seed=4)
    _, got = run_plan(runner, ids)
    _, ref = run_plan(EagerRunner(onnx_export.simulate(model, scheme, accuracy_level=0), CONTEXT, CHUNK), ids)
    assert max(float(np.abs(a - b).max()) for a, b in zip(got, ref)) <= 1e-4
    quant_bytes = sum(onnx_export._tensor_bytes(t) for t in proto.graph.initializer)
    assert quant_bytes < float_bytes * (bits_per_weight / 32) * 1.35  # scales and norms on top
    big = [t for t in proto.graph.initializer if t.data_type in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16)
           and np.prod(t.dims) >= 64 * 64]
    assert not [t.name for t in big if "scale" not in t.name]  # every matrix quantized, the head too


@pytest.mark.parametrize("bits, block, k", [(4, 32, 640), (4, 128, 640), (8, 128, 640), (4, 64, 64), (8, 64, 64)])
def test_int8_compute_is_simulated_per_weight_block(bits, block, k):
    """One MatMulNBits at accuracy_level 4 (int4 blocks of 32, per-channel int4/int8 stored in blocks
    of gcd(K, 128)) computes what `fake_int8_blocks` + the float matmul compute, to float rounding;
    the product of the float inputs is over 100x further away."""
    import onnxruntime as ort
    from onnx import TensorProto, helper

    gen = torch.Generator().manual_seed(bits + block + k)
    n = 96
    w, x = torch.randn(n, k, generator=gen) * 0.05, torch.randn(5, k, generator=gen) * 3
    codes, scale = onnx_export.nbits_codes(w, bits, block if block == 32 else k)
    p = onnx_export._signed(bits, codes.view(n, -1)[:, :k], scale.view(n, -1))
    assert p.block == block
    u = p.u[:, 0::2] | (p.u[:, 1::2] << 4) if bits == 4 else p.u
    node = helper.make_node("MatMulNBits", ["x", "B", "s"], ["y"], domain="com.microsoft", K=k, N=n, bits=bits,
                            block_size=block, accuracy_level=4)
    graph = helper.make_graph([node], "one", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, k])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, n])],
                              [numpy_helper.from_array(np.ascontiguousarray(u.reshape(n, k // block, -1)), "B"),
                               numpy_helper.from_array(p.scales, "s")])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)])
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    wq = (codes * scale).view(n, -1)[:, :k]
    got = session.run(None, {"x": x.numpy()})[0]
    simulated = (onnx_export.fake_int8_blocks(x, block) @ wq.T).numpy()
    err_simulated, err_float_inputs = np.abs(got - simulated).max(), np.abs(got - (x @ wq.T).numpy()).max()
    assert err_simulated <= 1e-5 * np.abs(simulated).max() and err_simulated * 100 < err_float_inputs


@pytest.mark.parametrize("scheme", ["int8", "int4", "int4b32", "int4b32-asym"])
def test_accuracy_level_4_is_the_default_and_simulated(small, tmp_path, scheme):
    model, spec, proto = small
    info = onnx_export.export(model, tmp_path, make_spec("tiny", "onnx", scheme, CONTEXT, CHUNK), log=lambda *_: None)
    graph = onnx.load(tmp_path / "model.onnx").graph
    levels = {a.i for n in graph.node if n.op_type == "MatMulNBits" for a in n.attribute if a.name == "accuracy_level"}
    assert levels == {4} and info["target_info"]["accuracy_level"] == 4
    ids = token_ids(sum(PLAN), seed=5)
    _, got = run_plan(OnnxRunner(tmp_path / "model.onnx", info["inputs"], info["outputs"], CONTEXT, CHUNK), ids)
    _, ref = run_plan(EagerRunner(onnx_export.simulate(model, scheme), CONTEXT, CHUNK), ids)
    _, ref_fp32_compute = run_plan(EagerRunner(onnx_export.simulate(model, scheme, accuracy_level=0), CONTEXT, CHUNK), ids)
    err = max(float(np.abs(a - b).max()) for a, b in zip(got, ref))
    assert err <= 1e-4  # the same grid and the same int8 inputs: float rounding only
    assert err * 100 < max(float(np.abs(a - b).max()) for a, b in zip(got, ref_fp32_compute))


def test_fp16_keeps_the_residual_stream_in_fp32(small, tmp_path):
    model, _, _ = small
    spec = make_spec("tiny", "onnx", "fp16", CONTEXT, CHUNK)
    info = onnx_export.export(model, tmp_path, spec, log=lambda *_: None)
    assert info["cache_dtype"] == "float16" and info["inputs"][2]["dtype"] == "float16"
    graph = onnx.load(tmp_path / "model.onnx").graph
    assert {t.data_type for t in graph.initializer if np.prod(t.dims) >= 64 * 64} == {onnx.TensorProto.FLOAT16}
    runner = OnnxRunner(tmp_path / "model.onnx", info["inputs"], info["outputs"], CONTEXT, CHUNK)
    ids = token_ids(sum(PLAN), seed=6)
    _, got = run_plan(runner, ids)
    _, ref = run_plan(EagerRunner(model, CONTEXT, CHUNK), ids)
    assert all(np.isfinite(g).all() for g in got)
    assert max(float(np.abs(a - b).max()) for a, b in zip(got, ref)) <= 0.05
    # Activations past fp16's range (Gemma's residual stream) are clamped at the matmul, never inf.
    half = onnx_export.HalfLinear(torch.nn.Parameter(torch.ones(4, 8, dtype=torch.float16) * 1e-3))
    assert torch.isfinite(half(torch.full((1, 8), 1e6))).all()


def test_accuracy_level_is_refused_for_float_schemes(small, tmp_path):
    from gemma3_export.errors import UserError

    model, _, _ = small
    with pytest.raises(UserError, match="accuracy_level applies to int8, int4, int4b32, int4b32-asym, int4b128, gguf, not fp32"):
        onnx_export.export(model, tmp_path, make_spec("tiny", "onnx", "fp32", CONTEXT, CHUNK), accuracy_level=4)
