"""``slimsearch export --format onnx``: a classifier as ONNX (spaces/onnx.py), checked in
ONNX Runtime: accuracy on the study's test split and latency against the baseline's own
ONNX model there."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from torch import Tensor, nn

from slimsearch.evaluators import LatencySpec
from slimsearch.search.study_file import StudyError
from slimsearch.spaces.onnx import feeds

ONNX_FILE = "model.onnx"


def check_task(kind: str) -> None:
    if kind != "classification":
        raise StudyError(
            f"--format onnx writes sequence classifiers (encoders) here; this study's task is {kind!r}: "
            "export a causal LM with --format gguf, a token-classification model with --format hf"
        )


def accuracy(sess: Any, batches: list[dict[str, Tensor]]) -> float:
    correct = total = 0
    for batch in batches:
        pred = np.asarray(sess.run(None, feeds(sess, batch))[0]).argmax(-1)
        correct += int((pred == batch["labels"].numpy()).sum())
        total += int(batch["labels"].numel())
    return 100.0 * correct / max(total, 1)


def write_and_check(
    model: nn.Module,
    baseline: nn.Module,
    out: Path,
    spec: LatencySpec,
    batches: list[dict[str, Tensor]],
    vocab_size: int,
) -> dict[str, Any]:
    """Write ``out/model.onnx`` and measure it in ORT (accuracy, latency vs the baseline)."""
    import onnxruntime

    from slimsearch.evaluators.onnx_backend import onnx_session, operator_counts, time_sessions
    from slimsearch.search.log import say
    from slimsearch.spaces.onnx import export_onnx, session

    path = out / ONNX_FILE
    say(f"writing {path.name} and checking it in ONNX Runtime")
    ops = export_onnx(model, path, vocab_size)
    sess = session(path, spec.threads)
    base = onnx_session(baseline, vocab_size, spec.threads)[0]
    timed = time_sessions(sess, base, spec, vocab_size, (spec.batch_size, spec.seq_len), "export-ort")
    return {
        "file": path.name,
        "bytes": path.stat().st_size,
        "operators": operator_counts(ops),
        "runtime": f"onnxruntime {onnxruntime.__version__}",
        "accuracy": accuracy(sess, batches),
        "baseline_accuracy": accuracy(base, batches),
        "latency_ratio": timed["ratio"],
        "latency_ratio_ci95": list(timed["ratio_ci95"]),
        "latency_ms": timed["median_ms"],
        "baseline_latency_ms": timed["baseline_median_ms"],
        "noisy": bool(timed["noisy"]),
        "shape": [spec.batch_size, spec.seq_len],
    }


def card(onnx: dict[str, Any] | None) -> list[str]:
    if onnx is None:
        return []
    ops = ", ".join(f"{n} x {op}" for op, n in onnx["operators"].items())
    low, high = onnx["latency_ratio_ci95"]
    return [
        "",
        "## ONNX (ONNX Runtime)",
        "",
        f"- `{onnx['file']}`: {onnx['bytes']} bytes; packed Linears as {ops} (stored codes as they are; "
        "MatMul where ORT has no kernel for the format, on the same fp32 values).",
        f"- Checked in {onnx['runtime']} (CPU): accuracy {onnx['accuracy']:.2f} on the test split "
        f"(the baseline's ONNX model: {onnx['baseline_accuracy']:.2f}); latency at batch x sequence "
        f"{onnx['shape'][0]} x {onnx['shape'][1]}: {onnx['latency_ms']:.3f} ms vs "
        f"{onnx['baseline_latency_ms']:.3f} ms, ratio {onnx['latency_ratio']:.3f} (95% interval "
        f"{low:.3f}-{high:.3f})" + (" - the machine was noisy." if onnx["noisy"] else "."),
    ]
