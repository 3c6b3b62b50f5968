"""MiniLM plans timed in torch and in ONNX Runtime, beside ORT's own dynamic int8.

For each plan (every Linear of the blocks at one width, and any ``--exports`` folders, e.g.
front points of a study): accuracy on the study's test split
in torch and in ORT (the plan exported with spaces/onnx.py), and latency at batch 1 x 64
tokens against the fp32 model in the same runtime, by the latency protocol (interleaved,
bootstrap interval). The peer row is ``onnxruntime.quantization.quantize_dynamic`` applied
to the fp32 ONNX model (its own int8 weights, per tensor), timed against the same fp32 ORT
session.

    .venv/bin/python benchmarks/onnx_minilm.py [--threads 2] [--budget 60] [--exports OUT1,OUT2] [--out PATH]
"""

from __future__ import annotations

import argparse
import copy
import json
import tempfile
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from methods import data, minilm_spec, quality  # benchmarks/methods.py
from torch import nn

from slimsearch.evaluators import LatencySpec, measure
from slimsearch.evaluators.latency import measure_timers, timed
from slimsearch.evaluators.onnx_backend import time_sessions
from slimsearch.search import models
from slimsearch.search.onnx_check import accuracy
from slimsearch.search.study_file import StudySpec
from slimsearch.spaces import CompressionPlan, LayerSettings, apply_plan
from slimsearch.spaces.onnx import export_onnx, session

ROOT = Path(__file__).resolve().parent.parent
CPU = ["CPUExecutionProvider"]
BLOCKS = r"re:.*encoder\.layer\.\d+\..*"
PLANS: dict[str, dict[str, Any]] = {
    "fp32": {},
    "int8 W8A8": {"bits": 8},
    "int8 W8A8 + table int8": {"bits": 8, "table": 8},
    "int8 weight-only, fp32 activations in ORT": {"bits": 8, "weight_only": True, "int8_compute": False},
    "int8 weight-only": {"bits": 8, "weight_only": True},
    "int4 g64 (float zero points)": {"bits": 4},
    "int4 g64, integer_zero": {"bits": 4, "integer_zero": True},
    "int4 g32, integer_zero": {"bits": 4, "group": 32, "integer_zero": True},
}


def plan_for(model: nn.Module, settings: dict[str, Any], blocks: str = BLOCKS) -> CompressionPlan:
    settings = dict(settings)
    layers = {}
    table = settings.pop("table", None)
    settings.pop("int8_compute", None)
    if settings:
        layers[blocks] = LayerSettings(**settings)
    if table:
        name = next(n for n, m in model.named_modules() if m is model.get_input_embeddings())  # type: ignore[operator]
        layers[name] = LayerSettings(bits=table)
    return CompressionPlan(layers=layers)


def baseline(
    spec: StudySpec, kind: str, threads: int, budget: float, seq_len: int = 64
) -> tuple[nn.Module, list[dict[str, Any]], int, LatencySpec]:
    """The study's baseline model (eval mode), evaluation batches, vocabulary size, and the
    latency protocol at batch 1 x ``seq_len`` tokens on ``threads`` threads."""
    torch.set_num_threads(threads)
    folder = models.prepare_baseline(spec)
    base, tokenizer = models.load_baseline(folder, kind)
    base.eval()
    batches, _ = data(spec, tokenizer)
    latency = LatencySpec(
        batch_size=1, seq_len=seq_len, threads=threads, warmup=5, repeats=20, time_budget=budget
    )
    return base, batches, len(tokenizer), latency


def ort_ratio(sess: Any, base: Any, spec: LatencySpec, vocab: int) -> dict[str, Any]:
    return time_sessions(sess, base, spec, vocab, (spec.batch_size, spec.seq_len), "bench-ort")


NBITS_KINDS = (
    "fp32 MatMul",
    "MatMulNBits, uint8 zero points",
    "MatMulNBits, uint8 zero points, int8 activations",
    "MatMulNBits, float zero points",
)


def _nbits_graph(kind: str, k: int, n: int, rows: int, block: int = 64) -> Any:
    """One MatMul of MiniLM's FFN shape: fp32, or MatMulNBits 4-bit with integer (uint8) or
    float zero points, on fp32 or (accuracy_level 4) int8 activations (random values: speed
    does not depend on them)."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, rows, k])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, rows, n])
    blocks = k // block
    domains = [helper.make_opsetid("", 17)]
    if kind == "fp32 MatMul":
        inits = [numpy_helper.from_array(rng.standard_normal((k, n)).astype(np.float32), "w")]
        node = helper.make_node("MatMul", ["x", "w"], ["y"])
    else:
        zeros = (
            rng.integers(0, 255, (n, (blocks + 1) // 2), dtype=np.uint8)
            if "uint8" in kind
            else (rng.random(n * blocks) * 15).astype(np.float32)
        )
        inits = [
            numpy_helper.from_array(rng.integers(0, 255, (n, blocks, block // 2), dtype=np.uint8), "b"),
            numpy_helper.from_array(rng.random(n * blocks).astype(np.float32), "s"),
            numpy_helper.from_array(zeros, "z"),
        ]
        node = helper.make_node(
            "MatMulNBits",
            ["x", "b", "s", "z"],
            ["y"],
            domain="com.microsoft",
            K=k,
            N=n,
            bits=4,
            block_size=block,
            accuracy_level=4 if "int8 activations" in kind else 0,
        )
        domains.append(helper.make_opsetid("com.microsoft", 1))
    model = helper.make_model(helper.make_graph([node], "g", [x], [y], inits), opset_imports=domains)
    model.ir_version = 9  # what onnxruntime 1.31 reads
    return model


def nbits_rows(threads: int, budget: float) -> list[dict[str, Any]]:
    """MatMulNBits' speed with integer and with float zero points, against fp32, 1536x384."""
    spec = LatencySpec(threads=threads, warmup=5, repeats=20, time_budget=budget)
    out = []
    for rows in (1, 64):
        feeds = {"x": np.random.default_rng(1).standard_normal((1, rows, 384)).astype(np.float32)}
        sessions = {
            kind: session(_nbits_graph(kind, 384, 1536, rows).SerializeToString(), threads)
            for kind in NBITS_KINDS
        }
        base = timed(partial(sessions["fp32 MatMul"].run, None, feeds))
        for kind, sess in sessions.items():
            result = measure_timers(timed(partial(sess.run, None, feeds)), base, spec, f"nbits-{rows}")
            out.append({"rows": rows, "operator": kind, "ratio": result["ratio"], "ms": result["median_ms"]})
            print(f"1536x384 at {rows} rows, {kind}: {result['ratio']:.2f}x fp32", flush=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--budget", type=float, default=60.0, help="seconds per latency measurement")
    parser.add_argument(
        "--exports",
        help="comma-separated folders written by `slimsearch export` (e.g. a study's front points), "
        "timed and scored beside the uniform plans",
    )
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "onnx_minilm.json"))
    args = parser.parse_args()
    import onnxruntime
    from onnxruntime.quantization import QuantType, quantize_dynamic

    base, batches, vocab, latency = baseline(minilm_spec(), "classification", args.threads, args.budget)
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        fp32_path = Path(tmp) / "fp32.onnx"
        export_onnx(base, fp32_path, vocab)
        base_sess = session(fp32_path, args.threads)
        candidates: list[tuple[str, nn.Module, bool]] = []
        for name, settings in PLANS.items():
            model = apply_plan(copy.deepcopy(base), plan_for(base, settings)).eval() if settings else base
            candidates.append((name, model, settings.get("int8_compute", True)))
        for folder_name in [f for f in (args.exports or "").split(",") if f]:
            from slimsearch.search.export import load

            candidates.append((f"export {Path(folder_name).name}", load(folder_name)[0].eval(), True))
        for name, model, int8_compute in candidates:
            path = Path(tmp) / "plan.onnx"
            ops = export_onnx(model, path, vocab, int8_compute=int8_compute)
            sess = session(path, args.threads)
            torch_lat = measure(model, latency, vocab, reference=base)
            ort_lat = ort_ratio(sess, base_sess, latency, vocab)
            row = {
                "plan": name,
                "onnx_ops": sorted(set(ops.values())),
                "torch_accuracy": quality(model, "classification", batches),
                "ort_accuracy": accuracy(sess, batches),
                "torch_ratio": torch_lat["ratio"],
                "torch_ratio_ci95": torch_lat["ratio_ci95"],
                "ort_ratio": ort_lat["ratio"],
                "ort_ratio_ci95": ort_lat["ratio_ci95"],
                "ort_fp32_ms": ort_lat["baseline_median_ms"],
                "torch_fp32_ms": torch_lat["baseline_median_ms"],
                "noisy": bool(torch_lat["noisy"] or ort_lat["noisy"]),
            }
            rows.append(row)
            print(
                f"{name}: accuracy torch {row['torch_accuracy']:.1f} / ORT {row['ort_accuracy']:.1f}; "
                f"latency vs fp32: torch {row['torch_ratio']:.2f}x, ORT {row['ort_ratio']:.2f}x",
                flush=True,
            )
        peer_path = Path(tmp) / "ort-int8.onnx"
        quantize_dynamic(str(fp32_path), str(peer_path), weight_type=QuantType.QInt8)
        peer = session(peer_path, args.threads)
        peer_lat = ort_ratio(peer, base_sess, latency, vocab)
        rows.append(
            {
                "plan": "ORT quantize_dynamic int8 (peer)",
                "onnx_ops": ["ORT's own"],
                "torch_accuracy": None,
                "ort_accuracy": accuracy(peer, batches),
                "torch_ratio": None,
                "ort_ratio": peer_lat["ratio"],
                "ort_ratio_ci95": peer_lat["ratio_ci95"],
                "ort_fp32_ms": peer_lat["baseline_median_ms"],
                "noisy": bool(peer_lat["noisy"]),
            }
        )
    result = {
        "onnxruntime": onnxruntime.__version__,
        "torch": torch.__version__,
        "threads": args.threads,
        "shape": [latency.batch_size, latency.seq_len],
        "baseline_accuracy": rows[0]["torch_accuracy"],
        "rows": rows,
        "matmul_nbits": nbits_rows(args.threads, args.budget),
    }
    write(result, Path(args.out), table(result))


def write(result: dict[str, Any], out: Path, text: str) -> None:
    """Write ``result`` as JSON to ``out`` and print its table ``text``."""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(text)
    print(f"wrote {out}")


def table(result: dict[str, Any]) -> str:
    lines = [
        "| plan | ONNX operators | accuracy torch | accuracy ORT | latency vs fp32, torch "
        "| latency vs fp32, ORT |",
        "|---" * 6 + "|",
    ]
    for r in result["rows"]:
        acc_t = f"{r['torch_accuracy']:.1f}" if r["torch_accuracy"] is not None else "-"
        lat_t = f"{r['torch_ratio']:.2f}x" if r["torch_ratio"] is not None else "-"
        lines.append(
            f"| {r['plan']} | {', '.join(r['onnx_ops']) or 'MatMul'} | {acc_t} | {r['ort_accuracy']:.1f} | "
            f"{lat_t} | {r['ort_ratio']:.2f}x |"
        )
    lines += ["", "| MatMulNBits 1536x384 | rows | vs fp32 MatMul |", "|---|---|---|"]
    lines += [f"| {r['operator']} | {r['rows']} | {r['ratio']:.2f}x |" for r in result["matmul_nbits"]]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
