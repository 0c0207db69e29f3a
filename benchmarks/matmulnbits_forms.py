"""Which MatMulNBits forms onnxruntime runs fast on this CPU: one [K=640, N=2048] weight (a 270M MLP
projection), per form, at M = 1 (decode) and M = 128 (prefill), 2 threads, median of repeats.

    python benchmarks/matmulnbits_forms.py [--json docs/matmulnbits_forms.json]

Forms: 4 or 8 bits; blocks of 16, 32 or 64; no zero points, uint8 zero points or float zero points;
accuracy_level 0 (fp32 compute) or 4 (inputs quantized to int8 per block). docs/gguf.md reads it.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import numpy as np
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

K, N = 640, 2048
FORMS = [(4, 32, "none"), (4, 32, "uint8"), (4, 32, "float"), (4, 16, "none"), (8, 32, "none"), (8, 32, "uint8"),
         (8, 16, "none"), (8, 16, "uint8"), (8, 64, "none")]


def graph(bits: int, block: int, zero_points: str, level: int, rng) -> bytes:
    nb = K // block
    inits = [numpy_helper.from_array(rng.integers(0, 256, (N, nb, block * bits // 8), dtype=np.uint8), "W"),
             numpy_helper.from_array((rng.random(N * nb, dtype=np.float32) * 0.01 + 0.001), "S")]
    if zero_points == "uint8":
        inits.append(numpy_helper.from_array(rng.integers(0, 256, N * (nb if bits == 8 else -(-nb // 2)), dtype=np.uint8), "Z"))
    elif zero_points == "float":
        inits.append(numpy_helper.from_array(rng.random(N * nb, dtype=np.float32) * 8, "Z"))
    node = helper.make_node("MatMulNBits", ["A", "W", "S", *(["Z"] if zero_points != "none" else [])], ["Y"],
                            domain="com.microsoft", K=K, N=N, bits=bits, block_size=block, accuracy_level=level)
    g = helper.make_graph([node], "g", [helper.make_tensor_value_info("A", TensorProto.FLOAT, [1, "M", K])],
                          [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [1, "M", N])], initializer=inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)]).SerializeToString()


def time_us(session, m: int, rng, repeats: int = 5) -> float:
    a = rng.random((1, m, K), dtype=np.float32)
    session.run(None, {"A": a})
    n = 100 if m == 1 else 10
    runs = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(n):
            session.run(None, {"A": a})
        runs.append((time.perf_counter() - start) / n * 1e6)
    return statistics.median(runs)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--json")
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    options = ort.SessionOptions()
    options.intra_op_num_threads = 2
    rows = []
    for bits, block, zp in FORMS:
        for level in (0, 4):
            row = {"bits": bits, "block": block, "zero_points": zp, "accuracy_level": level}
            try:
                s = ort.InferenceSession(graph(bits, block, zp, level, rng), options, providers=["CPUExecutionProvider"])
                row |= {"decode_us": round(time_us(s, 1, rng), 1), "prefill128_us": round(time_us(s, 128, rng), 1)}
            except Exception as e:  # noqa: BLE001  (a form onnxruntime refuses is a result too)
                row["error"] = str(e).splitlines()[-1][:200]
            rows.append(row)
            print(json.dumps(row), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"command": " ".join(["python", *sys.argv]), "K": K, "N": N, "onnxruntime": ort.__version__,
                       "rows": rows}, f, indent=1)
            f.write("\n")


if __name__ == "__main__":
    main()
