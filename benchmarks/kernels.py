"""What each stored format runs on, and how fast: packed layers against fp32, side by side.

1. Layers: per format, the packed Linear's forward against the fp32 ``nn.Linear`` it
   replaces (module calls both: what a model runs), timed in alternation in this process,
   at batch 1 and 16 (rows of the matmul), for
   MiniLM's and SmolLM2's Linear shapes (random weights: speed does not depend on values).
2. Decode (``--decode``): SmolLM2-135M, greedy, KV cache on, batch 1, a 64-token prompt
   from the evaluation text and 32 tokens after the first, measured by the search's own
   objectives: time to first token and decode tokens/s against the fp32 model, interleaved
   (``evaluators/decode.py``), and resident memory in a fresh process
   (``evaluators/memory.py``: peak RSS while generating, minus the process without the model).

    .venv/bin/python benchmarks/kernels.py [--decode] [--decode-budget 90] [--threads 2] [--out PATH]
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from slimsearch.evaluators import EvalContext, LatencySpec, measure_decode, measure_resident
from slimsearch.spaces import CompressionPlan, LayerSettings, apply_plan
from slimsearch.spaces.apply import compress_linear
from slimsearch.spaces.methods import PackedLinear

ROOT = Path(__file__).resolve().parent.parent
SHAPES = {  # (out, in)
    "minilm": [(384, 384), (1536, 384), (384, 1536)],
    "smollm2": [(576, 576), (192, 576), (1536, 576), (576, 1536), (49152, 576)],
}
FORMATS: dict[str, dict[str, Any]] = {
    "bf16": {"bits": 16},
    "int8 (W8A8)": {"bits": 8},
    "int8 weight-only": {"bits": 8, "weight_only": True},
    "int4 g64": {"bits": 4},
    "int4 g128": {"bits": 4, "group": 128},
    "int3 g64": {"bits": 3},
    "int2 g64": {"bits": 2},
}
PLANS: dict[str, dict[str, Any]] = {  # SmolLM2 decode: every Linear and the (tied) table
    "fp32": {},
    "bf16": {"bits": 16},
    "int8 weight-only": {"bits": 8, "weight_only": True},
    "int4 g64": {"bits": 4},
}
PROMPT, NEW_TOKENS = 64, 32


def _median_ratio(run: Callable[[], Any], reference: Callable[[], Any], rounds: int) -> dict[str, float]:
    """Median seconds of ``run`` and ``reference``, timed in alternation, and their ratio."""
    ours: list[float] = []
    ref: list[float] = []
    for fn in (run, reference, run, reference):
        fn()  # warm up
    for _ in range(rounds):
        for fn, out in ((run, ours), (reference, ref)):
            start = time.perf_counter()
            fn()
            out.append(time.perf_counter() - start)
    a, b = statistics.median(ours), statistics.median(ref)
    return {"ms": a * 1e3, "fp32_ms": b * 1e3, "ratio": a / b}


@torch.no_grad()
def layer_rows(rounds: int) -> list[dict[str, Any]]:
    rows = []
    for model, shapes in SHAPES.items():
        for out_f, in_f in shapes:
            gen = torch.Generator().manual_seed(0)
            linear = nn.Linear(in_f, out_f)
            linear.weight.copy_(torch.randn(out_f, in_f, generator=gen) * 0.05)
            for name, settings in FORMATS.items():
                packed = compress_linear(linear, LayerSettings(**settings), None)
                assert isinstance(packed, PackedLinear)
                for batch in (1, 16):
                    x = torch.randn(batch, in_f, generator=gen)
                    timing = _median_ratio(partial(packed, x), partial(linear, x), rounds)
                    rows.append(
                        {
                            "model": model,
                            "shape": f"{out_f}x{in_f}",
                            "format": name,
                            "kernel": packed.kernel,
                            "batch": batch,
                            **timing,
                        }
                    )
                    print(
                        f"{model} {out_f}x{in_f} {name} b{batch}: {packed.kernel} x{timing['ratio']:.2f}",
                        flush=True,
                    )
    return rows


def _plan(model: nn.Module, settings: dict[str, Any]) -> CompressionPlan:
    if not settings:
        return CompressionPlan()
    table = next(n for n, m in model.named_modules() if m is model.get_input_embeddings())  # type: ignore[operator]
    table_bits = settings["bits"]
    return CompressionPlan(
        layers={
            r"re:model\.layers\.\d+\..*": LayerSettings(**settings),
            table: LayerSettings(bits=table_bits),
        }
    )


def _smollm2() -> tuple[nn.Module, Tensor]:
    from methods import smollm2_spec  # benchmarks/methods.py

    from slimsearch.search import models, tasks

    spec = smollm2_spec()
    folder = models.prepare_baseline(spec)
    model, tokenizer = models.load_baseline(folder, spec.task.kind)
    text = tasks.lm_text(spec.task, spec.cache)
    ids = tokenizer(text[:4000], return_tensors="pt")["input_ids"][:, :PROMPT]
    return model.eval(), ids


def decode_rows(threads: int, budget: float) -> list[dict[str, Any]]:
    """Each plan by the search's own objectives: ``measure_decode`` (interleaved with fp32)
    and ``measure_resident`` (a fresh process)."""
    base, ids = _smollm2()
    spec = LatencySpec(
        batch_size=1, seq_len=PROMPT, threads=threads, decode_tokens=NEW_TOKENS, time_budget=budget
    )
    vocab = base.get_input_embeddings().num_embeddings  # type: ignore[operator]
    rows = []
    for name, settings in PLANS.items():
        plan = _plan(base, settings)
        model = apply_plan(copy.deepcopy(base), plan).eval() if settings else base
        kernels = sorted({getattr(m, "kernel", "") for m in model.modules()} - {""})
        decode = measure_decode(model, spec, vocab, reference=base, batches=[{"input_ids": ids}])
        context = EvalContext(task="causal-lm", batches=[], vocab_size=vocab, plan=plan, latency=spec)
        memory = measure_resident(model, context)
        row = {
            "plan": name,
            "kernels": kernels,
            "ttft_ms": decode["ttft_ms"],
            "fp32_ttft_ms": decode["ttft"]["baseline_median_ms"],
            "tokens_per_s": decode["tokens_per_s"],
            "fp32_tokens_per_s": 1000.0 / decode["decode"]["baseline_median_ms"],
            "decode_speedup": decode["speedup"],
            "decode_speedup_ci95": decode["speedup_ci95"],
            "ttft_ratio": decode["ttft_ratio"],
            "noisy": decode["noisy"],
            "same_tokens_as_fp32": decode["same_tokens_as_baseline"],
            "resident_bytes": memory["resident_bytes"],
            "memory": memory,
        }
        rows.append(row)
        print(
            f"decode {name}: {row['tokens_per_s']:.1f} tok/s (x{row['decode_speedup']:.2f} fp32), "
            f"TTFT x{row['ttft_ratio']:.2f}, {row['resident_bytes'] / 1e6:.0f} MB resident",
            flush=True,
        )
        del model
    fp32_memory = rows[0]["resident_bytes"]
    for row in rows:
        row["resident_ratio"] = row["resident_bytes"] / fp32_memory
    return rows


def table(result: dict[str, Any]) -> str:
    lines = [
        "| model | shape (out x in) | format | kernel | batch 1 vs fp32 | batch 16 vs fp32 |",
        "|---" * 6 + "|",
    ]
    rows = result["layers"]
    for row in rows:
        if row["batch"] != 1:
            continue
        other = next(
            r
            for r in rows
            if r["batch"] == 16
            and (r["model"], r["shape"], r["format"]) == (row["model"], row["shape"], row["format"])
        )
        lines.append(
            f"| {row['model']} | {row['shape']} | {row['format']} | {row['kernel']} | "
            f"{row['ratio']:.2f}x | {other['ratio']:.2f}x |"
        )
    if result.get("decode"):
        lines += [
            "",
            f"SmolLM2-135M decode, batch 1, {PROMPT}-token prompt, {NEW_TOKENS} tokens after the first "
            f"(greedy, KV cache), {result['threads']} threads:",
            "",
            "| plan | kernels | decode tok/s | vs fp32 | time to first token vs fp32 | resident MB "
            "| vs fp32 | same tokens as fp32 |",
            "|---" * 8 + "|",
        ]
        for row in result["decode"]:
            lines.append(
                f"| {row['plan']} | {', '.join(row['kernels']) or 'fp32'} | {row['tokens_per_s']:.1f} | "
                f"{row['decode_speedup']:.2f}x | {row['ttft_ratio']:.2f}x | "
                f"{row['resident_bytes'] / 1e6:.0f} | "
                f"{row['resident_ratio']:.2f}x | {row['same_tokens_as_fp32']}/{NEW_TOKENS + 1} |"
            )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--decode", action="store_true", help="also time SmolLM2 decoding and its memory")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=30, help="timed rounds per layer and format")
    parser.add_argument(
        "--decode-budget", type=float, default=90.0, help="seconds per plan's decode measurement"
    )
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "kernels.json"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    result: dict[str, Any] = {
        "torch": torch.__version__,
        "cpu": torch.backends.cpu.get_cpu_capability(),
        "machine": platform.processor() or platform.machine(),
        "threads": args.threads,
        "layers": layer_rows(args.rounds),
    }
    if args.decode:
        result["decode"] = decode_rows(args.threads, args.decode_budget)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(table(result))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
