"""Latency in ONNX Runtime (``latency.backend: onnxruntime``): the candidate and the baseline
are each exported to ONNX with the operators of their stored formats (spaces/onnx.py) and
timed in ONNX Runtime CPU sessions by the same protocol as in torch (warm-up, interleaved
passes, bootstrap interval, noise gates), so a classifier's or a causal LM's front shows
the speed of a forward pass a user gets when deploying with ORT. The baseline's session is
made once per process.
"""

from __future__ import annotations

import math
import tempfile
import weakref
from collections import Counter
from functools import partial
from pathlib import Path
from typing import Any

from torch import nn

from slimsearch.evaluators.base import LatencySpec
from slimsearch.evaluators.latency import latency_inputs, measure_timers, quiet_key, timed
from slimsearch.spaces.onnx import export_onnx, feeds, session

_BASELINES: weakref.WeakKeyDictionary[nn.Module, dict[int, Any]] = weakref.WeakKeyDictionary()


def onnx_session(model: nn.Module, vocab_size: int, threads: int) -> tuple[Any, dict[str, str]]:
    """An ORT session of ``model`` (exported to a temporary file, gone once loaded) and the
    ONNX operator of each packed Linear."""
    with tempfile.TemporaryDirectory(prefix="slimsearch-onnx-") as tmp:
        path = Path(tmp) / "model.onnx"
        ops = export_onnx(model, path, vocab_size)
        return session(path, threads), ops


def _baseline_session(reference: nn.Module, vocab_size: int, threads: int) -> Any:
    sessions = _BASELINES.setdefault(reference, {})
    if threads not in sessions:
        sessions[threads] = onnx_session(reference, vocab_size, threads)[0]
    return sessions[threads]


def time_sessions(
    cand: Any,
    base: Any | None,
    spec: LatencySpec,
    vocab_size: int,
    shape: tuple[int, int],
    key: str,
    deadline: float = math.inf,
) -> dict[str, Any]:
    """Two ORT sessions timed in alternation at one (batch, sequence) shape, by the protocol."""
    batch, seq = shape
    inputs = latency_inputs(batch, seq, vocab_size)
    run_base = timed(partial(base.run, None, feeds(base, inputs))) if base is not None else None
    result = measure_timers(
        timed(partial(cand.run, None, feeds(cand, inputs))), run_base, spec, key, deadline
    )
    return {"batch_size": batch, "seq_len": seq} | result


def measure_onnx(
    model: nn.Module, spec: LatencySpec, vocab_size: int, reference: nn.Module | None, deadline: float
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Every configured shape timed in ORT; and what ran (runtime version, operators)."""
    import onnxruntime

    cand, ops = onnx_session(model, vocab_size, spec.threads)
    base = None
    if reference is not None:
        base = cand if reference is model else _baseline_session(reference, vocab_size, spec.threads)
    shapes = [
        time_sessions(
            cand, base, spec, vocab_size, shape, "ort-" + quiet_key(*shape, spec.threads, reference), deadline
        )
        for shape in spec.all_shapes()
    ]
    extra = {
        "backend": f"onnxruntime {onnxruntime.__version__}",
        "onnx_ops": operator_counts(ops),
    }
    return shapes, extra


def operator_counts(ops: dict[str, str]) -> dict[str, int]:
    """How many packed Linears each ONNX operator computes."""
    return dict(sorted(Counter(ops.values()).items()))
