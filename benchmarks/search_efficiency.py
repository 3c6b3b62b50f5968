"""Does slimsearch's search beat the obvious? Uniform grid vs random search vs slimsearch.

On MiniLM / movie reviews (studies/minilm-size.yaml: the default study's space plus 2-bit
choices), in one process sharing one
evaluation cache (plan -> measured objectives, a JSON file under benchmarks/results/ that
re-runs reuse):
- the uniform grid: every (bits, sparsity, rank) applied to all block Linears alike, with
  the embeddings following the bits where they offer them, plus embeddings-only points,
  plus each Linear bit-width with each embedding width (e.g. bf16 layers, int8 table);
- random search: Optuna's RandomSampler for N trials;
- slimsearch as the driver runs it: uniform seeds, then sensitivity seeds, then
  multivariate TPE with the accuracy constraint, every other trial a refinement step from
  the feasible front (when the study refines it), reusing identical plans.
Random search and slimsearch are each one run; their numbers at 25/50/100 trials are the
prefixes of that run (sequential ask/tell with a fixed seed: a prefix is the shorter run).

Every trial is evaluated in-process by ``slimsearch.search.worker.run_trial`` with the job
the driver would build, screening included, so all methods pay and gain the same per plan.
Latency is measured honestly (latency_ratio: interleaved pass by pass with the baseline)
but with fewer passes than the study file asks (+-2%, at most 60 passes, one retry), on one
thread by default (see BENCH_THREADS; --threads 2 for the study's setting).

Hypervolume: over feasible trials (accuracy drop <= the study's 1.0 point) in loss space
(accuracy drop in points, size ratio, latency ratio; all minimized) against the fixed
reference (5 points, 1.0, 1.0), divided by the reference box's volume from (0, 0, 0). An
accuracy gain over the baseline counts as a drop of 0 (it is test-set noise, not volume).
For a causal-LM study the first axis is the perplexity increase in percent, and its
reference is 5x the study's limit (10% -> 50%).
Trials per hour: trials / (seconds their evaluations took when first measured + the
sampler's own time); a plan repeated inside one method costs nothing, as in the driver.

    .venv/bin/python benchmarks/search_efficiency.py --quick   # grid, random 25, slimsearch 10/25
    .venv/bin/python benchmarks/search_efficiency.py           # random 200, slimsearch 25/50/100
    .venv/bin/python benchmarks/search_efficiency.py --full    # random 400, slimsearch up to 200
    # the SmolLM2 variant (~45 s a trial on 2 cores; ~1h cold, 30 min of it the profile):
    .venv/bin/python benchmarks/search_efficiency.py --study studies/smollm2-short.yaml --quick --threads 2

Cold, on 2 shared cores at load ~3: the sensitivity profile ~8 min (once, cached under the
slimsearch cache), the baseline and grid ~4 min, then 2-15 s per new plan (screened ones
~2 s); --quick ~16 min cold, ~4 min with the evaluation cache warm; --full 1h03m cold
(profile cached), most of it random search's 400 trials.

--ground-truth enumerates a small space of the study (bits 32/8/4 on --gt-layers Linears and
the table: 3 -> 81 plans, 5 -> 729) through the same cache, takes its true front, and runs
every method (slimsearch's proposers over TPE, NSGA-II and random; evolution; the bare
samplers) for 3 seeds, scoring the share of the front found and the hypervolume fraction at
each of --gt-budgets. --gt-latency keeps the study's latency ratio as a third axis; the
true front's plans are then timed twice more (median kept, until every plan on the front
has been), so one pass that ran fast under load does not hold the front's volume:

    .venv/bin/python benchmarks/search_efficiency.py --ground-truth --gt-layers 5 --gt-latency \
        --threads 2 --gt-budgets 10,20,40,80,160   # MiniLM: ~70 min cold on 2 cores
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import itertools
import json
import os
import platform
import re
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import optuna

from slimsearch.search import models, retry, sensitivity
from slimsearch.search.jobs import Jobs
from slimsearch.search.log import fmt_seconds, say
from slimsearch.search.loop import SearchLoop, constraint_values
from slimsearch.search.proposers import Proposer, Sampler, Seeds, make_sampler
from slimsearch.search.proposers.default import default_proposers
from slimsearch.search.report import hypervolume
from slimsearch.search.results import knob_order
from slimsearch.search.study_file import SamplerSpec, StudySpec, load_study
from slimsearch.search.worker import TrialJob, TrialResult, run_trial, timing_objectives
from slimsearch.spaces import CompressionPlan, SearchSpace
from slimsearch.spaces.methods import registry
from slimsearch.spaces.methods.quantize import QUANTIZER_VERSION

ROOT = Path(__file__).resolve().parent.parent
STUDY = ROOT / "studies" / "minilm-size.yaml"
RESULTS = ROOT / "benchmarks" / "results"
REFERENCE = (5.0, 1.0, 1.0)  # accuracy drop (points), size ratio, latency ratio
# The quality axis's reference is this many times the study's quality limit (1 point of
# accuracy -> 5 points; 10% more perplexity -> 50%), so feasible trials span a fifth of it.
REFERENCE_LIMITS = 5.0
CACHE_FORMAT = 2  # 2: screening paired with the baseline on the same rows
# Cheaper than the study's protocol (warm-up 10, 30+ passes to +-1%, 2 retries) but still
# interleaved with the baseline and noise-gated: +-2% is plenty to rank plans.
BENCH_LATENCY = {"warmup": 3, "repeats": 10, "retries": 1, "precision": 0.02, "max_repeats": 60}
# One thread by default: on 2 shared cores a busy neighbour made 2-thread OpenMP work crawl
# (the SVD behind rank: 5 s instead of 0.07 s per layer), so trial costs would measure the
# neighbour. Latency ratios are then 1-thread ratios; --threads 2 matches the study file.
BENCH_THREADS = 1


# -- hypervolume ------------------------------------------------------------------------------
def normalized_hypervolume(
    losses: Sequence[Sequence[float]], reference: Sequence[float] = REFERENCE
) -> float:
    """Hypervolume of ``losses`` (rows, every axis minimized) bounded by ``reference``, divided
    by the volume of the box from the origin to ``reference``; points not better than the
    reference on every axis add nothing."""
    ref = np.asarray(reference, dtype=float)
    if np.any(ref <= 0):
        raise ValueError(
            f"reference {list(reference)} must be positive on every axis, e.g. {list(REFERENCE)}"
        )
    if len(losses) == 0:
        return 0.0
    points = np.asarray(losses, dtype=float).reshape(len(losses), len(ref))
    return hypervolume(points, ref) / float(np.prod(ref))


# -- the shared evaluation cache --------------------------------------------------------------
@dataclass
class Entry:
    values: dict[str, float] | None  # None: screened out or failed
    seconds: float
    status: str  # "complete" | "screened" | "failed"
    summary: str = ""
    error: str | None = None
    latency_runs: list[float] | None = None  # every latency ratio measured, when re-timed


class EvalCache:
    """Plan JSON -> its measurement, saved after every new evaluation so a killed run resumes."""

    def __init__(self, path: Path, meta: Mapping[str, Any]) -> None:
        self.path = path
        # As JSON reads it back (tuples become lists), so a re-run's meta compares equal.
        self.meta = json.loads(json.dumps(dict(meta), sort_keys=True, default=str))
        self.entries: dict[str, Entry] = {}
        self.new = 0
        if path.is_file():
            data = json.loads(path.read_text())
            if data.get("meta") == self.meta:
                self.entries = {k: Entry(**v) for k, v in data["entries"].items()}

    @staticmethod
    def key(plan: CompressionPlan) -> str:
        return hashlib.sha256(plan.to_json().encode()).hexdigest()[:20]

    def get(self, plan: CompressionPlan) -> Entry | None:
        return self.entries.get(self.key(plan))

    def put(self, plan: CompressionPlan, entry: Entry) -> None:
        self.entries[self.key(plan)] = entry
        self.new += 1
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        data = {"meta": self.meta, "entries": {k: asdict(v) for k, v in self.entries.items()}}
        tmp.write_text(json.dumps(data))
        tmp.replace(self.path)


# -- evaluation -------------------------------------------------------------------------------
@dataclass
class Bench:
    spec: StudySpec
    space: SearchSpace
    baseline_dir: Path
    baseline: dict[str, float]
    cache: EvalCache
    jobs: Jobs
    # The ground truth's reference when latency is an axis: quantized layers can run slower
    # than fp32, so a fixed latency reference of 1.0 would give most plans no volume.
    reference_override: tuple[float, ...] | None = None

    def evaluate(self, plan: CompressionPlan) -> Entry:
        hit = self.cache.get(plan)
        if hit is not None:
            return hit
        self.jobs.baseline = self.baseline
        result = run_trial(self.jobs.job(0, plan))
        entry = _entry(result, plan)
        self.cache.put(plan, entry)
        return entry

    @property
    def quality(self) -> str:
        """The quality objective: "accuracy" (classification) or "perplexity" (causal LM)."""
        return "perplexity" if self.spec.task.kind == "causal-lm" else "accuracy"

    def quality_loss(self, values: Mapping[str, float]) -> float:
        """Points of accuracy lost, or percent of perplexity gained, against the baseline."""
        if self.quality == "accuracy":
            return self.baseline["accuracy"] - values["accuracy"]
        return 100.0 * (values["perplexity"] / self.baseline["perplexity"] - 1.0)

    @property
    def quality_limit(self) -> float:
        """The study's quality constraint in quality_loss's unit."""
        from slimsearch.search.constraints import limit_on

        limits = self.spec.constraints
        if self.quality == "accuracy":
            drop = limit_on(limits, "accuracy", "max_drop")
            return 1.0 if drop is None else float(drop)
        ratio = limit_on(limits, "perplexity", "max_ratio")
        return 100.0 * ((1.1 if ratio is None else float(ratio)) - 1.0)

    @property
    def timed(self) -> bool:
        """Whether the study has a latency axis (latency_ratio): hypervolume is 3-D, else 2-D."""
        return "latency_ratio" in [o.name for o in self.spec.objectives]

    @property
    def reference(self) -> tuple[float, ...]:
        if self.reference_override is not None:
            return self.reference_override
        return (REFERENCE_LIMITS * self.quality_limit, 1.0, 1.0)[: 3 if self.timed else 2]

    def losses(self, entry: Entry, credit_gains: bool = False) -> tuple[float, ...] | None:
        """(quality loss, size ratio, latency ratio) of a feasible trial, else None. Feasible
        as the driver judges it: every constraint of the study satisfied. A quality GAIN
        counts as no loss: on 1,000 test rows +-1.3 points is noise, and crediting lucky
        trials with volume beyond the baseline would reward the noise. ``credit_gains``
        keeps the raw loss (the ground truth's front is the study's own, over raw values)."""
        if entry.values is None:
            return None
        if any(v > 0 for v in constraint_values(self.spec, entry.values, self.baseline).values()):
            return None
        size = entry.values["size_bytes"] / self.baseline["size_bytes"]
        loss = self.quality_loss(entry.values)
        loss = loss if credit_gains else max(0.0, loss)
        return (loss, size, entry.values["latency_ratio"]) if self.timed else (loss, size)

    def hypervolume(self, entries: Sequence[Entry]) -> float:
        return normalized_hypervolume([x for e in entries if (x := self.losses(e))], self.reference)


def _entry(result: TrialResult, plan: CompressionPlan) -> Entry:
    if result.pruned:
        return Entry(None, result.seconds, "screened", plan.summary())
    if result.values is None:
        return Entry(None, result.seconds, "failed", plan.summary(), result.error)
    return Entry(dict(result.values), result.seconds, "complete", plan.summary())


@dataclass
class MethodRun:
    name: str
    entries: list[Entry] = field(default_factory=list)
    costs: list[float] = field(default_factory=list)  # seconds each trial cost this method
    extra_seconds: float = 0.0  # one-off cost (the sensitivity profile)


def run_grid(bench: Bench, grid: list[dict[str, Any]]) -> MethodRun:
    run = MethodRun("uniform grid")
    seen: set[str] = set()
    for i, params in enumerate(grid):
        plan = bench.space.decode(params)
        entry = bench.evaluate(plan)
        key = EvalCache.key(plan)
        run.entries.append(entry)
        run.costs.append(0.0 if key in seen else entry.seconds)
        seen.add(key)
        say(f"grid {i + 1}/{len(grid)}: {_show(bench, entry)}")
    return run


class BenchExecutor:
    """An in-process executor over the evaluation cache: the search loop runs unchanged, and
    a plan any method measured before is read back instead of measured again."""

    capacity = 1

    def __init__(self, bench: Bench) -> None:
        self.bench = bench
        self.queue: list[TrialJob] = []
        self.entries: dict[int, Entry] = {}  # trial number -> its measurement
        self.eval_wall = 0.0  # seconds spent evaluating (cache misses) in this run

    def submit(self, job: TrialJob, fresh_process: bool = False) -> None:
        self.queue.append(job)

    def poll(self, timeout: float) -> list[TrialResult]:
        if not self.queue:
            return []
        job = self.queue.pop(0)
        started = time.monotonic()
        entry = self.bench.evaluate(CompressionPlan.from_json(job.plan_json))
        self.eval_wall += time.monotonic() - started
        self.entries[job.number] = entry
        if entry.status == "screened":
            return [TrialResult(job.number, None, {}, seconds=entry.seconds, pruned=True)]
        values = dict(entry.values) if entry.values is not None else None
        return [TrialResult(job.number, values, {}, seconds=entry.seconds, error=entry.error)]

    def cancel(self, number: int, reason: str) -> TrialResult | None:
        return None

    def in_flight(self) -> int:
        return len(self.queue)

    def shutdown(self) -> None:
        self.queue.clear()


def run_loop(
    bench: Bench,
    name: str,
    sampler: optuna.samplers.BaseSampler,
    trials: int,
    proposers: Sequence[Proposer] = (Sampler(),),
    verbose: bool = True,
) -> MethodRun:
    """The driver's own search loop (search/loop.py) on an in-memory study, over the cache:
    a trial is a plan that spent the budget (repeats are answered from earlier trials)."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(directions=[o.direction for o in bench.spec.objectives], sampler=sampler)
    study.set_user_attr("baseline", bench.baseline)
    executor = BenchExecutor(bench)
    distributions = bench.space.distributions()
    bench.jobs.baseline = bench.baseline
    loop = SearchLoop(bench.spec, study, bench.space, distributions, executor, bench.jobs)
    loop.verbose = verbose
    started = time.monotonic()
    loop.run(proposers, deadline=None, budget=trials)
    spent = [t for t in study.get_trials(deepcopy=False) if retry.counts_toward_budget(t)]
    overhead = max(0.0, time.monotonic() - started - executor.eval_wall) / max(1, len(spent))
    run = MethodRun(name)
    seen: set[str] = set()
    for t in spent:
        entry = executor.entries[t.number]
        key = json.dumps(t.user_attrs.get("plan"), sort_keys=True)
        run.entries.append(entry)
        run.costs.append(overhead + (0.0 if key in seen else entry.seconds))
        seen.add(key)
    hv = bench.hypervolume(run.entries)
    say(f"{name}: {len(spent)} trials, {len(study.trials) - len(spent)} repeats answered, HV {hv:.4f}")
    return run


def _show(bench: Bench, entry: Entry) -> str:
    if entry.values is None:
        return f"{entry.status} ({entry.summary})"
    v = entry.values
    quality = f"acc {v['accuracy']:.1f}" if bench.quality == "accuracy" else f"ppl {v['perplexity']:.2f}"
    return (
        f"{quality}, size {v['size_bytes'] / bench.baseline['size_bytes']:.3f}x"
        + (f", lat {v['latency_ratio']:.2f}x" if "latency_ratio" in v else "")
        + f" ({entry.summary})"
    )


# -- the grid ---------------------------------------------------------------------------------
def uniform_grid(space: SearchSpace) -> list[dict[str, Any]]:
    """Every (bits, sparsity, rank) on all block Linears alike (embeddings follow the bits
    where they offer them), plus the embeddings alone at each width, plus the space's own
    uniform seeds (which pair each Linear bit-width with each embedding width); duplicates
    dropped."""
    off = sensitivity.off_params(space)
    searched = [k for k in space.knobs if len(k.choices) > 1]
    linear = [k for k in searched if k.layer in space.shapes]
    width = registry.table_method().name
    tables = [k for k in searched if k.knob == width and k.layer not in space.shapes]
    order = knob_order()  # bits, sparsity, rank for the built-in methods
    values = {knob: sorted({v for k in linear if k.knob == knob for v in k.choices}) for knob in order}
    grid: list[dict[str, Any]] = []

    def add(params: dict[str, Any]) -> None:
        if params not in grid:
            grid.append(params)

    ladders = [values[knob] or [registry.get(knob).choice_off_value()] for knob in order]
    for combo in itertools.product(*ladders):
        chosen = dict(zip(order, combo, strict=True))
        params = dict(off)
        for k in linear + tables:
            if chosen[k.knob] in k.choices:
                params[space.param_name(k)] = chosen[k.knob]
        add(params)
    for k in tables:
        for bits in k.choices:
            add(off | {space.param_name(k): bits})
    for params in space.uniform_params():
        add(dict(params))
    return grid


# -- scoring ----------------------------------------------------------------------------------
def summarize(bench: Bench, run: MethodRun, n: int | None = None) -> dict[str, Any]:
    entries = run.entries[:n] if n else run.entries
    costs = run.costs[:n] if n else run.costs
    feasible = [x for e in entries if (x := bench.losses(e))]
    seconds = sum(costs) + run.extra_seconds
    return {
        "method": run.name,
        "trials": len(entries),
        "feasible": len(feasible),
        "screened": sum(e.status == "screened" for e in entries),
        "failed": sum(e.status == "failed" for e in entries),
        "hypervolume": normalized_hypervolume(feasible, bench.reference),
        "best_size_ratio": min((x[1] for x in feasible), default=None),
        "best_latency_ratio": min((x[2] for x in feasible if len(x) > 2), default=None),
        "seconds": round(seconds, 1),
        "trials_per_hour": round(3600 * len(entries) / seconds, 1) if seconds else None,
    }


def targets(
    rows: list[dict[str, Any]], ss_at: int, random_at: int, within: str = "<= 1 point accuracy drop"
) -> list[dict[str, Any]]:
    def row(method: str, trials: int | None = None) -> dict[str, Any]:
        picks = [r for r in rows if r["method"] == method and (trials is None or r["trials"] == trials)]
        return picks[-1]

    ss, rnd, grid, ss_max = (
        row("slimsearch", ss_at),
        row("random", random_at),
        row("uniform grid"),
        row("slimsearch"),
    )
    out = [
        {
            "target": f"slimsearch at {ss['trials']} trials above random at {rnd['trials']} (hypervolume)",
            "value": f"{ss['hypervolume']:.4f} vs {rnd['hypervolume']:.4f}",
            "met": ss["hypervolume"] > rnd["hypervolume"],
        },
        {
            "target": f"slimsearch ({ss_max['trials']} trials) hypervolume >= 1.05x the uniform grid's",
            "value": f"{ss_max['hypervolume'] / grid['hypervolume']:.3f}x"
            if grid["hypervolume"]
            else "grid HV 0",
            "met": ss_max["hypervolume"] >= 1.05 * grid["hypervolume"],
        },
    ]
    size = _gain(grid["best_size_ratio"], ss_max["best_size_ratio"])
    speed = _gain(grid["best_latency_ratio"], ss_max["best_latency_ratio"])
    out.append(
        {
            "target": f"at {within}: >= 1.5x smaller or >= 1.3x faster than the best uniform",
            "value": f"{size:.2f}x smaller, {speed:.2f}x faster",
            "met": size >= 1.5 or speed >= 1.3,
        }
    )
    return out


def print_targets(goals: Sequence[Mapping[str, Any]]) -> None:
    for g in goals:
        print(f"[{'MET' if g['met'] else 'NOT MET'}] {g['target']}: {g['value']}")


def _gain(grid_best: float | None, ours: float | None) -> float:
    if grid_best is None or ours is None:
        return 0.0 if ours is None else float("inf")
    return grid_best / ours


def format_table(rows: list[dict[str, Any]]) -> str:
    head = f"{'method':<14}{'trials':>7}{'feasible':>9}{'screened':>9}{'HV(norm)':>10}"
    head += f"{'best size':>10}{'best lat':>9}{'eval s':>9}{'trials/h':>9}"
    lines = [head, "-" * len(head)]
    for r in rows:
        size = f"{r['best_size_ratio']:.3f}" if r["best_size_ratio"] is not None else "-"
        lat = f"{r['best_latency_ratio']:.2f}" if r["best_latency_ratio"] is not None else "-"
        lines.append(
            f"{r['method']:<14}{r['trials']:>7}{r['feasible']:>9}{r['screened']:>9}{r['hypervolume']:>10.4f}"
            f"{size:>10}{lat:>9}{r['seconds']:>9.0f}{r['trials_per_hour'] or 0:>9.0f}"
        )
    return "\n".join(lines)


# -- main -------------------------------------------------------------------------------------
def _load() -> str:
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "unknown"


def setup(
    study: Path,
    cache_file: Path | None,
    threads: int = BENCH_THREADS,
    overrides: Mapping[str, Any] | None = None,
) -> Bench:
    spec = load_study(study, overrides)
    spec = replace(spec, latency=replace(spec.latency, **BENCH_LATENCY, threads=threads))
    baseline_dir = models.prepare_baseline(spec)
    model, _ = models.load_baseline(baseline_dir, spec.task.kind, spec.model.trust_remote_code)
    space = SearchSpace(model, spec.space)
    del model
    meta = {
        "format": CACHE_FORMAT,
        "quantizer": QUANTIZER_VERSION,
        "baseline_dir": str(baseline_dir),
        "space": space.fingerprint(),
        "task": json.dumps(spec.task.identity(), sort_keys=True, default=str),
        "latency": asdict(spec.latency),
        "screening": asdict(spec.screening) if spec.screening else None,
        "constraints": dict(spec.constraints),
        "node": platform.node(),
    }
    digest = hashlib.sha256(json.dumps(meta, sort_keys=True, default=str).encode()).hexdigest()[:10]
    cache = EvalCache(cache_file or RESULTS / f"search_efficiency_cache_{digest}.json", meta)
    bench = Bench(spec, space, baseline_dir, {}, cache, Jobs(spec, baseline_dir))
    base = bench.evaluate(CompressionPlan())  # no screening for the baseline: it is trial 0 here
    if base.values is None:
        raise RuntimeError(f"the baseline could not be evaluated: {base.error}")
    bench.baseline = dict(base.values)
    return bench


def tpe_sampler(seed: int) -> optuna.samplers.BaseSampler:
    """The driver's default sampler (multivariate TPE), seeded."""
    return make_sampler(SamplerSpec("tpe", seed))


# -- ground truth -----------------------------------------------------------------------------
GT_BUDGETS = (10, 20, 40, 80)
GT_SEEDS = (0, 1, 2)
GT_BITS = [32, 8, 4]
# With latency as an axis, the reference is this much past the worst feasible plan's value
# on each of size and latency (the nadir), so every feasible plan can add volume.
GT_NADIR_MARGIN = 1.1
# A true-front plan is timed this many more times and keeps the median, so one pass that
# ran fast under load cannot hold the front's volume (the driver re-measures its front too).
GT_RETIMES = 2


def picked_layers(names: Sequence[str], count: int) -> list[str]:
    """``count`` of the model's Linears spread over it: the first, the last and evenly
    spaced ones between (for 3: the first, the middle and the last)."""
    if count < 2 or count > len(names):
        raise ValueError(f"--gt-layers {count}: give 2 to {len(names)} (the space's searched Linears)")
    n = len(names)
    return [names[0]] + [names[i * n // (count - 1)] for i in range(1, count - 1)] + [names[-1]]


def ground_truth_overrides(study: Path, layers: int = 3, timed: bool = False) -> dict[str, Any]:
    """The study with a small space: bits 32/8/4 on ``layers`` of the model's Linears
    (``picked_layers``: on MiniLM the last is the classifier head) and on the embedding
    table (3 layers: 3^4 = 81 plans; 5: 729); accuracy (or perplexity) and size, plus the
    study's latency ratio when ``timed``."""
    spec = load_study(study)
    objectives = [o.name for o in spec.objectives]
    if timed and "latency_ratio" not in objectives:
        raise ValueError(
            f"--gt-latency: {study} has no latency_ratio objective (it has {objectives}); "
            "use a study that times trials, e.g. studies/minilm-size.yaml"
        )
    baseline_dir = models.prepare_baseline(spec)
    model, _ = models.load_baseline(baseline_dir, spec.task.kind, spec.model.trust_remote_code)
    names = list(SearchSpace(model, spec.space).shapes)
    del model
    picked = picked_layers(names, layers)
    quality = "perplexity" if spec.task.kind == "causal-lm" else "accuracy"
    pattern = "re:(" + "|".join(re.escape(n) for n in picked) + ")"
    return {
        "space": {"layers": pattern, "default": {"bits": GT_BITS}, "embeddings": GT_BITS},
        "objectives": [quality, "size_bytes"] + (["latency_ratio"] if timed else []),
    }


def retime(bench: Bench, plan: CompressionPlan, entry: Entry, times: int = GT_RETIMES) -> Entry:
    """``entry`` with its latency ratio the median of its first measurement and ``times``
    more (each interleaved with the baseline again, timing only), saved to the cache."""
    if entry.values is None:
        what = entry.summary or "a plan"
        raise ValueError(f"cannot re-time {what}: it has no measurement ({entry.status})")
    bench.jobs.baseline = bench.baseline
    job = replace(bench.jobs.job(0, plan), objectives=timing_objectives(bench.spec.objectives), screen=None)
    runs = [float(entry.values["latency_ratio"])]
    for _ in range(times):
        result = run_trial(job)
        if result.values is None:
            raise RuntimeError(f"re-timing {plan.summary()} failed: {result.error}")
        runs.append(float(result.values["latency_ratio"]))
    values = dict(entry.values) | {"latency_ratio": float(np.median(runs))}
    settled = replace(entry, values=values, latency_runs=runs)
    bench.cache.put(plan, settled)
    return settled


def settle_front(bench: Bench, plans: Sequence[Mapping[str, Any]], truth: list[Entry]) -> int:
    """Re-time the true front's plans (``retime``) until every plan on it has been; a plan
    that a lucky first pass put there may leave it, and the plans it hid then join it and
    are re-timed in turn. ``truth[i]`` is ``plans[i]``'s entry; re-timed ones are replaced.
    Returns how many plans were re-timed now (cached re-timings are not redone)."""
    retimed = 0
    while True:
        points = {i: x for i, e in enumerate(truth) if (x := bench.losses(e, credit_gains=True))}
        front = front_of(list(points.values()))
        todo = [i for i, x in points.items() if x in front and truth[i].latency_runs is None]
        if not todo:
            return retimed
        say(f"re-timing {len(todo)} true-front plans, {GT_RETIMES} more measurements each (median kept)")
        for i in todo:
            truth[i] = retime(bench, bench.space.decode(dict(plans[i])), truth[i])
            retimed += 1


def all_params(space: SearchSpace) -> list[dict[str, Any]]:
    dists = space.distributions()
    names = sorted(dists)
    choices = [list(dists[n].choices) for n in names]  # type: ignore[attr-defined]
    return [dict(zip(names, combo, strict=True)) for combo in itertools.product(*choices)]


def front_of(points: Sequence[tuple[float, ...]]) -> set[tuple[float, ...]]:
    """The non-dominated points (all axes minimized)."""
    unique = set(points)
    return {
        p
        for p in unique
        if not any(all(a <= b for a, b in zip(o, p, strict=True)) and o != p for o in unique)
    }


# slimsearch: the driver's proposers (seeds, refinement) over multivariate TPE; evolution:
# the same with evolve_front on; slimsearch+nsga2 / slimsearch+random: the driver's
# proposers over that sampler (a study's `sampler:` line); the rest: the bare sampler.
GT_METHODS = ("slimsearch", "evolution", "slimsearch+nsga2", "slimsearch+random", "tpe", "nsga2", "random")


def gt_method(bench: Bench, name: str, seed: int, budget: int) -> MethodRun:
    distributions = bench.space.distributions()
    driver, _, kind = name.partition("+")
    if driver in ("slimsearch", "evolution"):
        spec = dataclasses.replace(bench.spec, evolve_front=driver == "evolution")
        proposers = default_proposers(spec, bench.space, distributions, bench.baseline_dir)
        sampler = make_sampler(SamplerSpec(kind or "tpe", seed, population_size=10))
        return run_loop(bench, f"{name} seed {seed}", sampler, budget, proposers, verbose=False)
    sampler = make_sampler(SamplerSpec(name, seed, population_size=10))
    return run_loop(bench, f"{name} seed {seed}", sampler, budget, verbose=False)


def run_ground_truth(args: argparse.Namespace) -> int:
    started = time.monotonic()
    overrides = ground_truth_overrides(args.study, args.gt_layers, args.gt_latency)
    bench = setup(args.study, args.cache_file, args.threads, overrides)
    plans = all_params(bench.space)
    budgets = sorted(set(args.gt_budgets))
    say(f"ground truth: {len(plans)} plans over {bench.space.describe()}; budgets {budgets}")
    truth: list[Entry] = []
    cached = sum(bench.cache.get(bench.space.decode(p)) is not None for p in plans)
    for i, params in enumerate(plans):
        truth.append(bench.evaluate(bench.space.decode(params)))
        if (i + 1) % 10 == 0 or i + 1 == len(plans):
            spent = time.monotonic() - started
            new = max(1, i + 1 - cached)
            left = max(0, len(plans) - i - 1) * spent / new if i + 1 > cached else 0.0
            say(f"enumerated {i + 1}/{len(plans)} (~{fmt_seconds(left)} left): {_show(bench, truth[-1])}")
    retimed = settle_front(bench, plans, truth) if bench.timed else 0
    feasible_points = [x for e in truth if (x := bench.losses(e, credit_gains=True))]
    if bench.timed and feasible_points:
        nadir = np.max(np.asarray(feasible_points), axis=0)
        bench.reference_override = (
            bench.reference[0],
            *(GT_NADIR_MARGIN * float(v) for v in nadir[1:]),
        )
    # The study's own front: over raw values, a gain in accuracy counts (it is what the
    # search's front ranks by).
    true_front = front_of(feasible_points)
    true_hv = normalized_hypervolume(sorted(true_front), bench.reference)
    enumerated = time.monotonic() - started
    rows = []
    for name in GT_METHODS:
        for seed in GT_SEEDS:
            run = gt_method(bench, name, seed, max(budgets))
            for budget in budgets:
                feasible = {x for e in run.entries[:budget] if (x := bench.losses(e, credit_gains=True))}
                rows.append(
                    {
                        "method": name,
                        "seed": seed,
                        "budget": budget,
                        "trials": min(budget, len(run.entries)),
                        "found": len(true_front & feasible) / len(true_front),
                        "hv_fraction": normalized_hypervolume(sorted(feasible), bench.reference) / true_hv
                        if true_hv
                        else 0.0,
                    }
                )
    table = ground_truth_table(rows)
    goals = ground_truth_targets(rows)
    wall = time.monotonic() - started
    print(f"true front: {len(true_front)} points from {len(plans)} plans; hypervolume {true_hv:.4f}")
    settled = sum(e.latency_runs is not None for e in truth)
    if bench.timed:
        print(f"latency: {settled} plans timed {1 + GT_RETIMES} times (median kept), {retimed} of them now")
    print(table)
    print_targets(goals)
    print(f"wall time {fmt_seconds(wall)} (enumeration {fmt_seconds(enumerated)}); load average {_load()}")
    out = args.out if args.out != RESULTS / "search_efficiency.json" else RESULTS / "ground_truth.json"
    report = {
        "benchmark": "search_efficiency --ground-truth",
        "study": str(args.study),
        "space": bench.space.describe(),
        "plans": len(plans),
        "true_front": sorted(true_front),
        "true_hypervolume": true_hv,
        "reference": list(bench.reference),
        "objectives": [o.name for o in bench.spec.objectives],
        "baseline": bench.baseline,
        "rows": rows,
        "targets": goals,
        "wall_s": round(wall, 1),
        "enumeration_s": round(enumerated, 1),
        "new_evaluations": bench.cache.new,
        "retimed_front_plans": settled,
        "retimed_this_run": retimed,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1, default=_json_default))
    print(f"wrote {out}")
    return 0


def ground_truth_targets(rows: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """The issue's targets over the rows that exist: every method's whole front at 40 trials;
    slimsearch's hypervolume fraction at 40 (>= 0.9) and against random at 4x the budget."""

    def picks(method: str, budget: int) -> list[Mapping[str, Any]]:
        return [r for r in rows if r["method"] == method and r["budget"] == budget]

    out: list[dict[str, Any]] = []
    at40 = {m: picks(m, 40) for m in dict.fromkeys(r["method"] for r in rows)}
    if all(at40.values()):
        missed = [m for m, rs in at40.items() if min(r["found"] for r in rs) < 1.0]
        out.append(
            {
                "target": "every method finds 100% of the true front at 40 trials (every seed)",
                "value": "missed by " + ", ".join(missed) if missed else "all",
                "met": not missed,
            }
        )
    ours = picks("slimsearch", 40)
    if ours:
        hv = float(np.mean([r["hv_fraction"] for r in ours]))
        out.append(
            {
                "target": "slimsearch at 40 trials >= 90% of the true front's hypervolume (mean of seeds)",
                "value": f"{hv:.3f} (worst seed {min(r['hv_fraction'] for r in ours):.3f})",
                "met": hv >= 0.9,
            }
        )
        rnd = picks("random", 160)
        if rnd:
            theirs = float(np.mean([r["hv_fraction"] for r in rnd]))
            out.append(
                {
                    "target": "slimsearch at 40 trials above random at 160 (mean hypervolume fraction)",
                    "value": f"{hv:.3f} vs {theirs:.3f}",
                    "met": hv > theirs,
                }
            )
    return out


def ground_truth_table(rows: Sequence[Mapping[str, Any]]) -> str:
    """Per method and budget: mean fraction of the true front found (min over seeds), mean
    hypervolume fraction, and how many seeds found all of it."""
    head = f"{'method':<19}{'budget':>7}{'trials':>7}{'front found':>13}{'(worst)':>9}"
    head += f"{'HV frac':>9}{'all found':>11}"
    lines = [head, "-" * len(head)]
    for name in dict.fromkeys(r["method"] for r in rows):
        for budget in dict.fromkeys(r["budget"] for r in rows):
            picks = [r for r in rows if r["method"] == name and r["budget"] == budget]
            found = [r["found"] for r in picks]
            hv = [r["hv_fraction"] for r in picks]
            trials = min(r["trials"] for r in picks)
            full = sum(f >= 1.0 for f in found)
            lines.append(
                f"{name:<19}{budget:>7}{trials:>7}{np.mean(found):>13.0%}{min(found):>9.0%}"
                f"{np.mean(hv):>9.3f}{f'{full}/{len(picks)}':>11}"
            )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="random 25, slimsearch 10/25")
    parser.add_argument("--full", action="store_true", help="random 400, slimsearch up to 200")
    parser.add_argument("--random", type=int, help="random-search trials (default 200; quick 25; full 400)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=BENCH_THREADS, help="torch threads per trial")
    parser.add_argument("--study", type=Path, default=STUDY)
    parser.add_argument("--cache-file", type=Path, help="evaluation cache JSON (default under results/)")
    parser.add_argument(
        "--sensitivity",
        choices=("study", "on", "off"),
        default="study",
        help="sensitivity seeds as the study file says (default), or forced on/off",
    )
    parser.add_argument(
        "--refine",
        choices=("study", "on", "off"),
        default="study",
        help="front refinement as the study file says (default), or forced on/off (on needs the profile)",
    )
    parser.add_argument(
        "--evolve",
        choices=("study", "on", "off"),
        default="study",
        help="evolution steps from the front (evolve_front) as the study file says, or forced on/off",
    )
    parser.add_argument("--out", type=Path, default=RESULTS / "search_efficiency.json")
    parser.add_argument(
        "--ground-truth",
        action="store_true",
        help="enumerate an 81-plan space of the study and score each method against its true front",
    )
    parser.add_argument(
        "--gt-layers",
        type=int,
        default=3,
        help="ground truth: Linears searched beside the table (3: 81 plans; 5: 729)",
    )
    parser.add_argument(
        "--gt-latency",
        action="store_true",
        help="ground truth: keep the study's latency ratio as a third objective",
    )
    parser.add_argument(
        "--gt-budgets",
        type=lambda text: [int(x) for x in text.split(",")],
        default=list(GT_BUDGETS),
        help="ground truth: trial budgets to score, comma-separated (default 10,20,40,80)",
    )
    args = parser.parse_args(argv)
    if args.ground_truth:
        if args.gt_layers < 2:
            parser.error(f"--gt-layers {args.gt_layers}: give at least 2 (3: 81 plans; 5: 729)")
        if not args.gt_budgets or min(args.gt_budgets) < 1:
            parser.error(f"--gt-budgets {args.gt_budgets}: give positive trial counts, e.g. 10,20,40,80")
        return run_ground_truth(args)
    if args.quick and args.full:
        parser.error("--quick and --full exclude each other; give one")
    checkpoints = [10, 25] if args.quick else [25, 50, 100, 200] if args.full else [25, 50, 100]
    n_random = args.random or (25 if args.quick else 400 if args.full else 200)
    if n_random < 1:
        parser.error(f"--random {n_random}: give at least 1 trial")
    random_checkpoints = sorted({n for n in (*checkpoints, n_random) if n <= n_random})

    started, load_before = time.monotonic(), _load()
    bench = setup(args.study, args.cache_file, args.threads)
    if args.sensitivity != "study":
        on = args.sensitivity == "on"
        refine = on and bool(bench.spec.raw.get("refine_front", True))
        bench.spec = replace(bench.spec, seed_sensitivity=on, refine_front=refine)
    if args.refine != "study":
        if args.refine == "on" and not bench.spec.seed_sensitivity:
            parser.error("--refine on needs the sensitivity profile: give --sensitivity on too")
        bench.spec = replace(bench.spec, refine_front=args.refine == "on")
    if args.evolve != "study":
        if args.evolve == "on" and not bench.spec.seed_sensitivity:
            parser.error("--evolve on needs the sensitivity profile: give --sensitivity on too")
        bench.spec = replace(bench.spec, evolve_front=args.evolve == "on")
    say(f"baseline: {bench.baseline}; {len(bench.cache.entries)} cached evaluations")
    grid = run_grid(bench, uniform_grid(bench.space))

    # The driver's proposers, seeded as the study file says.
    t0 = time.monotonic()
    proposers = default_proposers(bench.spec, bench.space, bench.space.distributions(), bench.baseline_dir)
    profile_wall = time.monotonic() - t0
    profile = None
    if bench.spec.seed_sensitivity or bench.spec.refine_front:
        profile = sensitivity.load_or_compute_profile(bench.spec, bench.space, bench.baseline_dir)
    seeds = sum(len(p.plans()) for p in proposers if isinstance(p, Seeds))
    ours = run_loop(bench, "slimsearch", tpe_sampler(args.seed), max(checkpoints), proposers)
    # What computing the profile cost, even when read from the cache.
    ours.extra_seconds = profile.seconds if profile else 0.0
    rnd = run_loop(bench, "random", optuna.samplers.RandomSampler(seed=args.seed), n_random)

    rows = [summarize(bench, grid)]
    rows += [summarize(bench, rnd, n) for n in random_checkpoints]
    rows += [summarize(bench, ours, n) for n in checkpoints]
    ss_at = 100 if 100 in checkpoints else max(checkpoints)
    unit = "point(s) accuracy drop" if bench.quality == "accuracy" else "% more perplexity"
    goals = targets(rows, ss_at, n_random, f"<= {bench.quality_limit:g} {unit}")
    wall = time.monotonic() - started
    print(format_table(rows))
    if profile:
        print(
            f"slimsearch rows include the sensitivity profile's {profile.seconds:.0f} s in 'eval s' "
            f"(this run: {profile_wall:.0f} s, cached when ~0)"
        )
    print_targets(goals)
    print(
        f"wall time {fmt_seconds(wall)}; {bench.cache.new} new evaluations; "
        f"load average before {load_before}, after {_load()} (2 cores shared)"
    )
    report = {
        "benchmark": "search_efficiency",
        "study": str(args.study),
        "reference": {
            "accuracy_drop" if bench.quality == "accuracy" else "perplexity_increase_pct": bench.reference[0],
            "size_ratio": bench.reference[1],
            "latency_ratio": bench.reference[2] if bench.timed else None,
        },
        "latency": asdict(bench.spec.latency),
        "baseline": bench.baseline,
        "rows": rows,
        "targets": goals,
        "profile": {"key": profile.key, "seconds": profile.seconds} if profile else None,
        "seeds": seeds,
        "seed_uniform": bench.spec.seed_uniform,
        "seed_sensitivity": bench.spec.seed_sensitivity,
        "refine_front": bench.spec.refine_front,
        "evolve_front": bench.spec.evolve_front,
        "wall_s": round(wall, 1),
        "new_evaluations": bench.cache.new,
        "load_average": {"before": load_before, "after": _load()},
        "cpu": platform.processor() or platform.machine(),
        "trials": {r.name: [asdict(e) for e in r.entries] for r in (grid, rnd, ours)},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1, default=_json_default))
    print(f"wrote {args.out}")
    return 0


def _json_default(value: Any) -> Any:
    if isinstance(value, float | int):
        return value
    return str(value)


if __name__ == "__main__":
    raise SystemExit(main())
