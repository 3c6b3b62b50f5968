"""``slimsearch export --format onnx``: a classifier or a causal LM as ONNX (spaces/onnx.py),
checked in ONNX Runtime: accuracy on the study's test split (perplexity on its evaluation
blocks for a causal LM, against the value slimsearch measured; a causal LM is written with its
KV cache, and greedy decoding through it is checked against recomputing the prefix) and
latency of a forward pass against the baseline's own ONNX model there."""

from __future__ import annotations

import math
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from slimsearch.evaluators import LatencySpec
from slimsearch.evaluators.base import ONNX_TASKS
from slimsearch.evaluators.quality import next_token_nll
from slimsearch.search.study_file import StudyError
from slimsearch.spaces.onnx import feeds

ONNX_FILE = "model.onnx"


def check_task(kind: str) -> None:
    if kind not in ONNX_TASKS:
        raise StudyError(
            f"--format onnx writes sequence classifiers and causal LMs here; this study's task is {kind!r}: "
            "export a token-classification model with --format hf"
        )


def accuracy(sess: Any, batches: list[dict[str, Tensor]]) -> float:
    correct = total = 0
    for batch in batches:
        pred = np.asarray(sess.run(None, feeds(sess, batch))[0]).argmax(-1)
        correct += int((pred == batch["labels"].numpy()).sum())
        total += int(batch["labels"].numel())
    return 100.0 * correct / max(total, 1)


def perplexity(sess: Any, batches: list[dict[str, Tensor]]) -> tuple[float, int]:
    """(perplexity, scored tokens) as the perplexity evaluator computes it: the mean next-token
    negative log-likelihood over every position of every evaluation block."""
    nll = 0.0
    count = 0
    for batch in batches:
        ids = batch["input_ids"]
        logits = torch.from_numpy(np.asarray(sess.run(None, feeds(sess, {"input_ids": ids}))[0]))
        block_nll, block_count = next_token_nll(logits, ids)
        nll += block_nll
        count += block_count
    return math.exp(nll / max(count, 1)), count


PROMPT_TOKENS = 32
DECODE_TOKENS = 32


def decode_check(sess: Any, prompt: Tensor) -> dict[str, Any]:
    """Greedy decoding through the graph's KV cache against recomputing the whole sequence
    each step, in the same session: whether the tokens agree, and each one's tokens/s."""
    from slimsearch.spaces.onnx import generate

    start = time.perf_counter()
    cached = generate(sess, prompt, DECODE_TOKENS)
    cached_s = time.perf_counter() - start
    start = time.perf_counter()
    again = generate(sess, prompt, DECODE_TOKENS, kv_cache=False)
    again_s = time.perf_counter() - start
    return {
        "prompt_tokens": int(prompt.shape[1]),
        "tokens": DECODE_TOKENS,
        "agree": sum(a == b for a, b in zip(cached, again, strict=True)),
        "tokens_per_s": DECODE_TOKENS / cached_s,
        "recompute_tokens_per_s": DECODE_TOKENS / again_s,
    }


def _quality(sess: Any, base: Any, batches: list[dict[str, Tensor]], task: str) -> dict[str, Any]:
    if task == "causal-lm":
        value, tokens = perplexity(sess, batches)
        return {"perplexity": value, "baseline_perplexity": perplexity(base, batches)[0], "tokens": tokens}
    return {"accuracy": accuracy(sess, batches), "baseline_accuracy": accuracy(base, batches)}


def write_and_check(
    model: nn.Module,
    baseline: nn.Module,
    out: Path,
    spec: LatencySpec,
    batches: list[dict[str, Tensor]],
    vocab_size: int,
    task: str = "classification",
    measured: Mapping[str, float] | None = None,
) -> dict[str, Any]:
    """Write ``out/model.onnx`` and measure it in ORT: quality (accuracy, or perplexity against
    slimsearch's in ``measured``) and latency vs the baseline's ONNX model."""
    import onnxruntime

    from slimsearch.evaluators.onnx_backend import onnx_session, operator_counts, time_sessions
    from slimsearch.search.log import say
    from slimsearch.spaces.onnx import export_onnx, session

    path = out / ONNX_FILE
    say(f"writing {path.name} and checking it in ONNX Runtime")
    ops = export_onnx(model, path, vocab_size, kv_cache=task == "causal-lm")
    sess = session(path, spec.threads)
    base = onnx_session(baseline, vocab_size, spec.threads)[0]
    timed = time_sessions(sess, base, spec, vocab_size, (spec.batch_size, spec.seq_len), "export-ort")
    report = {
        "file": path.name,
        "bytes": path.stat().st_size,
        "operators": operator_counts(ops),
        "runtime": f"onnxruntime {onnxruntime.__version__}",
        **_quality(sess, base, batches, task),
        "latency_ratio": timed["ratio"],
        "latency_ratio_ci95": list(timed["ratio_ci95"]),
        "latency_ms": timed["median_ms"],
        "baseline_latency_ms": timed["baseline_median_ms"],
        "noisy": bool(timed["noisy"]),
        "shape": [spec.batch_size, spec.seq_len],
    }
    if task == "causal-lm" and batches:
        report["decode"] = decode_check(sess, batches[0]["input_ids"][:1, :PROMPT_TOKENS])
    if "perplexity" in report and measured and "perplexity" in measured:
        report["slimsearch_perplexity"] = measured["perplexity"]
        report["ratio"] = report["perplexity"] / measured["perplexity"]
    return report


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
        f"- Checked in {onnx['runtime']} (CPU): {_quality_line(onnx)}; latency at batch x sequence "
        f"{onnx['shape'][0]} x {onnx['shape'][1]}: {onnx['latency_ms']:.3f} ms vs "
        f"{onnx['baseline_latency_ms']:.3f} ms, ratio {onnx['latency_ratio']:.3f} (95% interval "
        f"{low:.3f}-{high:.3f})" + (" - the machine was noisy." if onnx["noisy"] else "."),
    ]


def _quality_line(onnx: Mapping[str, Any]) -> str:
    if "perplexity" not in onnx:
        return (
            f"accuracy {onnx['accuracy']:.2f} on the test split (the baseline's ONNX model: "
            f"{onnx['baseline_accuracy']:.2f})"
        )
    versus = (
        f" against {onnx['slimsearch_perplexity']:.4g} measured by slimsearch on the same tokens "
        f"({(onnx['ratio'] - 1) * 100:+.2f}%)"
        if "ratio" in onnx
        else ""
    )
    decode = onnx.get("decode")
    cache = (
        f"; the graph carries the KV cache (`past_key_values.N.key/value` in, `present.N.key/value` out, "
        f"with `position_ids`): greedy decoding of {decode['tokens']} tokens after a "
        f"{decode['prompt_tokens']}-token prompt through it agreed with recomputing the prefix on "
        f"{decode['agree']} of "
        f"{decode['tokens']} tokens, at {decode['tokens_per_s']:.1f} tokens/s against "
        f"{decode['recompute_tokens_per_s']:.1f} recomputing (one run, batch 1)"
        if decode
        else ""
    )
    return (
        f"perplexity {onnx['perplexity']:.4g} on {onnx['tokens']} scored tokens{versus} (the baseline's "
        f"ONNX model: {onnx['baseline_perplexity']:.4g}){cache}"
    )
