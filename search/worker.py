"""One trial, end to end, in whatever process runs it: load the baseline (cached per
process), apply the plan, run the evaluators, return plain numbers. Never raises: a
failure comes back as a result with its error and traceback.
"""

from __future__ import annotations

import copy
import math
import os
import socket
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from slimsearch.evaluators import EvalContext, LatencySpec, make_evaluator
from slimsearch.search import models, tasks
from slimsearch.search.study_file import ObjectiveSpec, TaskSpec
from slimsearch.spaces import CompressionPlan, apply_plan


@dataclass(frozen=True)
class TrialJob:
    number: int  # -1 for the baseline measurement
    plan_json: str
    baseline_dir: str
    cache_dir: str
    task: TaskSpec
    objectives: tuple[ObjectiveSpec, ...]
    latency: LatencySpec
    baseline: dict[str, float] = field(default_factory=dict)
    trust_remote_code: bool = False


@dataclass
class TrialResult:
    number: int
    values: dict[str, float] | None
    records: dict[str, Any]
    error: str | None = None
    traceback: str | None = None
    seconds: float = 0.0
    node: str = ""


# Per-process caches: the baseline weights and the tokenized evaluation data do not change
# between trials, so a reused worker loads them once.
_BASELINES: dict[str, tuple[nn.Module, Any]] = {}
_BATCHES: dict[tuple[str, TaskSpec], list[dict[str, Tensor]]] = {}


def _baseline(job: TrialJob) -> tuple[nn.Module, Any]:
    if job.baseline_dir not in _BASELINES:
        _BASELINES[job.baseline_dir] = models.load_baseline(
            Path(job.baseline_dir), job.task.kind, job.trust_remote_code
        )
    return _BASELINES[job.baseline_dir]


def eval_batches(job: TrialJob, tokenizer: Any) -> list[dict[str, Tensor]]:
    key = (job.baseline_dir, job.task)
    if key not in _BATCHES:
        cache = Path(job.cache_dir)
        task = job.task
        if task.kind == "classification":
            test = tasks.classification_splits(task, cache).test
            _BATCHES[key] = tasks.classification_batches(
                tokenizer, test, task.max_length, task.eval_batch_size
            )
        else:
            text = tasks.lm_text(task, cache)
            _BATCHES[key] = tasks.lm_blocks(
                tokenizer, text, task.block_size, task.eval_blocks, task.eval_batch_size
            )
    return _BATCHES[key]


def build_model(job: TrialJob) -> tuple[nn.Module, CompressionPlan]:
    base, _ = _baseline(job)
    plan = CompressionPlan.from_json(job.plan_json)
    model = copy.deepcopy(base)
    apply_plan(model, plan)
    return model.eval(), plan


def run_trial(job: TrialJob) -> TrialResult:
    started = time.monotonic()
    node = socket.gethostname()
    try:
        torch.set_num_threads(job.latency.threads)
        model, plan = build_model(job)
        _, tokenizer = _baseline(job)
        context = EvalContext(
            task=job.task.kind,  # type: ignore[arg-type]
            batches=eval_batches(job, tokenizer),
            vocab_size=len(tokenizer),
            plan=plan,
            latency=job.latency,
            baseline=dict(job.baseline),
        )
        values: dict[str, float] = {}
        for objective in job.objectives:
            evaluator = make_evaluator(objective.ref, dict(objective.options))
            value = float(evaluator.evaluate(model, context))
            if math.isnan(value) or math.isinf(value):
                raise ValueError(f"evaluator {objective.name!r} returned {value}")
            values[objective.name] = value
        context.records["pid"] = os.getpid()
        return TrialResult(job.number, values, context.records, seconds=time.monotonic() - started, node=node)
    except Exception as exc:  # a trial's failure must never end the study
        return TrialResult(
            job.number,
            None,
            {},
            error=f"{type(exc).__name__}: {exc}",
            traceback=traceback.format_exc(),
            seconds=time.monotonic() - started,
            node=node,
        )
