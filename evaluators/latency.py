"""Latency: median wall time of repeated forward passes at one input shape.

Warm up, then time each pass; the thread count is set here because reused worker
processes keep whatever an earlier task set.
"""

from __future__ import annotations

import statistics
import time

import torch
from torch import nn

from slimsearch.evaluators.base import Direction, EvalContext, LatencySpec


def latency_inputs(spec: LatencySpec, vocab_size: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(1, max(vocab_size, 2), (spec.batch_size, spec.seq_len), generator=gen)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


@torch.no_grad()
def time_forward(model: nn.Module, inputs: dict[str, torch.Tensor], spec: LatencySpec) -> list[float]:
    """Per-pass times in milliseconds, after ``spec.warmup`` untimed passes."""
    torch.set_num_threads(spec.threads)
    for _ in range(spec.warmup):
        model(**inputs)
    times = []
    for _ in range(spec.repeats):
        start = time.perf_counter()
        model(**inputs)
        times.append((time.perf_counter() - start) * 1000.0)
    return times


class LatencyMs:
    name = "latency_ms"
    direction: Direction = "minimize"

    def evaluate(self, model: nn.Module, context: EvalContext) -> float:
        spec = context.latency
        times = time_forward(model, latency_inputs(spec, context.vocab_size), spec)
        median = statistics.median(times)
        q = statistics.quantiles(times, n=4) if len(times) >= 2 else [median, median, median]
        context.records["latency"] = {
            "median_ms": median,
            "iqr_ms": q[2] - q[0],
            "batch_size": spec.batch_size,
            "seq_len": spec.seq_len,
            "threads": spec.threads,
            "repeats": spec.repeats,
        }
        return median
