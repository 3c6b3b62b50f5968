"""What each stored format runs on, and how fast: packed layers against fp32, side by side.

1. Layers: per format, the packed Linear's forward against the fp32 ``nn.Linear`` it
   replaces (module calls both: what a model runs), timed in alternation in this process,
   at batch 1 and 16 (rows of the matmul), for
   MiniLM's and SmolLM2's Linear shapes (random weights: speed does not depend on values).
2. Decode (``--decode``): SmolLM2-135M, greedy, KV cache on, batch 1, a fixed 64-token
   prompt and 32 new tokens: time to first token and decode tokens/s of each plan against
   the fp32 model, interleaved in one process; and each plan's resident memory, measured in
   a fresh process (RSS after loading, compressing and generating, minus RSS before the
   model was loaded; the model's tensors are copied off the baseline's file mapping first,
   and malloc_trim returns freed heap to the OS).

    .venv/bin/python benchmarks/kernels.py [--decode] [--threads 2] [--out PATH]
"""

from __future__ import annotations

import argparse
import copy
import ctypes
import gc
import json
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

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


@torch.no_grad()
def generate(model: nn.Module, ids: Tensor) -> tuple[float, float, list[int]]:
    """(time to first token s, decode tokens/s, the generated tokens): greedy with a KV cache."""
    start = time.perf_counter()
    out = model(input_ids=ids, use_cache=True)
    token = out.logits[:, -1].argmax(-1, keepdim=True)
    first = time.perf_counter() - start
    tokens, past = [int(token)], out.past_key_values
    start = time.perf_counter()
    for _ in range(NEW_TOKENS - 1):
        out = model(input_ids=token, past_key_values=past, use_cache=True)
        token, past = out.logits[:, -1].argmax(-1, keepdim=True), out.past_key_values
        tokens.append(int(token))
    decode = (NEW_TOKENS - 1) / (time.perf_counter() - start)
    return first, decode, tokens


def _rss() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def _own_memory(model: nn.Module) -> None:
    """Copy every tensor the model still holds into memory of its own: the baseline is read
    through a file mapping, whose pages would count as resident for as long as it is mapped."""
    copies: dict[int, Tensor] = {}
    with torch.no_grad():
        for module in model.modules():
            for name, tensor in [*module._parameters.items(), *module._buffers.items()]:
                if tensor is None:
                    continue
                if id(tensor) not in copies:  # tied tensors stay one
                    copies[id(tensor)] = tensor.data.clone()
                if name in module._parameters:
                    tensor.data = copies[id(tensor)]
                else:
                    module._buffers[name] = copies[id(tensor)]


def resident(plan_name: str) -> dict[str, Any]:
    """In this (fresh) process: the model's resident bytes while it generates under ``plan_name``."""
    before = _rss()
    model, ids = _smollm2()
    apply_plan(model, _plan(model, PLANS[plan_name]))
    _own_memory(model)
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    generate(model, ids)
    return {"plan": plan_name, "resident_bytes": _rss() - before}


def decode_rows(rounds: int) -> list[dict[str, Any]]:
    base, ids = _smollm2()
    _, _, want = generate(base, ids)
    rows = []
    for name, settings in PLANS.items():
        model = apply_plan(copy.deepcopy(base), _plan(base, settings)).eval() if settings else base
        kernels = sorted({getattr(m, "kernel", "") for m in model.modules()} - {""})
        firsts, rates, base_firsts, base_rates = [], [], [], []
        tokens: list[int] = []
        generate(model, ids)  # warm up: the first call of a model pays for its kernels' packing
        for _ in range(rounds):
            first, rate, tokens = generate(model, ids)
            firsts.append(first)
            rates.append(rate)
            first, rate, _ = generate(base, ids)
            base_firsts.append(first)
            base_rates.append(rate)
        memory = json.loads(
            subprocess.run(
                [sys.executable, __file__, "--resident", name],
                check=True,
                capture_output=True,
                text=True,
                cwd=ROOT,
            ).stdout.splitlines()[-1]
        )
        row = {
            "plan": name,
            "kernels": kernels,
            "ttft_ms": statistics.median(firsts) * 1e3,
            "fp32_ttft_ms": statistics.median(base_firsts) * 1e3,
            "tokens_per_s": statistics.median(rates),
            "fp32_tokens_per_s": statistics.median(base_rates),
            "same_tokens_as_fp32": sum(a == b for a, b in zip(tokens, want, strict=True)),
            "resident_bytes": memory["resident_bytes"],
        }
        row["ttft_ratio"] = row["ttft_ms"] / row["fp32_ttft_ms"]
        row["decode_speedup"] = row["tokens_per_s"] / row["fp32_tokens_per_s"]
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
            f"SmolLM2-135M decode, batch 1, {PROMPT}-token prompt, {NEW_TOKENS} new tokens "
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
                f"{row['resident_ratio']:.2f}x | {row['same_tokens_as_fp32']}/{NEW_TOKENS} |"
            )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--decode", action="store_true", help="also time SmolLM2 decoding and its memory")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=30, help="timed rounds per layer and format")
    parser.add_argument("--decode-rounds", type=int, default=3)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "kernels.json"))
    parser.add_argument("--resident", help=argparse.SUPPRESS)  # internal: one plan's memory
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.resident:
        print(json.dumps(resident(args.resident)))
        return
    result: dict[str, Any] = {
        "torch": torch.__version__,
        "cpu": torch.backends.cpu.get_cpu_capability(),
        "machine": platform.processor() or platform.machine(),
        "threads": args.threads,
        "layers": layer_rows(args.rounds),
    }
    if args.decode:
        result["decode"] = decode_rows(args.decode_rounds)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(table(result))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
