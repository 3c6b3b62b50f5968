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
3. torchao (``--torchao``, with ``pip install -e ".[bench]"``): torchao 0.18's CPU weight-only
   layers on the same shapes, each timed in alternation with fp32 as above, beside the
   packed layer of the same format: what a user would get from torchao instead. Its layers
   take bf16 activations (what torchao feeds them); ours fp32 ones (what a model feeds them).
   A torchao format whose CPU kernel is missing from its wheel is reported with the error.
4. Where a decode step's time goes (``--profile``): SmolLM2 decoding as in 2, per plan, the
   milliseconds per token in matmul kernels (torch's profiler, self time) and the rest
   (everything else: attention, norms, the KV cache, Python), from an unprofiled timing
   minus the kernels' share. fp32's time over a plan's rest is the decode speedup the plan
   would reach if its matmuls cost nothing: a bound no faster kernel can pass.

    .venv/bin/python benchmarks/kernels.py [--decode] [--torchao] [--profile] [--decode-budget 90]
        [--threads 2] [--out PATH]
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


# torchao config name -> (our format it competes with, config keyword arguments).
TORCHAO: dict[str, tuple[str, dict[str, Any]]] = {
    "PrototypeInt4WeightOnlyConfig": ("int4 g64", {"group_size": 64}),
    "Int8WeightOnlyConfig": ("int8 weight-only", {}),
    "Int8DynamicActivationInt4WeightConfig": ("int4 g64", {"group_size": 64}),
}


def _torchao_layer(linear: nn.Linear, config: str) -> nn.Module:
    import torchao.prototype.quantization.int4.inference_workflow as int4
    import torchao.quantization as quantization
    from torchao.quantization import quantize_

    factory = getattr(quantization, config, None) or getattr(int4, config)
    layer = copy.deepcopy(linear).to(torch.bfloat16)
    quantize_(layer, factory(**TORCHAO[config][1]))
    return layer


@torch.no_grad()
def torchao_rows(rounds: int) -> list[dict[str, Any]]:
    """torchao's weight-only layers and ours of the same format, each against fp32."""
    import torchao

    rows: list[dict[str, Any]] = []
    for model, shapes in SHAPES.items():
        for out_f, in_f in shapes:
            gen = torch.Generator().manual_seed(0)
            linear = nn.Linear(in_f, out_f)
            linear.weight.copy_(torch.randn(out_f, in_f, generator=gen) * 0.05)
            for config, (ours, _) in TORCHAO.items():
                packed = compress_linear(linear, LayerSettings(**FORMATS[ours]), None)
                base = {"model": model, "shape": f"{out_f}x{in_f}", "torchao": config, "format": ours}
                try:
                    layer = _torchao_layer(linear, config)
                    layer(torch.randn(1, in_f, dtype=torch.bfloat16))
                except Exception as err:  # a config whose CPU kernel the wheel lacks
                    rows.append({**base, "error": f"{type(err).__name__}: {err}".splitlines()[0][:200]})
                    print(f"{model} {out_f}x{in_f} torchao {config}: {rows[-1]['error']}", flush=True)
                    continue
                for batch in (1, 16):
                    x = torch.randn(batch, in_f, generator=gen)
                    theirs = _median_ratio(partial(layer, x.to(torch.bfloat16)), partial(linear, x), rounds)
                    mine = _median_ratio(partial(packed, x), partial(linear, x), rounds)
                    rows.append(
                        {
                            **base,
                            "version": torchao.__version__,
                            "batch": batch,
                            "torchao_ratio": theirs["ratio"],
                            "ours_ratio": mine["ratio"],
                        }
                    )
                    print(
                        f"{model} {out_f}x{in_f} b{batch}: torchao {config} x{theirs['ratio']:.2f}, "
                        f"slimsearch {ours} x{mine['ratio']:.2f}",
                        flush=True,
                    )
    return rows


MATMULS = (
    "aten::mm",
    "aten::addmm",
    "aten::_weight_int4pack_mm_for_cpu",
    "aten::_weight_int8pack_mm",
    "quantized::linear_dynamic",
)


@torch.no_grad()
def profile_rows(rounds: int = 3, tokens: int = NEW_TOKENS) -> list[dict[str, Any]]:
    """Per plan: ms per decoded token, the matmul kernels' share of it, and the rest."""
    from slimsearch.evaluators.decode import first_token, greedy

    base, ids = _smollm2()
    rows: list[dict[str, Any]] = []
    for name, settings in PLANS.items():
        model = apply_plan(copy.deepcopy(base), _plan(base, settings)).eval() if settings else base
        token, past = first_token(model, ids)
        greedy(model, token, past, 8)  # warm up
        times = []
        for _ in range(rounds):
            token, past = first_token(model, ids)
            start = time.perf_counter()
            greedy(model, token, past, tokens)
            times.append((time.perf_counter() - start) / tokens)
        token, past = first_token(model, ids)
        with torch.profiler.profile() as prof:
            greedy(model, token, past, tokens)
        kernel_us = sum(e.self_cpu_time_total for e in prof.key_averages() if e.key in MATMULS)
        total = statistics.median(times) * 1e3
        matmul = min(kernel_us / 1e3 / tokens, total)
        rows.append({"plan": name, "ms_per_token": total, "matmul_ms": matmul, "rest_ms": total - matmul})
        print(f"profile {name}: {total:.1f} ms/token, {matmul:.1f} in matmuls", flush=True)
    fp32 = rows[0]["ms_per_token"]
    for row in rows:
        row["speedup"] = fp32 / row["ms_per_token"]
        row["bound_if_matmuls_free"] = fp32 / row["rest_ms"]
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
    if result.get("profile"):
        lines += [
            "",
            f"Where a SmolLM2 decode step goes ({result['threads']} threads; ms per token):",
            "",
            "| plan | ms/token | in matmul kernels | the rest | decode vs fp32 "
            "| bound if matmuls were free |",
            "|---" * 6 + "|",
        ]
        for row in result["profile"]:
            lines.append(
                f"| {row['plan']} | {row['ms_per_token']:.1f} | {row['matmul_ms']:.1f} "
                f"| {row['rest_ms']:.1f} | {row['speedup']:.2f}x | {row['bound_if_matmuls_free']:.2f}x |"
            )
    if result.get("torchao"):
        lines += [
            "",
            f"torchao {result['torchao'][0].get('version', '')} against slimsearch, each vs fp32 "
            "(lower is faster):",
            "",
            "| shape (out x in) | torchao config | slimsearch format | torchao b1 / b16 "
            "| slimsearch b1 / b16 |",
            "|---" * 5 + "|",
        ]
        for row in result["torchao"]:
            if row.get("batch", 1) != 1:
                continue
            head = f"| {row['model']} {row['shape']} | {row['torchao']} | {row['format']} |"
            if "error" in row:
                lines.append(f"{head} not run: {row['error']} | |")
                continue
            b16 = next(
                r
                for r in result["torchao"]
                if r.get("batch") == 16 and (r["shape"], r["torchao"]) == (row["shape"], row["torchao"])
            )
            lines.append(
                f"{head} {row['torchao_ratio']:.2f} / {b16['torchao_ratio']:.2f} | "
                f"{row['ours_ratio']:.2f} / {b16['ours_ratio']:.2f} |"
            )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--decode", action="store_true", help="also time SmolLM2 decoding and its memory")
    parser.add_argument(
        "--torchao", action="store_true", help="also time torchao's CPU layers (the bench extra)"
    )
    parser.add_argument("--profile", action="store_true", help="also split SmolLM2 decode time (see 4.)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=30, help="timed rounds per layer and format")
    parser.add_argument(
        "--decode-budget", type=float, default=90.0, help="seconds per plan's decode measurement"
    )
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "kernels.json"))
    args = parser.parse_args()
    if args.torchao:
        try:
            import torchao  # noqa: F401
        except ImportError:
            parser.error('--torchao needs torchao: pip install -e ".[bench]"')
    torch.set_num_threads(args.threads)
    result: dict[str, Any] = {
        "torch": torch.__version__,
        "cpu": torch.backends.cpu.get_cpu_capability(),
        "machine": platform.processor() or platform.machine(),
        "threads": args.threads,
        "layers": layer_rows(args.rounds),
    }
    if args.profile:
        result["profile"] = profile_rows()
    if args.torchao:
        result["torchao"] = torchao_rows(args.rounds)
    if args.decode:
        result["decode"] = decode_rows(args.threads, args.decode_budget)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(table(result))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
