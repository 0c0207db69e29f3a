"""`--max-size` on the int4 schemes (issue 10): each matrix's sensitivity, the mix chosen under the budget,
and the artifact that stores it."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch
from conftest import split_siblings, tiny_model
from onnx import numpy_helper

from gemma3_export.bundle import read_bundle
from gemma3_export import pipeline, sensitivity
from gemma3_export.exporters import onnx as onnx_export
from gemma3_export.load import load_model
from gemma3_export.validate import validate_bundle


def test_choose_takes_the_most_kl_per_byte_that_fits():
    kl = {"a": 0.9, "b": 0.5, "c": 0.4, "d": 0.0, "e": 0.05}
    extra = {"a": 100, "b": 10, "c": 10, "d": 1, "e": 60}
    assert sensitivity.choose(kl, extra, room=25) == ["b", "c"]  # 0.05/byte, then 0.04; a does not fit
    assert sensitivity.choose(kl, extra, room=120) == ["b", "c", "a"]  # e (0.0008/byte) no longer fits
    assert sensitivity.choose(kl, extra, room=1000) == ["b", "c", "a", "e"]  # never a matrix that costs nothing
    assert sensitivity.choose(kl, extra, room=5) == []


def test_plan_raises_table_rows_in_their_order_and_fills_the_rest_with_rows():
    kl, extra = {"a": 0.010, "b": 0.001}, {"a": 100, "b": 100}
    table_kl = {0: 0.5, 10: 0.1, 20: 0.05, 30: 0.0}  # the first ranked rows matter most
    # rows: 10 per chunk at 5 bytes each, the first chunk also pays the 20-byte row map
    assert sensitivity.plan(kl, extra, table_kl, 5, 20, room=0) == ([], 0)
    assert sensitivity.plan(kl, extra, table_kl, 5, 20, room=70) == ([], 10)  # chunk 0, then 0 rows: 70 - 70
    assert sensitivity.plan(kl, extra, table_kl, 5, 20, room=82) == ([], 12)  # chunk 0 and 2 more rows
    assert sensitivity.plan(kl, extra, table_kl, 5, 20, room=170) == ([], 30)  # chunks 1, 2: 1e-3/byte, a 1e-4
    assert sensitivity.plan(kl, extra, table_kl, 5, 20, room=270) == (["a"], 30)
    assert sensitivity.plan(kl, extra, table_kl, 5, 20, room=1000) == (["a", "b"], 30)
    # a later chunk is never raised before an earlier one, even if it alone would buy more
    assert sensitivity.plan({}, {}, {0: 0.5, 10: 0.45, 20: 0.0}, 5, 20, room=60) == ([], 8)


def test_tensor_kl_is_each_matrix_rounded_alone():
    model = tiny_model(seed=3)
    before = {n: w.detach().clone() for n, w in sensitivity.matrices(model).items()}
    tokens = [list(range(1, 40)), list(range(100, 139))]
    target = "model.layers.2.mlp.down_proj.weight"
    def perturb(w):  # not a scale: Gemma's norms undo those
        return w + torch.randn(w.shape, generator=torch.Generator().manual_seed(0)) * w.std()

    kl = sensitivity.tensor_kl(model, lambda name, w: perturb(w) if name == target else w, tokens, log=lambda *_: None)
    assert set(kl) == set(before) and "lm_head.weight" not in kl  # the tied table once
    assert all(torch.equal(w, before[n]) for n, w in sensitivity.matrices(model).items())  # restored
    assert kl[target] > 0 and all(v == 0 for n, v in kl.items() if n != target)
    # the same number as a model built with that matrix changed, measured directly
    with torch.no_grad():
        ref = [model(torch.tensor([t]))[0].log_softmax(-1) for t in tokens]
        sensitivity.matrices(model)[target].copy_(perturb(before[target]))
        got = [model(torch.tensor([t]))[0].log_softmax(-1) for t in tokens]
    direct = np.mean([float((r.exp() * (r - g)).sum(-1).mean()) for r, g in zip(ref, got)])
    assert kl[target] == pytest.approx(direct, rel=1e-6)


@pytest.fixture(scope="module")
def mixed(tmp_path_factory):
    """tiny int4b32-asym as it is, and with --max-size 40 kB above it (a quarter of what every matrix at
    int8 would add: the choice takes some layer matrices and some table rows), measured on a short text."""
    tmp = tmp_path_factory.mktemp("mix")
    kw = dict(model="tiny", target="onnx", quant="int4b32-asym", context=64, chunk=8, validate=False,
              log=lambda *_: None)
    plain = pipeline.export(**kw, out=tmp / "plain")
    text = tmp / "text.txt"
    text.write_text("The cat sat on the mat. A dog ran to the park and back again. " * 20)
    budget = read_bundle(plain).artifact_bytes + (1 << 14) + 40_000  # 40 kB over every matrix at int4
    mix = pipeline.export(**kw, out=tmp / "mix", max_size=f"{budget}B", data=[str(text)])
    return plain, mix, budget, text


def _stored(path) -> dict[str, list[tuple[int, np.ndarray]]]:
    """Each MatMulNBits weight of the graph, dequantized, with its bits."""
    graph = onnx.load(str(path)).graph
    inits = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    out = []
    for node in graph.node:
        if node.op_type != "MatMulNBits":
            continue
        bits = next(a.i for a in node.attribute if a.name == "bits")
        packed, scales = inits[node.input[1]], inits[node.input[2]]
        rows, blocks = scales.shape
        u = np.stack([packed & 0xF, packed >> 4], -1).reshape(rows, -1) if bits == 4 else packed.reshape(rows, -1)
        zp = np.full((rows, blocks), 2 ** (bits - 1), np.float32)
        if len(node.input) > 3:
            z = inits[node.input[3]].reshape(rows, -1)
            zp = (np.stack([z & 0xF, z >> 4], -1).reshape(rows, -1) if bits == 4 else z)[:, :blocks].astype(np.float32)
        w = (u.astype(np.float32) - np.repeat(zp, 32, axis=1)) * np.repeat(scales, 32, axis=1)
        out += [(bits, part) for (part,) in split_siblings(graph, node, w)]
    return out


def test_max_size_raises_the_most_sensitive_matrices_and_table_rows_to_int8(mixed):
    from gemma3_export.vocab_rows import importance, int4_rows_of, row_order

    plain, mix, budget, text = mixed
    assert read_bundle(mix).artifact_bytes <= budget
    info = json.loads((mix / "manifest.json").read_text())["target_info"]
    raised, tensors = info["mix"]["raised"], info["tensors"]
    assert info["mix"]["ranking"].endswith("text.txt") and len(tensors) == 43
    layers = [n for n in raised if n != onnx_export.EMBED]
    assert 0 < len(layers) < 42 and onnx_export.EMBED in raised  # some of each: the room is short of all
    assert all(tensors[n].startswith("int8 block 32 (--max-size") for n in raised)
    assert all("int4 block 32" in form for n, form in tensors.items() if n not in raised)
    # the table split: the rows at int4 are the tail of the documented ranking on the same text
    rows = int4_rows_of(info["table_split"])
    assert 0 < len(rows) < 512
    model = tiny_model()
    tokenizer = load_model("tiny", log=lambda *_: None).tokenizer
    ids = tokenizer.encode(text.read_text(), bos=True)
    order = row_order(tokenizer, importance(model, [ids[i:i + 96] for i in range(0, len(ids), 96)]))
    assert set(rows) == set(order[512 - len(rows):].tolist())
    # every matrix stored exactly on its chosen grid; the table's rows: int8, or int4 of those int8 values
    stored = _stored(mix / "model.onnx")
    for name, w in sensitivity.matrices(model).items():
        if name == onnx_export.EMBED:
            continue
        want = (onnx_export.fake_nbits(w, 8, 32) if name in raised else onnx_export.fake_low("int4b32-asym")(name, w))
        bits = 8 if name in raised else 4
        assert any(b == bits and s.shape == want.shape and np.array_equal(s, want.numpy()) for b, s in stored), name
    table8 = onnx_export.fake_nbits(model.model.embed_tokens.weight, 8, 32)
    kept = np.setdiff1d(np.arange(512), rows)
    for bits, want in ((8, table8[kept]), (4, onnx_export.fake_nbits(table8[rows], 4, 32))):
        assert any(b == bits and s.shape == want.shape and np.array_equal(s, want.numpy()) for b, s in stored)
    assert "mix" not in json.loads((plain / "manifest.json").read_text())["target_info"]
    # what the choice spent (raise_costs, 32 bytes per raised row, the row map) is what the file grew by,
    # up to the split's and the unfused siblings' few nodes
    extra = onnx_export.raise_costs("int4b32-asym", sensitivity.matrices(model))
    spent = sum(extra[n] for n in layers) + len(kept) * 32 + 4 * 512
    grew = read_bundle(mix).artifact_bytes - read_bundle(plain).artifact_bytes
    assert spent <= grew < spent + 8192, (spent, grew)


def test_a_mixed_bundle_runs_as_its_simulation(mixed):
    """Validate's reference raises the same matrices: the artifact is it up to float rounding."""
    _, mix, _, _ = mixed
    summary = validate_bundle(mix, log=lambda *_: None)
    assert summary["reference"] == "eager int4b32-asym" and summary["passed"], summary
    assert summary["vs_reference"]["top1"] >= 0.97 and summary["vs_reference"]["kl"] <= 1e-4


def test_a_budget_below_every_matrix_at_int4_is_one_sentence(tmp_path, capsys):
    from gemma3_export.cli import main

    out = tmp_path / "x"
    assert main(["--model", "tiny", "--target", "onnx", "--quant", "int4b32", "--max-size", "0.1MB",
                 "--context", "64", "--chunk", "8", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "--max-size 0.1 MB is below the smallest this export reaches" in err and "Traceback" not in err
    assert not out.exists()
