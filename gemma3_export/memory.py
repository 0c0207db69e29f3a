"""`memory`: the Gemma 3 report's Table 3 beside this project's figures, for every size and column.

Per size (270m, 1b, 4b, 12b, 27b) and column (bf16, int4, int4 blocks of 32, 8-bit):
- `report`: weights and weights + KV at 32,768 tokens (../shared/reference/gemma3.json; no 270m row);
- `analytic` weights: exact parameter counts from the config times the scheme's bytes, scales
  included (one fp32 scale per output row, or per block of 32); the tied embedding counted once;
  parameters that stay float (norms) at bf16;
- `analytic` KV: a full-length cache on every layer (what the report's +KV delta matches) and this
  project's layout (global layers full length, local layers a ring of `sliding_window` slots), each
  in bf16 and in int8 (one fp32 scale per token and kv head);
- `measured`, for the bundles given: artifact bytes, and the resident memory of an onnxruntime
  session whose cache has been written to N tokens, minus the process baseline, in a fresh process.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from .config import Gemma3Config, preset

SIZES = ("270m", "1b", "4b", "12b", "27b")
COLUMNS = ("bf16", "int4", "int4b32", "sfp8")
REPORT_COLUMNS = {"bf16": "bf16", "int4": "int4", "int4b32": "int4_block32", "sfp8": "sfp8"}
GB = 1e9  # the report's GB are decimal
REPORT_CONTEXT = 32768


# -- analytic ---------------------------------------------------------------------------------


def param_counts(c: Gemma3Config) -> dict[str, int]:
    """Exact text-decoder parameter counts: the tied embedding (once), linear weights, norms."""
    q, kv = c.num_attention_heads * c.head_dim, c.num_key_value_heads * c.head_dim
    per_layer = c.hidden_size * (2 * q + 2 * kv) + 3 * c.hidden_size * c.intermediate_size
    return {
        "embedding": c.vocab_size * c.hidden_size,
        "linear": c.num_hidden_layers * per_layer,
        "norms": c.num_hidden_layers * (4 * c.hidden_size + 2 * c.head_dim) + c.hidden_size,
    }


def _rows(c: Gemma3Config) -> int:
    """Output rows of every quantized matrix (one per-channel scale each)."""
    q, kv = c.num_attention_heads * c.head_dim, c.num_key_value_heads * c.head_dim
    return c.vocab_size + c.num_hidden_layers * (q + 2 * kv + c.hidden_size + 2 * c.intermediate_size)


def weight_bytes(c: Gemma3Config, column: str) -> int:
    """Bytes of the weights in a column's format, scales included."""
    n = param_counts(c)
    matrices = n["embedding"] + n["linear"]
    if column == "bf16":
        return 2 * sum(n.values())
    if column == "int4":
        quantized = matrices // 2 + 4 * _rows(c)
    elif column == "int4b32":
        quantized = matrices // 2 + 4 * (matrices // 32)
    elif column == "sfp8":
        quantized = matrices + 4 * _rows(c)
    else:
        raise ValueError(column)
    return quantized + 2 * n["norms"]


def kv_bytes(c: Gemma3Config, context: int, layout: str, dtype: str) -> int:
    """KV cache bytes at `context` tokens: `layout` "full" (every layer full length) or "window" (local
    layers keep `sliding_window` slots); `dtype` "bfloat16", "float32", "float16" or "int8"."""
    per_slot = 2 * c.num_key_value_heads * c.head_dim  # k and v
    if dtype == "int8":
        per_slot_bytes = per_slot + 2 * c.num_key_value_heads * 4
    else:
        per_slot_bytes = per_slot * {"bfloat16": 2, "float16": 2, "float32": 4}[dtype]
    slots = sum(
        min(c.sliding_window, context) if layout == "window" and c.is_local(i) else context
        for i in range(c.num_hidden_layers)
    )
    return slots * per_slot_bytes


# Table 3 of the Gemma 3 report (arXiv 2503.19786v1), as collected in ../shared/reference/gemma3.json:
# GB (decimal) at 32,768 tokens, columns bf16, int4, int4 blocks=32, SFP8. The report has no 270m row.
REPORT_TABLE3 = {
    "weights": {"1b": [2.0, 0.5, 0.7, 1.0], "4b": [8.0, 2.6, 2.9, 4.4], "12b": [24.0, 6.6, 7.1, 12.4], "27b": [54.0, 14.1, 15.3, 27.4]},
    "weights_plus_kv": {"1b": [2.9, 1.4, 1.6, 1.9], "4b": [12.7, 7.3, 7.6, 9.1], "12b": [38.9, 21.5, 22.0, 27.3], "27b": [72.7, 32.8, 34.0, 46.1]},
}


def analytic_rows(context: int) -> list[dict]:
    """One row per size: report figures (where it has them) and this project's analytic figures."""
    table = REPORT_TABLE3
    rows = []
    for size in SIZES:
        c = preset(size)
        report_w = table["weights"].get(size)
        report_kv = table["weights_plus_kv"].get(size)
        cols = {}
        for i, col in enumerate(COLUMNS):
            cols[col] = {
                "report_weights_gb": report_w[i] if report_w else None,
                "report_plus_kv_gb": report_kv[i] if report_kv else None,
                "weights_gb": weight_bytes(c, col) / GB,
            }
        kv = {f"{layout}_{dtype}_gb": kv_bytes(c, context, layout, dtype) / GB
              for layout in ("full", "window") for dtype in ("bfloat16", "int8")}
        report_delta = round(report_kv[0] - report_w[0], 3) if report_w else None
        rows.append({"size": size, "params": param_counts(c), "columns": cols, "kv": kv,
                     "report_kv_delta_gb": report_delta,
                     "report_delta_over_window_bf16": (report_delta / kv["window_bfloat16_gb"]) if report_delta else None})
    return rows


# -- measured ---------------------------------------------------------------------------------


def measure_bundle(bundle: str | Path, tokens: int, threads: int = 2) -> dict:
    """Artifact bytes and resident memory of the bundle's onnxruntime session, in a fresh process."""
    code = f"import json, sys; from gemma3_export.memory import _measure_here; print(json.dumps(_measure_here({str(bundle)!r}, {tokens}, {threads})))"
    # The child imports this very package, wherever the installed one points.
    package_root = str(Path(__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [package_root, os.environ.get("PYTHONPATH")]))}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"measuring {bundle} failed:\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _rss() -> int:
    import psutil

    return psutil.Process().memory_info().rss


def _measure_here(bundle: str, tokens: int, threads: int) -> dict:
    """Inside the fresh process: baseline, session (weights), then the cache written to `tokens`."""
    import numpy as np
    import onnxruntime  # noqa: F401  (the baseline includes the runtime's own code)

    from .bundle import read_bundle
    from .runtimes.onnx import OnnxRunner

    b = read_bundle(bundle)
    baseline = _rss()
    runner = OnnxRunner.from_bundle(b, threads=threads)
    runner.decode(b.manifest["bos_id"])  # one step: kernels prepacked, arena warm, 1 slot written
    loaded = _rss()
    n = min(tokens, runner.max_context)
    rng = np.random.default_rng(0)
    for array, (_, shape, dtype) in zip(runner.cache_numpy, runner.cache_specs):
        filled = min(n, shape[2])  # ring caches hold at most their window
        array[:, :, :filled] = rng.standard_normal((shape[0], shape[1], filled, shape[3])).astype(dtype) * 0.1
    runner.pos = n - 1
    runner.decode(b.manifest["bos_id"])  # attends over all n positions
    filled_rss = _rss()
    c = b.config
    cache_dtype = b.manifest.get("cache_dtype", "float32")
    return {
        "bundle": str(bundle),
        "model": b.manifest.get("model"),
        "scheme": b.manifest["quant"]["name"],
        "max_context": runner.max_context,
        "tokens": n,
        "cache_dtype": cache_dtype,
        "artifact_bytes": b.artifact_bytes,
        "resident_session_bytes": loaded - baseline,
        "resident_total_bytes": filled_rss - baseline,
        "resident_kv_bytes": filled_rss - loaded,
        "analytic_kv_bytes": kv_bytes(c, n, "window", cache_dtype),
    }


# -- the report -------------------------------------------------------------------------------


def memory_report(bundles: list[str], context: int = REPORT_CONTEXT, log=print, out: str | Path = "docs") -> dict:
    """Print Table 3 beside this project's figures (and measured rows for `bundles`); write
    memory.json, memory_table.md and memory_kv.svg into `out`."""
    rows = analytic_rows(context)
    measured = []
    for bundle in bundles:
        log(f"measuring {bundle} (fresh process, cache written to {context} tokens or the bundle's context)")
        m = measure_bundle(bundle, context)
        m["kv_measured_over_analytic"] = m["resident_kv_bytes"] / m["analytic_kv_bytes"]
        row = next((r for r in rows if r["size"] == m["model"]), None)
        if row and row["report_kv_delta_gb"]:
            m["report_kv_delta_over_measured_kv"] = row["report_kv_delta_gb"] * GB / m["resident_kv_bytes"]
        measured.append(m)
    result = {"context": context, "rows": rows, "measured": measured}
    text = format_table(result)
    log(text)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "memory.json").write_text(json.dumps(result, indent=2))
    (out / "memory_table.md").write_text(text + "\n")
    (out / "memory_kv.svg").write_text(kv_plot_svg())
    log(f"wrote {out / 'memory.json'}, {out / 'memory_table.md'}, {out / 'memory_kv.svg'}")
    return result


def _gb(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}"


def format_table(result: dict) -> str:
    """Markdown tables: weights per column, KV per layout, measured bundles."""
    ctx = result["context"]
    lines = [f"Weights (GB): the report / this project's analytic figure", "",
             "| size | " + " | ".join(COLUMNS) + " |", "|---" * (len(COLUMNS) + 1) + "|"]
    for r in result["rows"]:
        cells = [f"{_gb(r['columns'][c]['report_weights_gb'])} / {_gb(r['columns'][c]['weights_gb'])}" for c in COLUMNS]
        lines.append(f"| {r['size']} | " + " | ".join(cells) + " |")
    lines += ["", f"KV cache at {ctx} tokens (GB): report's +KV delta; full length on every layer; this project's layout "
              "(local layers keep their window)", "",
              "| size | report delta | full bf16 | full int8 | window bf16 | window int8 | report / window bf16 |",
              "|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        k = r["kv"]
        ratio = r["report_delta_over_window_bf16"]
        lines.append(f"| {r['size']} | {_gb(r['report_kv_delta_gb'])} | {_gb(k['full_bfloat16_gb'])} | {_gb(k['full_int8_gb'])} | "
                     f"{_gb(k['window_bfloat16_gb'])} | {_gb(k['window_int8_gb'])} | {'-' if ratio is None else f'{ratio:.1f}x'} |")
    if result["measured"]:
        lines += ["", "Measured (onnxruntime CPU, fresh process; resident = RSS minus the process baseline)", "",
                  "| bundle | scheme | tokens | cache dtype | artifact GB | resident session GB | resident KV GB | analytic KV GB | measured / analytic | report delta / measured |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for m in result["measured"]:
            ratio = m.get("report_kv_delta_over_measured_kv")
            lines.append(
                f"| {m['model']} | {m['scheme']} | {m['tokens']} | {m['cache_dtype']} | {m['artifact_bytes'] / GB:.3f} | "
                f"{m['resident_session_bytes'] / GB:.3f} | {m['resident_kv_bytes'] / GB:.3f} | {m['analytic_kv_bytes'] / GB:.3f} | "
                f"{m['kv_measured_over_analytic']:.3f} | {'-' if ratio is None else f'{ratio:.1f}x'} |")
    return "\n".join(lines)


def kv_plot_svg(sizes: tuple[str, ...] = ("1b", "4b", "12b", "27b"), max_context: int = REPORT_CONTEXT) -> str:
    """KV memory (bf16) vs context length, full vs sliding-window layout (the report's Figure 6)."""
    w, h, pad = 640, 400, 60
    xs = [2 ** k for k in range(9, 16) if 2 ** k <= max_context] + [max_context]
    xs = sorted(set(xs))
    series = []
    colors = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd"]
    for size, color in zip(sizes, colors):
        c = preset(size)
        for layout, dash in (("full", "6,4"), ("window", "")):
            series.append((f"{size} {layout}", color, dash, [kv_bytes(c, x, layout, "bfloat16") / GB for x in xs]))
    top = max(max(s[3]) for s in series)
    sx = lambda x: pad + (w - 2 * pad) * (x / max_context)  # noqa: E731
    sy = lambda y: h - pad - (h - 2 * pad) * (y / top)  # noqa: E731
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-family="sans-serif" font-size="11">',
           f'<rect width="{w}" height="{h}" fill="white"/>',
           f'<line x1="{pad}" y1="{h - pad}" x2="{w - pad}" y2="{h - pad}" stroke="black"/>',
           f'<line x1="{pad}" y1="{pad}" x2="{pad}" y2="{h - pad}" stroke="black"/>',
           f'<text x="{w / 2}" y="{h - 20}" text-anchor="middle">context length (tokens)</text>',
           f'<text x="15" y="{h / 2}" transform="rotate(-90 15 {h / 2})" text-anchor="middle">KV cache, bf16 (GB)</text>',
           f'<text x="{w / 2}" y="25" text-anchor="middle">KV memory vs context: full length (dashed) vs sliding-window layout (solid)</text>']
    for x in (8192, 16384, 24576, 32768):
        if x <= max_context:
            out.append(f'<text x="{sx(x):.0f}" y="{h - pad + 15}" text-anchor="middle">{x}</text>')
    for i in range(5):
        y = top * i / 4
        out.append(f'<text x="{pad - 5}" y="{sy(y) + 4:.0f}" text-anchor="end">{y:.1f}</text>')
    for j, (name, color, dash, ys) in enumerate(series):
        points = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in zip(xs, ys))
        out.append(f'<polyline points="{points}" fill="none" stroke="{color}" stroke-width="2" stroke-dasharray="{dash}"/>')
        out.append(f'<text x="{pad + 10 + 140 * (j % 4)}" y="{pad + 12 * (j // 4) + 5}" fill="{color}">{name}</text>')
    out.append("</svg>")
    return "\n".join(out)
