"""Resident memory of a model while it runs, measured in a process of its own.

The model is pickled to a temporary file and loaded by a fresh Python process, which
imports what the model's classes need, reads its resident set size (RSS), loads the model
and runs the workload once (kernels pack their weights on first use, libraries start up);
frees what it can (``gc``, ``malloc_trim``), resets the peak and runs the workload again;
then deletes the model and frees again. ``resident_bytes`` is the peak RSS of that second
run minus the RSS left after the model is gone: the model's weights, kernel layouts,
activations and KV cache, not the libraries' start-up (``runtime_bytes``, the same for
every plan). The workload is the task's: a forward pass at the primary latency shape for
classification, the prompt and ``decode_tokens`` greedy tokens with the KV cache for causal
LMs. Where the kernel cannot reset the peak, the RSS at the end of the second run is used
(``peak_reset: false`` in the record). On a GPU the CUDA allocator's peak is read instead of the
RSS, by the same two runs (``counted_by`` in the record says which). With
``latency.backend: onnxruntime`` the fresh process loads the model's ONNX export (a causal
LM with its KV cache) into an ORT session and runs the same workload there.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import json
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from slimsearch.evaluators.base import Direction, EvalContext, LatencySpec
from slimsearch.evaluators.decode import first_token, greedy
from slimsearch.evaluators.device import model_device, synchronize, to_device
from slimsearch.evaluators.latency import latency_inputs

TIMEOUT_S = 600
CHILD = (
    "import json, sys; from slimsearch.evaluators.memory import child; "
    "print(json.dumps(child(*sys.argv[1:])))"
)


def _status(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status: resident memory is measured on Linux only")


def _settle() -> None:
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):  # not glibc: freed heap may stay counted
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def _reset_peak() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


@torch.no_grad()
def _workload(model: nn.Module, task: str, spec: LatencySpec, vocab_size: int) -> None:
    inputs = to_device(latency_inputs(spec.batch_size, spec.seq_len, vocab_size), model_device(model))
    if task != "causal-lm":
        model(**inputs)
        return
    token, past = first_token(model, inputs["input_ids"])
    greedy(model, token, past, spec.decode_tokens)


def child(path: str, job_json: str) -> dict[str, Any]:
    """In the fresh process: load ``path``, run the workload, return the measured bytes."""
    import importlib

    job = json.loads(job_json)
    if job.get("onnx"):
        return _ort_child(path, job)
    for module in job["modules"]:
        importlib.import_module(module)
    torch.set_num_threads(job["threads"])
    spec = LatencySpec(**job["latency"])
    if job.get("device", "cpu") != "cpu":
        return _gpu_child(path, job, spec)
    _settle()
    before = _status("VmRSS")
    model = torch.load(path, weights_only=False).eval()
    _settle()
    loaded = _status("VmRSS") - before
    _workload(model, job["task"], spec, job["vocab_size"])
    _settle()
    peak_reset = _reset_peak()
    _workload(model, job["task"], spec, job["vocab_size"])
    running = _status("VmRSS")
    peak = _status("VmHWM") if peak_reset else running
    del model
    _settle()
    floor = _status("VmRSS")  # the process with every library the workload woke up, no model
    return {
        "resident_bytes": peak - floor,
        "process_bytes": peak - before,
        "loaded_bytes": loaded,
        "runtime_bytes": floor - before,
        "peak_reset": peak_reset,
        "counted_by": "resident set size",
    }


def _ort_workload(sess: Any, task: str, spec: LatencySpec, vocab_size: int) -> None:
    from slimsearch.spaces.onnx import feeds, prefill, step

    inputs = latency_inputs(spec.batch_size, spec.seq_len, vocab_size)
    if task != "causal-lm":
        sess.run(None, feeds(sess, inputs))
        return
    token, past = prefill(sess, inputs["input_ids"].numpy())
    for seen in range(spec.seq_len, spec.seq_len + spec.decode_tokens):
        token, past = step(sess, token, past, seen)


def _ort_child(path: str, job: dict[str, Any]) -> dict[str, Any]:
    """The same two runs on an ONNX Runtime session of the exported file."""
    import onnxruntime

    from slimsearch.spaces.onnx import session

    spec = LatencySpec(**job["latency"])
    _settle()
    before = _status("VmRSS")
    sess = session(Path(path), job["threads"])
    _settle()
    loaded = _status("VmRSS") - before
    _ort_workload(sess, job["task"], spec, job["vocab_size"])
    _settle()
    peak_reset = _reset_peak()
    _ort_workload(sess, job["task"], spec, job["vocab_size"])
    running = _status("VmRSS")
    peak = _status("VmHWM") if peak_reset else running
    del sess
    _settle()
    floor = _status("VmRSS")
    return {
        "resident_bytes": peak - floor,
        "process_bytes": peak - before,
        "loaded_bytes": loaded,
        "runtime_bytes": floor - before,
        "peak_reset": peak_reset,
        "counted_by": "resident set size",
        "runtime": f"onnxruntime {onnxruntime.__version__}",
    }


def _gpu_child(path: str, job: dict[str, Any], spec: LatencySpec) -> dict[str, Any]:
    """On a GPU the allocator counts the bytes: its peak over the second run of the workload
    (after a reset), less what stays allocated once the model is deleted."""
    device = torch.device(job["device"])
    torch.cuda.init()
    before = torch.cuda.memory_allocated(device)
    model = torch.load(path, map_location=device, weights_only=False).eval()
    loaded = torch.cuda.memory_allocated(device) - before
    _workload(model, job["task"], spec, job["vocab_size"])
    synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    _workload(model, job["task"], spec, job["vocab_size"])
    synchronize(device)
    peak = torch.cuda.max_memory_allocated(device)
    reserved = torch.cuda.max_memory_reserved(device)
    del model
    gc.collect()
    torch.cuda.empty_cache()
    floor = torch.cuda.memory_allocated(device)
    return {
        "resident_bytes": peak - floor,
        "process_bytes": peak - before,
        "loaded_bytes": loaded,
        "runtime_bytes": floor - before,
        "reserved_bytes": reserved,
        "peak_reset": True,
        "counted_by": "cuda allocator",
    }


def _job(model: nn.Module, context: EvalContext) -> dict[str, Any]:
    spec = context.latency
    return {
        "device": str(model_device(model)),
        "modules": sorted({type(m).__module__ for m in model.modules()}),
        "threads": spec.threads,
        "task": context.task,
        "vocab_size": context.vocab_size,
        "latency": {
            "batch_size": spec.batch_size,
            "seq_len": spec.seq_len,
            "decode_tokens": spec.decode_tokens,
        },
    }


def measure_resident(model: nn.Module, context: EvalContext) -> dict[str, Any]:
    """Run the measurement in a fresh process; the record it returns (see the module doc)."""
    job = _job(model, context)
    with tempfile.TemporaryDirectory(prefix="slimsearch-memory-") as tmp:
        if context.latency.backend == "onnxruntime":
            from slimsearch.evaluators.onnx_backend import onnx_file

            path = onnx_file(model, context.vocab_size)
            job["onnx"] = True
        else:
            path = Path(tmp) / "model.pt"
            torch.save(model, path)
        proc = subprocess.run(
            [sys.executable, "-c", CHILD, str(path), json.dumps(job)],
            capture_output=True,
            text=True,
            timeout=TIMEOUT_S,
        )
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-5:]
        raise RuntimeError("the memory measurement's process failed: " + " | ".join(tail))
    record: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    record["workload"] = workload_text(context)
    return record


def workload_text(context: EvalContext) -> str:
    spec = context.latency
    if context.task == "causal-lm":
        return f"prompt {spec.batch_size}x{spec.seq_len} + {spec.decode_tokens} tokens, KV cache"
    return f"forward {spec.batch_size}x{spec.seq_len}"


class ResidentBytes:
    """Bytes the model holds resident while it runs its task's workload (peak RSS of a fresh
    process, minus the process before the model was loaded)."""

    name = "memory_bytes"
    compare = "ratio"
    direction: Direction = "minimize"
    repeatable = False  # the allocator's pages move by a few per cent from run to run

    def evaluate(self, model: nn.Module, context: EvalContext) -> float:
        if "memory" not in context.records:
            context.records["memory"] = measure_resident(model, context)
        return float(context.records["memory"]["resident_bytes"])
