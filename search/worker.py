"""One trial, end to end, in whatever process runs it: load the baseline (cached per
process), apply the plan, run the evaluators, return plain numbers. Never raises: a
failure comes back as a result with its error and traceback.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import os
import signal
import socket
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from slimsearch.evaluators import Accuracy, EvalContext, LatencySpec, make_evaluator
from slimsearch.evaluators.device import check_device
from slimsearch.evaluators.latency import remember_quiet
from slimsearch.search import models
from slimsearch.search.data import TaskData, calibration_count
from slimsearch.search.locks import machine_lock
from slimsearch.search.log import say
from slimsearch.search.study_file import ObjectiveSpec, TaskSpec
from slimsearch.spaces import CompressionPlan, compress, state_digest
from slimsearch.spaces.apply import needs
from slimsearch.spaces.methods import registry
from slimsearch.spaces.methods.calibration import STATS_VERSION, CalibrationStats, capture
from slimsearch.spaces.methods.distill import DistillRecipe, TeacherCache, distill
from slimsearch.spaces.store import LayerStore


@dataclass(frozen=True)
class ScreenSpec:
    """Low-fidelity screening: score a subset first; reject the trial when even the
    confidence bound of its quality is past the constraint, paired with the baseline on the
    same data. Classification: a random ``examples`` rows, the upper bound of the accuracy
    against ``max_drop``. Causal LM (``max_ratio`` set): the first ``blocks`` evaluation
    blocks, the lower bound of the perplexity ratio against ``max_ratio``."""

    max_drop: float  # accuracy points the trial may lose against the baseline
    examples: int = 200
    z: float = 2.0  # ~97.7% one-sided: reject only when clearly past
    max_ratio: float | None = None  # causal LM: the perplexity ratio allowed
    blocks: int = 0  # causal LM: evaluation blocks scored first


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
    timeout_s: float | None = None  # enforced here only in-process; Ray tasks are cancelled
    screen: ScreenSpec | None = None
    quiet_ms: dict[str, float] = field(default_factory=dict)  # the drift gate's references
    methods: tuple[str, ...] = ()  # the study's own compression methods, imported where the job runs
    # Assemble the model from stored (layer, settings) results, keeping this many bytes at most.
    layer_store_bytes: int | None = None
    # Where the model is evaluated and timed; it is compressed (and distilled) on the CPU first.
    device: str = "cpu"


@dataclass
class TrialResult:
    number: int
    values: dict[str, float] | None
    records: dict[str, Any]
    error: str | None = None
    traceback: str | None = None
    seconds: float = 0.0
    node: str = ""
    pruned: bool = False  # rejected by screening: not an error, not a full measurement


# Per-process caches: the baseline weights and the task's tokenized data do not change
# between trials, so a reused worker loads them once.
_BASELINES: dict[str, tuple[nn.Module, Any]] = {}
_DATA: dict[tuple[str, str, TaskSpec], TaskData] = {}
# The baseline's accuracy on each screening subset, scored once.
_SCREEN_BASELINE: dict[tuple[str, TaskSpec, int], float] = {}
# The baseline's next-token log-probabilities on each causal-LM screening subset, once.
_SCREEN_LM_BASELINE: dict[tuple[str, TaskSpec, int], Tensor] = {}


def cached_baseline(job: TrialJob) -> tuple[nn.Module, Any]:
    """The baseline model and tokenizer, loaded once per process."""
    if job.baseline_dir not in _BASELINES:
        _BASELINES[job.baseline_dir] = models.load_baseline(
            Path(job.baseline_dir), job.task.kind, job.trust_remote_code
        )
    return _BASELINES[job.baseline_dir]


_ON_DEVICE: dict[tuple[str, str], nn.Module] = {}


def device_baseline(job: TrialJob) -> nn.Module:
    """The baseline on the job's device, for evaluation and interleaved timing: the CPU
    baseline itself on the CPU, else a copy moved there once per process (trials are built
    from the CPU copy)."""
    base, _ = cached_baseline(job)
    if job.device == "cpu":
        return base
    key = (job.baseline_dir, job.device)
    if key not in _ON_DEVICE:
        check_device(job.device)
        _ON_DEVICE[key] = copy.deepcopy(base).to(job.device).eval()
    return _ON_DEVICE[key]


def task_data(baseline_dir: str, cache_dir: str, task: TaskSpec, tokenizer: Any) -> TaskData:
    """The task's data for this baseline's tokenizer, one object per process."""
    key = (baseline_dir, cache_dir, task)
    if key not in _DATA:
        _DATA[key] = TaskData(task, Path(cache_dir), tokenizer)
    return _DATA[key]


def job_data(job: TrialJob) -> TaskData:
    return task_data(job.baseline_dir, job.cache_dir, job.task, cached_baseline(job)[1])


def wilson_upper(correct: int, total: int, z: float) -> float:
    """Upper Wilson score bound of a binomial proportion, in percent."""
    if total == 0:
        return 100.0
    p = correct / total
    centre = p + z * z / (2 * total)
    spread = z * math.sqrt(p * (1 - p) / total + z * z / (4 * total * total))
    return 100.0 * (centre + spread) / (1 + z * z / total)


def screen_blocks(data: TaskData, blocks: int) -> Tensor:
    """The first ``blocks`` blocks of the evaluation text, as one [blocks, block_size] tensor."""
    return torch.cat([b["input_ids"] for b in data.test_batches()])[:blocks]


@torch.no_grad()
def lm_screen_record(job: TrialJob, model: nn.Module, ids: Tensor) -> dict[str, Any]:
    """The trial against the baseline on ``ids``: the KL divergence of its next-token
    distribution from the baseline's (mean per token), and its perplexity ratio with a lower
    confidence bound from the paired per-token NLL differences."""
    assert job.screen is not None and job.screen.max_ratio is not None
    key = (job.baseline_dir, job.task, int(ids.shape[0]))
    with machine_lock(job.cache_dir, exclusive=False):
        if key not in _SCREEN_LM_BASELINE:
            reference = device_baseline(job)
            logits = reference(input_ids=ids.to(job.device)).logits[:, :-1].float().cpu()
            _SCREEN_LM_BASELINE[key] = F.log_softmax(logits, dim=-1)
        logits = model(input_ids=ids.to(job.device)).logits[:, :-1].float().cpu()
        ours = F.log_softmax(logits, dim=-1)
    base = _SCREEN_LM_BASELINE[key]
    target = ids[:, 1:].unsqueeze(-1)
    delta = (base.gather(-1, target) - ours.gather(-1, target)).flatten().double()  # our NLL - base's
    kl = float((base.exp() * (base - ours)).sum(-1).mean())
    n = delta.numel()
    mean = float(delta.mean())
    se = float(delta.std()) / math.sqrt(n) if n > 1 else math.inf
    return {
        "kl": kl,
        "perplexity_ratio": math.exp(mean),
        "lower_bound": math.exp(mean - job.screen.z * se) if math.isfinite(se) else 0.0,
        "threshold": job.screen.max_ratio,
        "tokens": n,
    }


def _screen(job: TrialJob, model: nn.Module, context: EvalContext) -> dict[str, Any] | None:
    """Screening record when the trial is rejected, else None (and a record of the pass)."""
    if job.screen is not None and job.screen.max_ratio is not None and job.task.kind == "causal-lm":
        lm = lm_screen_record(job, model, screen_blocks(job_data(job), job.screen.blocks))
        context.records["screen"] = lm
        return lm if lm["lower_bound"] > lm["threshold"] else None
    if job.screen is None or job.task.kind != "classification":
        return None
    batches = job_data(job).screen_batches(job.screen.examples)
    # Paired with the baseline on the same rows: a subset that happens to be hard (on
    # MiniLM's the baseline scores 75.5% against 80.1% on the full split) must not make the
    # screen stricter than the constraint.
    subset = replace(context, batches=batches, records={})
    key = (job.baseline_dir, job.task, job.screen.examples)
    with machine_lock(job.cache_dir, exclusive=False):
        if key not in _SCREEN_BASELINE:
            _SCREEN_BASELINE[key] = Accuracy().evaluate(device_baseline(job), subset)
        accuracy = Accuracy().evaluate(model, subset)
    baseline_accuracy = _SCREEN_BASELINE[key]
    total = sum(int(b["labels"].numel()) for b in batches)
    upper = wilson_upper(round(accuracy * total / 100), total, job.screen.z)
    record = {
        "accuracy": accuracy,
        "examples": total,
        "upper_bound": upper,
        "baseline_accuracy": baseline_accuracy,
        "threshold": baseline_accuracy - job.screen.max_drop,
    }
    context.records["screen"] = record
    return record if upper < record["threshold"] else None


_STATS: dict[str, CalibrationStats] = {}
HESSIAN_TOKENS = 4096


def calibration_stats(
    base: nn.Module, baseline_dir: str, data: TaskData, needs: frozenset[str]
) -> CalibrationStats:
    """The baseline's calibration statistics on the calibration batch: captured once, kept in
    memory and on disk under the cache folder (keyed by baseline, task, rows and kinds), so
    trials, sensitivity and export all read the same numbers."""
    count = calibration_count(data.task)
    ident = json.dumps([baseline_dir, data.task.identity(), count, sorted(needs), STATS_VERSION], default=str)
    path = _cache_path(data.cache, "calibration", ident)

    def compute() -> CalibrationStats:
        advice = few_calibration_tokens(data.task, needs)
        if advice:
            say(f"warning: {advice}")
        return capture(base, [data.calibration_batch()], needs, progress=say)

    stats: CalibrationStats = _disk_cached(_STATS, path, CalibrationStats.load, compute)
    return stats


def few_calibration_tokens(task: TaskSpec, needs: frozenset[str]) -> str | None:
    """Advice when Hessian-based methods (GPTQ, AWQ scaling, SparseGPT, whitened low-rank)
    would calibrate a causal LM on fewer tokens than they need to estimate its Hessians."""
    if task.kind != "causal-lm" or "hessian" not in needs:
        return None
    count = calibration_count(task)
    if count * task.block_size >= HESSIAN_TOKENS:
        return None
    return (
        f"the Hessian-based methods calibrate on {count} blocks of {task.block_size} tokens "
        f"({count * task.block_size} tokens); they do better on {HESSIAN_TOKENS} or more: raise "
        "task.calibration_rows (the SmolLM2 method study uses 64 blocks of 256)"
    )


def _cache_path(cache: Path, kind: str, ident: str) -> Path:
    key = hashlib.sha256(ident.encode()).hexdigest()[:16]
    return cache / kind / f"{key}.safetensors"


def _disk_cached(
    memo: dict[str, Any], path: Path, load: Callable[[Path], Any], compute: Callable[[], Any]
) -> Any:
    """What ``path`` holds: kept in ``memo`` for this process, read from disk when another
    worker or an earlier run wrote it, else computed and written (whole or not at all, even
    with workers racing)."""
    key = str(path)
    if key not in memo:
        if path.is_file():
            memo[key] = load(path)
        else:
            memo[key] = compute()
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(f".{os.getpid()}.tmp")
            memo[key].save(tmp)
            tmp.replace(path)
    return memo[key]


_TEACHERS: dict[str, TeacherCache] = {}


def teacher_cache(
    job: TrialJob, teacher: nn.Module, batches: list[dict[str, Tensor]], kind: str
) -> TeacherCache:
    """The teacher's outputs on the distillation batches: computed once, kept in memory and on
    disk under the cache folder so other workers and later runs reuse them."""
    ident = json.dumps(
        [job.baseline_dir, job.task.identity(), kind, len(batches), batches[0]["input_ids"].shape[0]]
    )
    path = _cache_path(Path(job.cache_dir), "teacher", ident)
    cache: TeacherCache = _disk_cached(
        _TEACHERS,
        path,
        TeacherCache.load,
        lambda: TeacherCache.compute(teacher, batches, kind, job.task.kind),
    )
    return cache


def _distill(job: TrialJob, model: nn.Module, plan: CompressionPlan, context: EvalContext) -> None:
    if not plan.distill:
        return
    recipe = DistillRecipe.from_dict(plan.distill)
    if recipe.is_off:
        return
    teacher, _ = cached_baseline(job)
    batches = job_data(job).train_batches(recipe.batch_size)
    with machine_lock(job.cache_dir, exclusive=False):
        cache = teacher_cache(job, teacher, batches, recipe.kind)
        context.records["distill"] = distill(model, cache, batches, recipe, job.task.kind)


def build_model(
    job: TrialJob, selection: Mapping[str, str] | None = None
) -> tuple[nn.Module, CompressionPlan]:
    """The trial's compressed model and its plan as applied (with the heads and neurons that
    structured pruning kept: ``selection``, when given, decides them instead)."""
    for method in job.methods:
        registry.resolve(method)  # a worker process may not have imported the study's methods
    base, _ = cached_baseline(job)
    plan = CompressionPlan.from_json(job.plan_json)
    if selection:
        plan = replace(plan, selection=dict(selection))
    model = copy.deepcopy(base)
    wanted = needs(plan)
    stats = calibration_stats(base, job.baseline_dir, job_data(job), wanted) if wanted else None
    store = layer_store(job) if job.layer_store_bytes else None
    applied = compress(model, plan, stats=stats, store=store)
    return model.eval(), applied


_STORES: dict[str, LayerStore] = {}


def layer_store(job: TrialJob) -> LayerStore:
    """This worker's handle on the layer store under the cache folder (shared by workers)."""
    folder = str(Path(job.cache_dir) / "layers")
    if folder not in _STORES:
        _STORES[folder] = LayerStore(folder, job.layer_store_bytes)
    return _STORES[folder]


def measured_model(
    job: TrialJob, selection: Mapping[str, str] | None = None
) -> tuple[nn.Module, CompressionPlan, dict[str, Any]]:
    """The model a trial measures: compressed, then distilled when its plan says so. With
    its plan as applied, and records: the distillation's, and what an export checks its
    rebuild against (the units structured pruning kept, the digest of the weights). A trial
    and an export both build it here, so they build it the same way."""
    model, plan = build_model(job, selection)
    context = EvalContext(task=job.task.kind, batches=[], vocab_size=0, plan=plan)  # type: ignore[arg-type]
    _distill(job, model, plan, context)
    if plan.selection:
        context.records["selection"] = dict(plan.selection)
    context.records["state_sha256"] = state_digest(model)
    return model.eval(), plan, context.records


class TrialTimeout(Exception):
    pass


@contextmanager
def _deadline(seconds: float | None) -> Iterator[None]:
    """Raise TrialTimeout after ``seconds`` (main thread only: used by the in-process executor)."""
    if not seconds or threading.current_thread() is not threading.main_thread():
        yield
        return

    def expire(signum: int, frame: object) -> None:
        raise TrialTimeout(f"trial exceeded its timeout of {seconds:g}s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def node_name() -> str:
    """The Ray node id when running under Ray (several nodes can share a host), else the host."""
    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized():
        return str(ray.get_runtime_context().get_node_id())
    return socket.gethostname()


def exclusive(evaluator: object) -> bool:
    """Whether an evaluator needs the machine to itself while it runs (timing does)."""
    return bool(getattr(evaluator, "exclusive", False))


def is_timing(objective: ObjectiveSpec) -> bool:
    return exclusive(make_evaluator(objective.ref, dict(objective.options)))


def timing_objectives(objectives: tuple[ObjectiveSpec, ...]) -> tuple[ObjectiveSpec, ...]:
    return tuple(o for o in objectives if is_timing(o))


def varying_objectives(objectives: tuple[ObjectiveSpec, ...]) -> tuple[ObjectiveSpec, ...]:
    """Objectives whose value moves from run to run of the same model: timing, and any
    evaluator with ``repeatable = False`` (resident memory)."""
    out = []
    for o in objectives:
        evaluator = make_evaluator(o.ref, dict(o.options))
        if exclusive(evaluator) or not getattr(evaluator, "repeatable", True):
            out.append(o)
    return tuple(out)


def _evaluate(job: TrialJob, model: nn.Module, context: EvalContext) -> dict[str, float]:
    evaluators = [(o.name, make_evaluator(o.ref, dict(o.options))) for o in job.objectives]
    values: dict[str, float] = {}
    # Quality first under a shared lock, then timing alone on the machine.
    for alone in (False, True):
        todo = [(n, e) for n, e in evaluators if exclusive(e) == alone]
        if not todo:
            continue
        with machine_lock(job.cache_dir, alone):
            for name, evaluator in todo:
                value = float(evaluator.evaluate(model, context))
                if math.isnan(value) or math.isinf(value):
                    raise ValueError(f"evaluator {name!r} returned {value}")
                values[name] = value
    return {o.name: values[o.name] for o in job.objectives}


def run_trial(job: TrialJob) -> TrialResult:
    started = time.monotonic()
    node = node_name()
    try:
        with _deadline(job.timeout_s):
            torch.set_num_threads(job.latency.threads)
            remember_quiet(job.quiet_ms)
            model, plan, built = measured_model(job)
            model = model.to(job.device)
            reference, tokenizer = device_baseline(job), cached_baseline(job)[1]
            data = job_data(job)
            context = EvalContext(
                task=job.task.kind,  # type: ignore[arg-type]
                batches=data.test_batches(),
                vocab_size=len(tokenizer),
                plan=plan,
                latency=job.latency,
                baseline=dict(job.baseline),
                reference=reference,
                tokenizer=tokenizer,
                data=data,
            )
            context.records["realized"] = plan.realized()
            context.records |= built
            rejected = _screen(job, model, context)
            if rejected is not None:
                context.records["fidelity"] = "screen"
                return TrialResult(
                    job.number,
                    None,
                    context.records,
                    seconds=time.monotonic() - started,
                    node=node,
                    pruned=True,
                )
            values = _evaluate(job, model, context)
        context.records["pid"] = os.getpid()
        context.records["fidelity"] = "full"
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
