"""`memory`: analytic figures against the report and the reference numbers, the measured row's
mechanics on a tiny bundle (the 270m/1b measurements are in benchmarks/memory_table.py)."""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest

from gemma3_export import memory
from gemma3_export.cli import main
from gemma3_export.config import preset
from test_onnx import CONTEXT, tiny_bundle

REFERENCE = Path(__file__).with_name("data") / "gemma3_reference.json"  # a copy of shared/reference/gemma3.json


def test_embedded_table3_is_the_reference():
    table3 = json.loads(REFERENCE.read_text())["table3"]
    assert table3["weights"] == memory.REPORT_TABLE3["weights"]
    assert table3["weights_plus_kv"] == memory.REPORT_TABLE3["weights_plus_kv"]
    assert table3["columns"] == [memory.REPORT_COLUMNS[c] for c in memory.COLUMNS]


@pytest.mark.parametrize("size, embedding, non_embedding", [
    ("1b", 302e6, 698e6), ("4b", 675e6, 3209e6), ("12b", 1012e6, 10759e6), ("27b", 1416e6, 25600e6)])
def test_parameter_counts_match_the_report(size, embedding, non_embedding):
    n = memory.param_counts(preset(size))  # report Table 1 (text decoder; the vision encoder apart)
    assert n["embedding"] == pytest.approx(embedding, rel=0.01)
    assert n["linear"] + n["norms"] == pytest.approx(non_embedding, rel=0.01)


def test_weights_are_close_to_the_report():
    """bf16 matches for every size; 1b (text only) in every column. For 4b+ the report's quantized
    columns sit higher than the text decoder alone (the 417M vision encoder is in the checkpoints)."""
    rows = {r["size"]: r for r in memory.analytic_rows(32768)}
    for size in ("1b", "4b", "12b", "27b"):
        c = rows[size]["columns"]["bf16"]
        assert c["weights_gb"] == pytest.approx(c["report_weights_gb"], rel=0.05), size
    for col, c in rows["1b"]["columns"].items():
        assert c["weights_gb"] == pytest.approx(c["report_weights_gb"], rel=0.15), col
    assert rows["270m"]["columns"]["bf16"]["report_weights_gb"] is None  # the report has no 270m row


def test_kv_layouts():
    c = preset("1b")  # GEMMA3.md: 26 layers at 32k in bf16, about 0.87 GB full, 0.15 GB sliding window
    assert memory.kv_bytes(c, 32768, "full", "bfloat16") == 26 * 2 * 256 * 32768 * 2
    assert memory.kv_bytes(c, 32768, "window", "bfloat16") == (4 * 32768 + 22 * 512) * 2 * 256 * 2
    assert memory.kv_bytes(c, 256, "window", "bfloat16") == memory.kv_bytes(c, 256, "full", "bfloat16")
    assert memory.kv_bytes(c, 32768, "full", "int8") == pytest.approx(memory.kv_bytes(c, 32768, "full", "bfloat16") / 2, rel=0.02)
    row = next(r for r in memory.analytic_rows(32768) if r["size"] == "1b")
    assert row["report_kv_delta_gb"] == pytest.approx(row["kv"]["full_bfloat16_gb"], rel=0.05)  # the report: full length
    assert row["report_delta_over_window_bf16"] > 5


def test_cache_arrays_are_the_graph_state():
    """memory.py fills the cache by writing the runner's arrays: the graph must see those writes."""
    from gemma3_export.bundle import read_bundle
    from gemma3_export.runtimes.onnx import OnnxRunner

    runner = OnnxRunner.from_bundle(read_bundle(tiny_bundle("fp32")))
    runner.pos = 20
    empty = runner.decode(7)
    runner.reset()
    for array in runner.cache_numpy:
        array[:] = 0.5
    runner.pos = 20
    assert np.abs(runner.decode(7) - empty).max() > 1e-3


def test_memory_report_writes_table_json_and_plot(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the CLI writes into ./docs
    assert main(["memory", "--bundle", str(tiny_bundle("fp32")), "--context", str(CONTEXT)]) == 0
    assert "| 27b |" in capsys.readouterr().err
    saved = json.loads((tmp_path / "docs/memory.json").read_text())
    result = saved
    assert [r["size"] for r in saved["rows"]] == list(memory.SIZES)
    m = result["measured"][0]
    model_files = [p for p in tiny_bundle("fp32").iterdir() if p.name.startswith("model.onnx")]  # not tokenizers
    assert m["artifact_bytes"] == sum(p.stat().st_size for p in model_files)
    assert m["tokens"] == CONTEXT and m["analytic_kv_bytes"] == memory.kv_bytes(preset("tiny"), CONTEXT, "window", "float32")
    assert m["resident_session_bytes"] > 0
    table = (tmp_path / "docs/memory_table.md").read_text()
    assert all(f"| {size} |" in table for size in memory.SIZES) and "report / window bf16" in table
    svg = ET.fromstring((tmp_path / "docs/memory_kv.svg").read_text())
    assert len(svg.findall("{http://www.w3.org/2000/svg}polyline")) == 8  # 4 sizes x (full, window)
