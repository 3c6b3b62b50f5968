"""Latency: timed forward passes under a protocol meant to survive a noisy machine.

The protocol, per input shape:
1. Set the thread count (reused worker processes keep whatever an earlier task set).
2. Warm up: at least ``warmup`` passes, then more until two successive blocks of passes
   agree within 10% (capped), so caches, allocators and kernels have settled.
3. Time blocks of ``repeats`` passes of the candidate, interleaved pass by pass with the
   baseline model when one is given, so both see the same machine state; add blocks until
   the ratio's bootstrap 95% interval is within ``precision`` of it (up to ``max_repeats``).
4. Noise gates: measure again (up to ``retries`` times, after a short pause) when the
   robust coefficient of variation (IQR / 1.349 / median) of the candidate's times exceeds
   ``max_cv``, or when the baseline runs more than ``max_drift`` slower than the quietest
   it has run (in this process, or in earlier trials of the study). On a VM a neighbour's
   load shifts the ratio itself (it slows fp32 and int8 kernels unequally), so the attempt
   with the fastest baseline is kept.
   All of it within ``time_budget`` seconds: past it no new block or attempt starts, and
   the best attempt so far is kept (flagged ``noisy`` when it failed a gate).
5. Report the median, the inter-quartile range, a bootstrap 95% interval of the ratio to
   the baseline, and the environment (CPU, threads, torch version, node).
"""

from __future__ import annotations

import math
import platform
import random
import statistics
import time
from collections.abc import Callable, Mapping
from functools import partial
from typing import Any

import torch
from torch import nn

from slimsearch.evaluators.base import Direction, EvalContext, LatencySpec
from slimsearch.evaluators.device import gpu_environment, model_device, synchronize, to_device

MAX_WARMUP_BLOCKS = 10


def latency_inputs(batch_size: int, seq_len: int, vocab_size: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(1, max(vocab_size, 2), (batch_size, seq_len), generator=gen)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def timed(call: Callable[[], object], device: torch.device | None = None) -> Callable[[], float]:
    """A timed pass of ``call``: each call of the result runs it once and returns its ms.

    On a GPU, kernels return before they finish: the pass is timed by CUDA events recorded
    around it on the current stream and read once the end event has completed, so the time
    is the GPU's and no host clock waits on a queue that still holds earlier work."""
    if device is not None and device.type == "cuda":
        return _cuda_timed(call, device)

    def once() -> float:
        start = time.perf_counter()
        call()
        return (time.perf_counter() - start) * 1000.0

    return once


def _cuda_timed(call: Callable[[], object], device: torch.device) -> Callable[[], float]:
    def once() -> float:
        with torch.cuda.device(device):
            synchronize(device)  # nothing queued before the pass is counted in it
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            start.record()
            call()
            end.record()
            end.synchronize()
            return float(start.elapsed_time(end))

    return once


def _timer(model: nn.Module, inputs: dict[str, torch.Tensor]) -> Callable[[], float]:
    device = model_device(model)
    return timed(partial(model, **to_device(inputs, device)), device)


def _warm_up(run: Callable[[], float], minimum: int, deadline: float = math.inf) -> int:
    """Run at least ``minimum`` passes, then blocks until two blocks' medians agree within 10%
    (or the deadline passes)."""
    for _ in range(minimum):
        run()
    block = max(3, minimum // 2)
    previous = statistics.median(run() for _ in range(block))
    passes = minimum + block
    for _ in range(MAX_WARMUP_BLOCKS):
        if time.monotonic() > deadline:
            break
        current = statistics.median(run() for _ in range(block))
        passes += block
        if abs(current - previous) <= 0.1 * previous:
            break
        previous = current
    return passes


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment(spec: LatencySpec, device: torch.device | None = None) -> dict[str, Any]:
    """Where a measurement ran: the CPU, threads, torch and node, and on a GPU its model,
    memory, compute capability and the CUDA and driver versions."""
    return {
        "cpu": cpu_model(),
        "backend": spec.backend,
        "threads": spec.threads,
        "torch": torch.__version__,
        "node": platform.node(),
    } | (gpu_environment(device) if device is not None else {})


def _spread(times: list[float]) -> dict[str, float]:
    median = statistics.median(times)
    if len(times) >= 2:
        q = statistics.quantiles(times, n=4)
        cv = statistics.stdev(times) / statistics.mean(times)
    else:
        q, cv = [median, median, median], 0.0
    # The gate reads a robust CV (IQR / 1.349 / median): one preempted pass among hundreds
    # says nothing about the median, but a plain CV would fail the whole measurement on it.
    return {"median_ms": median, "iqr_ms": q[2] - q[0], "cv": cv, "robust_cv": (q[2] - q[0]) / 1.349 / median}


def bootstrap_ratio(cand: list[float], base: list[float], rounds: int = 400) -> tuple[float, float]:
    """95% bootstrap interval of median(cand) / median(base), with a fixed seed."""
    rng = random.Random(0)
    ratios = sorted(
        statistics.median(rng.choices(cand, k=len(cand))) / statistics.median(rng.choices(base, k=len(base)))
        for _ in range(rounds)
    )
    return ratios[int(0.025 * rounds)], ratios[int(0.975 * rounds) - 1]


# The fastest median each baseline has shown, per shape, thread count and baseline size: the
# "quiet machine" reference the drift gate compares against. Reused workers keep it, and the
# driver hands what earlier trials saw to every job (so fresh processes have it too).
_QUIETEST: dict[str, float] = {}


def quiet_key(batch: int, seq: int, threads: int, reference: nn.Module | None) -> str:
    params = sum(p.numel() for p in reference.parameters()) if reference is not None else 0
    key = f"b{batch}-s{seq}-t{threads}-p{params}"
    device = model_device(reference) if reference is not None else torch.device("cpu")
    return key if device.type == "cpu" else f"{key}-{device}"


def merge_quietest(into: dict[str, float], times: Mapping[str, float]) -> None:
    """Keep, per key, the quietest (smallest) baseline time of ``into`` and ``times``."""
    for key, ms in times.items():
        into[key] = min(into.get(key, ms), ms)


def remember_quiet(times: Mapping[str, float]) -> None:
    """Take the quietest baseline times seen elsewhere (e.g. by earlier trials of a study)."""
    merge_quietest(_QUIETEST, times)


def quiet_times(record: dict[str, Any]) -> dict[str, float]:
    """{quiet key: baseline median} from a latency record written by ``measure_all`` (its
    shapes) or a decode record (its two passes)."""
    out: dict[str, float] = {}
    passes = [record[k] for k in ("ttft", "decode") if isinstance(record.get(k), dict)]
    for shape in [*record.get("shapes", []), *passes]:
        if "quiet_key" in shape and "baseline_median_ms" in shape:
            out[shape["quiet_key"]] = float(shape["baseline_median_ms"])
    return out


def _sample(
    run_cand: Callable[[], float],
    run_base: Callable[[], float] | None,
    spec: LatencySpec,
    deadline: float = math.inf,
) -> tuple[list[float], list[float]]:
    """Blocks of ``repeats`` interleaved passes until the ratio is precise enough (or capped,
    or the deadline passed: at least one block is always taken)."""
    cand: list[float] = []
    base: list[float] = []
    cap = max(spec.max_repeats, spec.repeats)
    check_at = 0  # the bootstrap costs more than a tiny model's pass: check as the sample grows 1.5x
    while True:
        for _ in range(spec.repeats):
            cand.append(run_cand())
            if run_base is not None:
                base.append(run_base())
        if run_base is None or spec.precision <= 0 or len(cand) + spec.repeats > cap:
            return cand, base
        if time.monotonic() > deadline:
            return cand, base
        if len(cand) < check_at:
            continue
        check_at = int(len(cand) * 1.5)
        low, high = bootstrap_ratio(cand, base, rounds=200)
        ratio = statistics.median(cand) / statistics.median(base)
        if (high - low) / 2 <= spec.precision * ratio:
            return cand, base


@torch.no_grad()
def measure(
    model: nn.Module,
    spec: LatencySpec,
    vocab_size: int,
    reference: nn.Module | None = None,
    shape: tuple[int, int] | None = None,
    deadline: float = math.inf,
) -> dict[str, Any]:
    """Measure one input shape by the protocol above; returns medians, spread and noise.

    Past ``deadline`` (time.monotonic()) no more warm-up blocks, sample blocks or attempts
    start: the best attempt so far is kept, and flagged noisy when it failed a gate."""
    torch.set_num_threads(spec.threads)
    batch, seq = shape or (spec.batch_size, spec.seq_len)
    inputs = latency_inputs(batch, seq, vocab_size)
    run_base = _timer(reference, inputs) if reference is not None else None
    key = quiet_key(batch, seq, spec.threads, reference)
    return {"batch_size": batch, "seq_len": seq} | measure_timers(
        _timer(model, inputs), run_base, spec, key, deadline
    )


def measure_timers(
    run_cand: Callable[[], float],
    run_base: Callable[[], float] | None,
    spec: LatencySpec,
    key: str,
    deadline: float = math.inf,
) -> dict[str, Any]:
    """Steps 2-5 of the protocol for any pair of timed passes (each call returns ms).

    ``key`` names the baseline's quiet-machine reference for the drift gate."""
    warm = _warm_up(run_cand, spec.warmup, deadline)
    if run_base is not None:
        warm += _warm_up(run_base, spec.warmup, deadline)
    attempts: list[dict[str, Any]] = []
    out_of_time = False
    for attempt in range(spec.retries + 1):
        if attempt:
            if time.monotonic() > deadline:
                out_of_time = True
                break
            time.sleep(0.2 * attempt)  # a short pause: a burst of other work may pass
        cand, base = _sample(run_cand, run_base, spec, deadline)
        result: dict[str, Any] = {"repeats": len(cand)}
        result |= _spread(cand)
        result["warmup_passes"] = warm
        quiet = True
        if base:
            b = _spread(base)
            result["baseline_median_ms"] = b["median_ms"]
            result["baseline_cv"] = b["cv"]
            result["ratio"] = result["median_ms"] / b["median_ms"]
            result["ratio_ci95"] = bootstrap_ratio(cand, base)
            remember_quiet({key: b["median_ms"]})
            result["baseline_drift"] = b["median_ms"] / _QUIETEST[key] - 1.0
            result["quiet_key"] = key
            quiet = spec.max_drift <= 0 or result["baseline_drift"] <= spec.max_drift
        attempts.append(result)
        if result["robust_cv"] <= spec.max_cv and quiet:
            break
    # Keep the attempt taken on the quietest machine: the fastest baseline, else the lowest CV.
    best = min(attempts, key=lambda r: r.get("baseline_median_ms", r["robust_cv"]))
    best["attempts"] = len(attempts)
    best["noisy"] = best["robust_cv"] > spec.max_cv or (
        spec.max_drift > 0 and best.get("baseline_drift", 0.0) > spec.max_drift
    )
    best["out_of_time"] = out_of_time or time.monotonic() > deadline
    return best


def measure_all(model: nn.Module, context: EvalContext, reference: nn.Module | None = None) -> dict[str, Any]:
    """Every configured shape, plus the environment; cached in ``context.records``."""
    if "latency" not in context.records:
        spec = context.latency
        deadline = time.monotonic() + spec.time_budget if spec.time_budget > 0 else math.inf
        extra: dict[str, Any] = {}
        if spec.backend == "onnxruntime":
            from slimsearch.evaluators.onnx_backend import measure_onnx

            shapes, extra = measure_onnx(model, spec, context.vocab_size, reference, deadline)
        else:
            shapes = [
                measure(model, spec, context.vocab_size, reference, s, deadline) for s in spec.all_shapes()
            ]
        env = environment(spec, model_device(model)) | extra
        record: dict[str, Any] = {"shapes": shapes, "environment": env}
        record["median_ms"] = sum(s["median_ms"] for s in shapes)
        if all("ratio" in s for s in shapes):
            record["ratio"] = statistics.geometric_mean([s["ratio"] for s in shapes])
        record["noisy"] = any(s["noisy"] for s in shapes)
        context.records["latency"] = record
    result: dict[str, Any] = context.records["latency"]
    return result


def time_forward(model: nn.Module, inputs: dict[str, torch.Tensor], spec: LatencySpec) -> list[float]:
    """Plain per-pass times in milliseconds after ``spec.warmup`` untimed passes."""
    torch.set_num_threads(spec.threads)
    run = _timer(model, inputs)
    with torch.no_grad():
        for _ in range(spec.warmup):
            run()
        return [run() for _ in range(spec.repeats)]


def require_reference(context: EvalContext, name: str) -> nn.Module:
    """The baseline model a relative measurement needs, or a clear error."""
    if context.reference is None:
        raise ValueError(
            f"{name} needs the baseline model in context.reference; "
            "slimsearch's worker provides it, a direct caller must set it"
        )
    return context.reference


class LatencyMs:
    """Median forward time in ms (summed over the configured shapes)."""

    name = "latency_ms"
    compare = "ratio"
    direction: Direction = "minimize"
    exclusive = True  # needs the machine to itself while it measures

    def evaluate(self, model: nn.Module, context: EvalContext) -> float:
        return float(measure_all(model, context, context.reference)["median_ms"])


class LatencyRatio:
    """Latency relative to the uncompressed baseline, measured interleaved in the same process
    (geometric mean over shapes). Robust to a machine that is uniformly slower or faster."""

    name = "latency_ratio"
    compare = "difference"
    direction: Direction = "minimize"
    exclusive = True

    def evaluate(self, model: nn.Module, context: EvalContext) -> float:
        return float(measure_all(model, context, require_reference(context, self.name))["ratio"])
