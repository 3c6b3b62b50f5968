"""Latency in ONNX Runtime (``latency.backend: onnxruntime``): the candidate and the baseline
are each exported to ONNX with the operators of their stored formats (spaces/onnx.py) and
timed in ONNX Runtime CPU sessions by the same protocol as in torch (warm-up, interleaved
passes, bootstrap interval, noise gates), so a classifier's or a causal LM's front shows
the speed a user gets when deploying with ORT. A causal LM is exported with its KV cache:
a forward pass is its prompt on an empty cache, and ``decode_timers`` time generation
through the cache (evaluators/decode.py). A model's session is made once (the baseline's
once per process), so a trial's forward pass, generation and memory share one export.
"""

from __future__ import annotations

import math
import tempfile
import time
import weakref
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
from torch import nn

from slimsearch.evaluators.base import LatencySpec
from slimsearch.evaluators.latency import latency_inputs, measure_timers, quiet_key, timed
from slimsearch.spaces.onnx import export_onnx, feeds, is_causal, prefill, session, step


@dataclass
class _Export:
    folder: tempfile.TemporaryDirectory[str]  # removed with the entry
    ops: dict[str, str]
    sessions: dict[int, Any] = field(default_factory=dict)

    @property
    def path(self) -> Path:
        return Path(self.folder.name) / "model.onnx"


# A model's export and its sessions by thread count: the baseline's for the process, a
# trial's while its model lives (forward pass, generation and memory use one export).
_EXPORTS: weakref.WeakKeyDictionary[nn.Module, _Export] = weakref.WeakKeyDictionary()


def _export(model: nn.Module, vocab_size: int) -> _Export:
    if model not in _EXPORTS:
        folder = tempfile.TemporaryDirectory(prefix="slimsearch-onnx-")
        ops = export_onnx(model, Path(folder.name) / "model.onnx", vocab_size, kv_cache=is_causal(model))
        _EXPORTS[model] = _Export(folder, ops)
    return _EXPORTS[model]


def onnx_file(model: nn.Module, vocab_size: int) -> Path:
    """``model`` exported to ONNX (a causal LM with its KV cache), once per model; the file
    lives while the model does."""
    return _export(model, vocab_size).path


def onnx_session(model: nn.Module, vocab_size: int, threads: int) -> tuple[Any, dict[str, str]]:
    """An ORT session of ``model``'s export (``onnx_file``) and the ONNX operator of each
    packed Linear; made once per model and thread count."""
    export = _export(model, vocab_size)
    if threads not in export.sessions:
        export.sessions[threads] = session(export.path, threads)
    return export.sessions[threads], export.ops


def sessions(
    model: nn.Module, reference: nn.Module | None, vocab_size: int, threads: int
) -> tuple[Any, Any | None, dict[str, str]]:
    """The candidate's session, the baseline's (or None) and the candidate's operators."""
    cand, ops = onnx_session(model, vocab_size, threads)
    base = None if reference is None else onnx_session(reference, vocab_size, threads)[0]
    return cand, base, ops


def decode_timers(
    sess: Any, ids: np.ndarray, steps: int, tokens: list[int]
) -> tuple[Callable[[], float], Callable[[], float]]:
    """Generation in ORT through the graph's KV cache: a timed prompt pass (ms), and a pass
    of ``steps`` greedy tokens after an untimed prompt (ms per token). ``tokens`` is left
    holding the last decode pass's tokens (of the first row)."""

    def decode() -> float:
        token, past = prefill(sess, ids)
        first = int(token[0, 0])
        after = []
        start = time.perf_counter()
        for seen in range(ids.shape[1], ids.shape[1] + steps):
            token, past = step(sess, token, past, seen)
            after.append(int(token[0, 0]))
        ms = (time.perf_counter() - start) * 1000.0 / steps
        tokens[:] = [first, *after]
        return ms

    return timed(partial(prefill, sess, ids)), decode


def backend_environment(ops: dict[str, str]) -> dict[str, Any]:
    """What ran: the runtime's version and how many packed Linears each operator computes."""
    import onnxruntime

    return {"backend": f"onnxruntime {onnxruntime.__version__}", "onnx_ops": operator_counts(ops)}


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
    cand, base, ops = sessions(model, reference, vocab_size, spec.threads)
    shapes = [
        time_sessions(
            cand, base, spec, vocab_size, shape, "ort-" + quiet_key(*shape, spec.threads, reference), deadline
        )
        for shape in spec.all_shapes()
    ]
    return shapes, backend_environment(ops)


def operator_counts(ops: dict[str, str]) -> dict[str, int]:
    """How many packed Linears each ONNX operator computes."""
    return dict(sorted(Counter(ops.values()).items()))
