"""What a chat user feels: time to first token and decode speed of a causal LM.

Greedy generation at ``latency.batch_size`` (1 by default) from a fixed prompt of
``latency.seq_len`` tokens (the start of the evaluation text), KV cache on. Two timed
passes, each measured by the latency protocol (warm-up, interleaved with the baseline,
bootstrap interval, noise gates, the shared ``time_budget``):
- time to first token: the prompt's forward pass and the first token's choice;
- decode: ``latency.decode_tokens`` more tokens, one forward pass each on the growing cache,
  reported per token (the prompt is run again, untimed, before each pass).
With ``latency.backend: onnxruntime`` both passes run in ONNX Runtime, on the candidate's and
the baseline's graphs exported with their KV cache (evaluators/onnx_backend.py).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import replace
from functools import partial
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from slimsearch.evaluators.base import Direction, EvalContext, LatencySpec
from slimsearch.evaluators.device import model_device, synchronize
from slimsearch.evaluators.latency import (
    environment,
    latency_inputs,
    measure_timers,
    quiet_key,
    require_reference,
    timed,
)

CAUSAL_ONLY = ("causal-lm",)


def first_token(model: nn.Module, ids: Tensor) -> tuple[Tensor, Any]:
    """The prompt's forward pass: the greedy first token and the KV cache."""
    out = model(input_ids=ids, use_cache=True)
    return out.logits[:, -1:].argmax(-1), out.past_key_values


def greedy(model: nn.Module, token: Tensor, past: Any, steps: int) -> list[int]:
    """``steps`` greedy tokens after ``token``, one forward pass each on the cache ``past``
    (the first row's tokens)."""
    tokens = []
    for _ in range(steps):
        out = model(input_ids=token, past_key_values=past, use_cache=True)
        token, past = out.logits[:, -1:].argmax(-1), out.past_key_values
        tokens.append(int(token[0, 0]))
    return tokens


def _decode_timer(model: nn.Module, ids: Tensor, steps: int, tokens: list[int]) -> Callable[[], float]:
    """Each call: the prompt untimed, then ``steps`` greedy tokens timed; ms per token.
    ``tokens`` is left holding the last call's generated tokens (of the first row)."""

    def once() -> float:
        token, past = first_token(model, ids)
        synchronize(model_device(model))  # the untimed prompt must not run into the clock
        start = time.perf_counter()
        after = greedy(model, token, past, steps)
        ms = (time.perf_counter() - start) * 1000.0 / steps
        tokens[:] = [int(token[0, 0]), *after]
        return ms

    return once


def prompt_ids(spec: LatencySpec, vocab_size: int, batches: list[dict[str, Tensor]]) -> tuple[Tensor, str]:
    """The prompt: the first ``seq_len`` tokens of the evaluation text (so the generated tokens
    mean something), or random tokens where there is not enough text."""
    if batches and "input_ids" in batches[0] and batches[0]["input_ids"].shape[-1] >= spec.seq_len:
        row = batches[0]["input_ids"][:1, : spec.seq_len]
        return row.expand(spec.batch_size, -1).contiguous(), "evaluation text"
    return latency_inputs(spec.batch_size, spec.seq_len, vocab_size)["input_ids"], "random tokens"


Timers = tuple[Callable[[], float], Callable[[], float]]  # prompt pass (ms), decode (ms per token)


def _torch_timers(model: nn.Module, ids: Tensor, steps: int, tokens: list[int]) -> Timers:
    return timed(partial(first_token, model, ids), model_device(model)), _decode_timer(
        model, ids, steps, tokens
    )


@torch.no_grad()
def measure_decode(
    model: nn.Module,
    spec: LatencySpec,
    vocab_size: int,
    reference: nn.Module | None = None,
    batches: list[dict[str, Tensor]] | None = None,
) -> dict[str, Any]:
    """Both passes by the latency protocol, within one ``spec.time_budget``; the prompt is
    taken from ``batches`` (causal-LM evaluation blocks) where they are long enough."""
    torch.set_num_threads(spec.threads)
    deadline = time.monotonic() + spec.time_budget if spec.time_budget > 0 else math.inf
    batch, seq = spec.batch_size, spec.seq_len
    ids, prompt = prompt_ids(spec, vocab_size, batches or [])
    device = model_device(model)
    ids = ids.to(device)
    key = quiet_key(batch, seq, spec.threads, reference)
    steps = spec.decode_tokens
    cand_tokens: list[int] = []
    base_tokens: list[int] = []
    env = environment(spec, device)
    if spec.backend == "onnxruntime":
        from slimsearch.evaluators.onnx_backend import backend_environment, decode_timers, sessions

        cand_sess, base_sess, ops = sessions(model, reference, vocab_size, spec.threads)
        run = decode_timers(cand_sess, ids.numpy(), steps, cand_tokens)
        base = decode_timers(base_sess, ids.numpy(), steps, base_tokens) if base_sess is not None else None
        env |= backend_environment(ops)
        key = "ort-" + key
    else:
        run = _torch_timers(model, ids, steps, cand_tokens)
        base = _torch_timers(reference, ids, steps, base_tokens) if reference is not None else None
    ttft = measure_timers(run[0], base[0] if base else None, spec, "ttft-" + key, deadline)
    # One decode pass is ``steps`` forward passes: blocks of at most 5, one warm-up pass.
    long_passes = replace(spec, repeats=min(spec.repeats, 5), warmup=min(spec.warmup, 1))
    decode = measure_timers(run[1], base[1] if base else None, long_passes, f"decode{steps}-" + key, deadline)
    record: dict[str, Any] = {
        "batch_size": batch,
        "prompt_tokens": seq,
        "prompt": prompt,
        "decode_tokens": steps,
        "ttft": ttft,
        "decode": decode,
        "ttft_ms": ttft["median_ms"],
        "tokens_per_s": batch * 1000.0 / decode["median_ms"],
        "environment": env,
        "noisy": bool(ttft["noisy"] or decode["noisy"]),
    }
    if reference is not None:
        record["ttft_ratio"] = ttft["ratio"]
        record["speedup"] = 1.0 / decode["ratio"]
        low, high = decode["ratio_ci95"]
        record["speedup_ci95"] = (1.0 / high, 1.0 / low)
        record["same_tokens_as_baseline"] = sum(a == b for a, b in zip(cand_tokens, base_tokens, strict=True))
    return record


def decode_record(model: nn.Module, context: EvalContext) -> dict[str, Any]:
    """The decode record, measured once per trial and kept in ``context.records``."""
    if context.task not in CAUSAL_ONLY:
        raise ValueError(f"decode speed needs a causal LM; this task is {context.task!r}")
    if "decode" not in context.records:
        spec = context.latency
        context.records["decode"] = measure_decode(
            model, spec, context.vocab_size, context.reference, context.batches
        )
    record: dict[str, Any] = context.records["decode"]
    return record


class _FromDecode:
    """An objective read from the trial's one decode measurement (``decode_record``)."""

    field: ClassVar[str]
    exclusive = True  # timing: the machine to itself
    tasks = CAUSAL_ONLY

    def evaluate(self, model: nn.Module, context: EvalContext) -> float:
        return float(decode_record(model, context)[self.field])


class TimeToFirstToken(_FromDecode):
    """Milliseconds from the prompt to the first generated token (median)."""

    name = "ttft_ms"
    compare = "ratio"
    direction: Direction = "minimize"
    field = "ttft_ms"


class DecodeTokensPerS(_FromDecode):
    """Generated tokens per second after the first, with the KV cache (median pass)."""

    name = "decode_tokens_per_s"
    compare = "ratio"
    direction: Direction = "maximize"
    field = "tokens_per_s"


class DecodeSpeedup(_FromDecode):
    """Decode tokens/s relative to the uncompressed baseline, timed interleaved in the same
    process: robust to a machine that is uniformly slower or faster."""

    name = "decode_speedup"
    compare = "difference"
    direction: Direction = "maximize"
    field = "speedup"

    def evaluate(self, model: nn.Module, context: EvalContext) -> float:
        require_reference(context, self.name)
        return super().evaluate(model, context)
