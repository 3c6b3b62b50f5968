"""The driver: owns the Optuna study and runs the ask/tell loop.

Only the driver talks to the storage; executors compute and return. A trial that fails is
told FAILED with its error, and the search goes on. Whatever happens, the run ends by
writing the Pareto front it has.
"""

from __future__ import annotations

import json
import signal
import time
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import optuna
import yaml
from optuna.trial import FrozenTrial, Trial, TrialState

from slimsearch.evaluators.latency import merge_quietest, quiet_times
from slimsearch.search import (
    comparable,
    constraints,
    models,
    pareto,
    preflight,
    refine,
    retry,
    sensitivity,
    storage,
)
from slimsearch.search.executors import Executor, make_executor
from slimsearch.search.faults import FailureStreak, RunAborted, RunFolderWatch
from slimsearch.search.locks import run_lock
from slimsearch.search.log import fmt_seconds, say
from slimsearch.search.study_file import StudyError, StudySpec, load_study
from slimsearch.search.worker import ScreenSpec, TrialJob, TrialResult, timing_objectives
from slimsearch.spaces import CompressionPlan, SearchSpace
from slimsearch.spaces.methods import registry
from slimsearch.spaces.methods.distill import DistillRecipe

# progress shows these against the baseline
RATIO_SHOWN = ("size_bytes", "latency_ms", "perplexity", "memory_bytes", "ttft_ms", "decode_tokens_per_s")
RUN_INFO = "run.json"
# A trial past its timeout first gets TrialTimeout raised inside it; past this much more,
# its task is killed (code stuck in native calls cannot see the signal).
KILL_GRACE_S = 10.0
# Answered repeats cost no budget, so a sampler that only proposes measured plans (a small
# space, fully explored) would never stop: this many in a row end the run.
MAX_REPEATS_IN_A_ROW = 100
EXIT_CODES = {"interrupted": 130, "terminated": 143, "aborted": 1}


@dataclass
class RunResult:
    run_dir: Path
    study: optuna.Study
    baseline: dict[str, float]
    front: list[dict[str, Any]]
    stopped: str
    counts: dict[str, int] = field(default_factory=dict)
    error: str | None = None  # why an aborted run stopped

    @property
    def exit_code(self) -> int:
        """130 / 143 when interrupted by SIGINT / SIGTERM, 1 when aborted or nothing completed."""
        if self.stopped in EXIT_CODES:
            return EXIT_CODES[self.stopped]
        return 0 if self.counts.get("complete") else 1


def storage_url(spec: StudySpec) -> str:
    return storage.storage_url(spec.output, spec.storage)


def make_sampler(spec: StudySpec) -> optuna.samplers.BaseSampler:
    s = spec.sampler
    if s.name == "nsga2":
        return optuna.samplers.NSGAIISampler(seed=s.seed, population_size=s.population_size)
    if s.name == "random":
        return optuna.samplers.RandomSampler(seed=s.seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return optuna.samplers.TPESampler(seed=s.seed, multivariate=True, constant_liar=True)


def constraint_values(
    spec: StudySpec, values: dict[str, float], baseline: dict[str, float]
) -> dict[str, float]:
    """Optuna constraint values: <= 0 means satisfied."""
    return constraints.violations(spec.constraints, [o.name for o in spec.measured()], values, baseline)


class Driver:
    def __init__(self, spec: StudySpec) -> None:
        self.spec = spec
        self.run_dir = spec.output
        self.objectives = [o.name for o in spec.objectives]
        self.running: dict[int, tuple[Trial, float]] = {}
        self.started = time.monotonic()
        self.known: dict[str, TrialResult] = {}  # plan JSON -> its first complete result
        self.done_here = 0  # trials finished by this driver (for the ETA)
        self.quiet_ms: dict[str, float] = {}  # quietest baseline time per shape, for the drift gate
        self.profile: sensitivity.Profile | None = None  # set when the study refines its front
        self.max_repeats = MAX_REPEATS_IN_A_ROW
        self.streak = FailureStreak(spec.executor.max_consecutive_failures)
        self.watch = RunFolderWatch(self.run_dir, storage.storage_path(self.run_dir, spec.storage))

    # -- set-up -------------------------------------------------------------------------
    def open_study(self, space: SearchSpace, baseline_dir: Path) -> optuna.Study:
        spec = self.spec
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        directions = [o.direction for o in spec.objectives]
        study = optuna.create_study(  # loads it when the storage holds it (always, but for a journal)
            study_name=spec.name,
            storage=storage.open_for_driver(self.run_dir, spec.storage, spec.name, directions),
            sampler=make_sampler(spec),
            directions=directions,
            load_if_exists=True,
        )
        if [d.name.lower() for d in study.directions] != directions:
            raise StudyError(
                f"output: {self.run_dir} holds the study {spec.name!r} with directions "
                f"{[d.name.lower() for d in study.directions]}, not {directions}; resume with the original "
                "study file, or give a new output folder (--output)"
            )
        self.check_comparable(study, space, baseline_dir)
        changed = changed_methods(study.user_attrs)
        if changed:
            # Not refused: the stored trials are still real measurements, just of other results.
            say(
                f"warning: {self.run_dir} was measured with other versions of "
                + ", ".join(f"{name} ({was} -> {now})" for name, (was, now) in changed.items())
                + "; results from before and after are not comparable, and a plan proposed again "
                "reuses its old result. Give a new output folder (--output) for comparable numbers"
            )
        info = {
            "study_name": spec.name,
            "storage": spec.storage,
            "url": storage_url(spec),
            "objectives": self.objectives,
            "task": spec.task.kind,
            "baseline_dir": str(baseline_dir),
            "cache_dir": str(spec.cache),
        }
        (self.run_dir / RUN_INFO).write_text(json.dumps(info, indent=2))
        (self.run_dir / "study.yaml").write_text(yaml.safe_dump(dict(spec.raw), sort_keys=False))
        return study

    def check_comparable(self, study: optuna.Study, space: SearchSpace, baseline_dir: Path) -> None:
        """Refuse a resume whose trials would not be comparable with the stored ones; record
        what they are scored by in a new study."""
        spec = self.spec
        fingerprint: dict[str, Any] = {"space": space.fingerprint(), "objectives": self.objectives}
        if spec.distill.search:
            fingerprint["distill"] = {k: list(v) for k, v in spec.distill.search.items()}
        now = comparable.record(spec, space, baseline_dir.name)
        stored = study.user_attrs.get("comparable")
        if stored is None and (legacy := study.user_attrs.get("fingerprint")) not in (None, fingerprint):
            stored = {"space": legacy.get("space"), "objectives": legacy.get("objectives")}
            now = {"space": fingerprint["space"], "objectives": self.objectives}
        if stored is not None and stored != now:
            changes = comparable.differences(stored, now)
            raise StudyError(
                f"output: {self.run_dir} holds trials scored another way; resuming would mix them into "
                f"one front. Changed since they ran: {'; '.join(changes[:8])}"
                + (f"; and {len(changes) - 8} more" if len(changes) > 8 else "")
                + ". Resume with the original study file, or give a new output folder (--output)"
            )
        if "comparable" not in study.user_attrs:  # a new study, or one from before this record
            study.set_user_attr("comparable", now)
        if "fingerprint" not in study.user_attrs:
            study.set_user_attr("fingerprint", fingerprint)
            study.set_user_attr("methods", registry.versions())
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                study.set_metric_names(self.objectives)

    def job(
        self, number: int, plan: CompressionPlan, baseline_dir: Path, baseline: dict[str, float]
    ) -> TrialJob:
        spec = self.spec
        return TrialJob(
            number=number,
            plan_json=plan.to_json(),
            baseline_dir=str(baseline_dir),
            cache_dir=str(spec.cache),
            task=spec.task,
            objectives=spec.measured(),
            latency=spec.latency,
            baseline=baseline,
            trust_remote_code=spec.model.trust_remote_code,
            timeout_s=spec.executor.trial_timeout_s,
            screen=self.screen_spec(baseline) if number >= 0 else None,  # never screen the baseline
            quiet_ms=dict(self.quiet_ms),
            methods=spec.methods,
            layer_store_bytes=spec.layer_store_bytes,
        )

    def screen_spec(self, baseline: dict[str, float]) -> ScreenSpec | None:
        s = self.spec.screening
        drop = constraints.limit_on(self.spec.constraints, "accuracy", "max_drop")
        if s is None or drop is None or "accuracy" not in baseline or self.spec.task.kind != "classification":
            return None
        return ScreenSpec(max_drop=drop, examples=s.examples, z=s.z)

    def measure_baseline(
        self, study: optuna.Study, executor: Executor, baseline_dir: Path
    ) -> dict[str, float]:
        stored = study.user_attrs.get("baseline")
        if stored:
            self.note_quiet(study.user_attrs.get("baseline_records", {}))
            return dict(stored)
        say("measuring the uncompressed baseline")
        result = _run_alone(executor, self.job(-1, CompressionPlan(), baseline_dir, {}))
        if result.values is None:  # every trial would fail the same way
            say(f"the baseline's measurement failed:\n{result.traceback or result.error}")
            raise RunAborted(
                f"the uncompressed baseline could not be evaluated ({result.error}); fix the cause "
                "(the traceback is above) and run the study again"
            )
        study.set_user_attr("baseline", result.values)
        study.set_user_attr("baseline_records", result.records)
        self.note_quiet(result.records)
        say("baseline: " + ", ".join(f"{k} {v:.4g}" for k, v in result.values.items()))
        return result.values

    def note_quiet(self, records: dict[str, Any]) -> None:
        for kind in ("latency", "decode"):
            merge_quietest(self.quiet_ms, quiet_times(records.get(kind, {})))

    # -- the loop -----------------------------------------------------------------------
    def finished_count(self, study: optuna.Study) -> int:
        """Finished trials that spent the budget (see retry.counts_toward_budget)."""
        return retry.tally(study.get_trials(deepcopy=False))["spent"]

    def tell(self, study: optuna.Study, result: TrialResult, baseline: dict[str, float]) -> None:
        trial, _ = self.running.pop(result.number)
        trial.set_user_attr("seconds", round(result.seconds, 2))
        trial.set_user_attr("node", result.node)
        measured = result.pruned or result.values is not None
        if measured and "reused_from" not in result.records:  # proposed again, it is answered from this
            self.known.setdefault(CompressionPlan.from_dict(trial.user_attrs["plan"]).to_json(), result)
        if result.pruned:
            trial.set_user_attr("records", result.records)
            study.tell(trial, state=TrialState.PRUNED)
            return
        if result.values is None:
            trial.set_user_attr("error", result.error or "unknown error")
            trial.set_user_attr("traceback", (result.traceback or "")[-4000:])
            study.tell(trial, state=TrialState.FAIL)
            say(f"trial {result.number} FAILED: {result.error}")
            return
        trial.set_user_attr("metrics", result.values)
        trial.set_user_attr("records", result.records)
        self.note_quiet(result.records)
        source = trial.user_attrs.get("distilled_from")
        if source is not None:  # stage two: keep the before-distillation values beside the after
            before = study.get_trials(deepcopy=False)[source].user_attrs.get("metrics", {})
            trial.set_user_attr("before_distill", before)
        for key, value in constraint_values(self.spec, result.values, baseline).items():
            trial.set_constraint(key, value)
        study.tell(trial, [result.values[name] for name in self.objectives])

    def progress(self, study: optuna.Study, result: TrialResult, baseline: dict[str, float]) -> None:
        trials = study.get_trials(deepcopy=False)
        counts = retry.tally(trials)
        counted, failed, repeats = counts["spent"], counts["failed"], counts["repeats"]
        screened = sum(t.state == TrialState.PRUNED for t in trials)
        best_trials = pareto.distinct(study.best_trials) if counts["complete"] else []
        front = len(best_trials)
        elapsed = time.monotonic() - self.started
        budget = self.spec.budget
        eta = ""
        if budget.trials and self.done_here:
            per = elapsed / self.done_here
            eta = f", ETA {fmt_seconds(per * max(0, budget.trials - counted))}"
        if result.values:
            parts = []
            for name, value in result.values.items():
                base = baseline.get(name)
                shown = f" ({value / base:.2f}x)" if base and name in RATIO_SHOWN else ""
                parts.append(f"{name} {value:.4g}{shown}")
            what = ", ".join(parts)
        elif result.pruned:
            scr = result.records.get("screen", {})
            what = f"screened out (accuracy {scr.get('accuracy', 0):.1f} on {scr.get('examples')} examples)"
        else:
            what = "failed"
        if "reused_from" in result.records:
            what += f" (same plan as trial {result.records['reused_from']}: answered from it, not counted)"
        total = f"/{budget.trials}" if budget.trials else ""
        say(
            f"trial {result.number}: {what} [{result.seconds:.1f}s] | {counted}{total} done "
            f"({failed} failed, {screened} screened out, {repeats} repeats answered, "
            f"{len(self.running)} running), front {front}, "
            f"elapsed {fmt_seconds(elapsed)}{eta}{self.best_so_far(study, best_trials)}"
        )

    def best_so_far(self, study: optuna.Study, front: list[FrozenTrial]) -> str:
        """Each objective's best value among feasible front trials."""
        if not front:
            return ""
        parts = []
        for i, (name, direction) in enumerate(zip(self.objectives, study.directions, strict=True)):
            values = [t.values[i] for t in front]
            best = max(values) if direction == optuna.study.StudyDirection.MAXIMIZE else min(values)
            parts.append(f"{name} {best:.4g}")
        return " | best: " + ", ".join(parts)

    def run(self) -> RunResult:
        preflight.preflight(self.spec)  # what can be refused without a model, before any work
        with run_lock(self.run_dir):
            return self._run()

    def _run(self) -> RunResult:
        spec = self.spec
        baseline_dir = models.prepare_baseline(spec)
        model, _ = models.load_baseline(baseline_dir, spec.task.kind, spec.model.trust_remote_code)
        try:
            space = SearchSpace(model, spec.space)
        except ValueError as exc:  # e.g. a layer pattern that matches nothing in this model
            raise StudyError(str(exc)) from None
        del model
        say(f"search space: {space.describe()}")
        study = self.open_study(space, baseline_dir)
        self.watch.start()
        distributions = space.distributions() | self.distill_distributions()
        retry.recover(study, distributions)
        self.remember(study)
        executor = make_executor(
            spec.executor.kind,
            self.run_dir,
            spec.executor.max_in_flight,
            spec.latency.threads,
            spec.executor.address,
        )
        if spec.executor.kind == "inprocess" and spec.executor.trial_timeout_s:
            say(
                "note: in-process, executor.trial_timeout is a signal that Python code sees; a native "
                "call that blocks signals runs past it (executor kind ray kills the task instead)"
            )
        stopped, error = "budget", None
        previous_term = signal.signal(signal.SIGTERM, _sigterm_as_interrupt)
        try:
            baseline = self.measure_baseline(study, executor, baseline_dir)
            try:  # a constraint the baseline cannot anchor (a ratio to zero) fails before any trial
                constraints.check_baseline(spec.constraints, [o.name for o in spec.measured()], baseline)
            except ValueError as exc:
                raise StudyError(str(exc)) from None
            if spec.seed_uniform and not study.user_attrs.get("seeded"):
                _queue_seeds(study, space.uniform_params(), "uniform", "seeded")
            seeding = spec.seed_sensitivity and not study.user_attrs.get("seeded_sensitivity")
            if seeding or spec.refine_front:
                profile = sensitivity.load_or_compute_profile(spec, space, baseline_dir)
                self.profile = profile if spec.refine_front else None
            if seeding:
                seeds = sensitivity.sensitivity_seeds(space, profile, spec.seed_budgets)
                _queue_seeds(study, seeds, "sensitivity", "seeded_sensitivity")
            # The time budget is the search's: set-up (fetching, fine-tuning, the baseline
            # measurement, the sensitivity profile) does not spend it.
            deadline = time.monotonic() + spec.budget.timeout_s if spec.budget.timeout_s else None
            if deadline is not None:
                say(
                    f"set-up took {fmt_seconds(time.monotonic() - self.started)}; the search's "
                    f"{fmt_seconds(spec.budget.timeout_s or 0)} start now"
                )
            stopped = self.loop(study, executor, space, distributions, baseline_dir, baseline, deadline)
            if spec.distill.mode == "finalists" and stopped not in ("timeout", "exhausted"):
                waiting = len(study.get_trials(deepcopy=False, states=[TrialState.WAITING]))
                extra = self.queue_finalists(study)
                if extra:  # queued seeds not yet run go first: Optuna pops waiting trials in order
                    budget = self.finished_count(study) + waiting + extra
                    args = (study, executor, space, distributions, baseline_dir, baseline, deadline)
                    stopped = self.loop(*args, budget=budget)
            if spec.remeasure_front:
                self.remeasure_front(study, executor, baseline_dir, baseline)
        except KeyboardInterrupt as exc:
            stopped = "terminated" if isinstance(exc, Terminated) else "interrupted"
            say(f"{stopped}: cancelling running trials (they are queued again for a resume)")
        except RunAborted as exc:
            stopped, error = "aborted", str(exc)
            say(f"error: {exc}")
        finally:
            signal.signal(signal.SIGTERM, previous_term)
            self.cancel_running(study, distributions, stopped)
            executor.shutdown()
        if stopped == "aborted" and not self.watch.intact():  # nothing left to write the front into
            print(f"\nslimsearch: error: {error}")
            return RunResult(self.run_dir, study, {}, [], stopped, {}, error)
        baseline = dict(study.user_attrs.get("baseline", {}))
        result = self.finish(study, baseline, stopped)
        result.error = error
        return result

    def remember(self, study: optuna.Study) -> None:
        """Plans measured (or screened out) in earlier runs: a repeat is answered from them."""
        for t in study.get_trials(deepcopy=False, states=[TrialState.COMPLETE, TrialState.PRUNED]):
            records = dict(t.user_attrs.get("records", {}))
            if "plan" not in t.user_attrs or pareto.is_repeat(t):
                continue
            key = CompressionPlan.from_dict(t.user_attrs["plan"]).to_json()
            if t.state == TrialState.COMPLETE:
                values = dict(t.user_attrs.get("metrics", {}))
                self.known.setdefault(key, TrialResult(t.number, values, records))
            else:
                self.known.setdefault(key, TrialResult(t.number, None, records, pruned=True))

    def cancel_running(self, study: optuna.Study, distributions: dict[str, Any], stopped: str) -> None:
        """Trials cut short by the run stopping: FAILED, not counted, queued again whole."""
        for number in list(self.running):
            try:
                done = retry.fail_and_requeue(
                    study,
                    study.get_trials(deepcopy=False)[number],
                    distributions,
                    f"cancelled: the run was {stopped}",
                    counted=False,
                )
                say(f"trial {number}: cancelled, {done}")
            except Exception as exc:  # the storage itself may be what failed
                say(f"trial {number}: could not be marked cancelled ({type(exc).__name__}: {exc})")
        self.running.clear()

    def loop(
        self,
        study: optuna.Study,
        executor: Executor,
        space: SearchSpace,
        distributions: dict[str, Any],
        baseline_dir: Path,
        baseline: dict[str, float],
        deadline: float | None,
        budget: int | None = None,
    ) -> str:
        budget = budget if budget is not None else self.spec.budget.trials
        stopped = "budget"
        repeats = 0  # answered repeats in a row
        waited = False
        while True:
            self.watch.check()
            out_of_time = deadline is not None and time.monotonic() >= deadline
            if out_of_time and not study.get_trials(deepcopy=False, states=[TrialState.COMPLETE]):
                if not waited:  # so that the run always ends with a front
                    say("the search's time is up before any trial finished: waiting for the first one")
                    waited = True
                out_of_time = executor.in_flight() > 0
            if out_of_time:
                stopped = "timeout"
            while not out_of_time and executor.in_flight() < executor.capacity:
                if budget is not None and self.finished_count(study) + len(self.running) >= budget:
                    break
                if repeats >= self.max_repeats:
                    say(
                        f"the last {repeats} proposals were all plans measured before: the space looks "
                        "exhausted, so the search stops here"
                    )
                    return "exhausted"
                if self.profile is not None:
                    queue_refinement(study, space, self.profile)
                trial = ask_retry_first(study, distributions)
                plan = self.decode(space, trial)
                trial.set_user_attr("plan", plan.to_dict())
                self.running[trial.number] = (trial, time.monotonic())
                earlier = self.known.get(plan.to_json())
                if earlier is not None:  # the same plan was measured before: answer from it
                    records = {k: v for k, v in earlier.records.items() if k == "screen"}
                    values = dict(earlier.values) if earlier.values is not None else None
                    records |= {"reused_from": earlier.number}
                    reused = TrialResult(trial.number, values, records, pruned=earlier.pruned)
                    self.tell(study, reused, baseline)
                    self.progress(study, reused, baseline)
                    repeats += 1
                    continue
                repeats = 0
                executor.submit(self.job(trial.number, plan, baseline_dir, baseline))
            if executor.in_flight() == 0:
                return stopped
            results = executor.poll(timeout=1.0) + self.overdue(executor)
            for result in results:
                self.tell(study, result, baseline)
                self.done_here += 1
                self.progress(study, result, baseline)
                self.streak.note(None if result.values is not None or result.pruned else result.error or "?")

    # -- distillation ------------------------------------------------------------------------
    def distill_distributions(self) -> dict[str, Any]:
        """Searched recipe knobs (every-trial mode), as fixed categorical distributions."""
        return {
            f"distill:{key}": optuna.distributions.CategoricalDistribution(list(values))
            for key, values in self.spec.distill.search.items()
        }

    def decode(self, space: SearchSpace, trial: Trial) -> CompressionPlan:
        plan = space.decode({k: v for k, v in trial.params.items() if not k.startswith("distill:")})
        recipe: dict[str, Any] | None = None
        if "distill" in trial.user_attrs:  # a second-stage finalist
            recipe = dict(trial.user_attrs["distill"])
        elif self.spec.distill.mode == "every-trial":
            recipe = dict(self.spec.distill.recipe)
            recipe |= {k.split(":", 1)[1]: v for k, v in trial.params.items() if k.startswith("distill:")}
        if recipe is None or recipe.get("kind", "logits") == "off" or recipe.get("steps", 1) == 0:
            return plan
        return replace(plan, distill=DistillRecipe.from_dict(recipe).to_dict())

    def queue_finalists(self, study: optuna.Study) -> int:
        """Stage two: queue the not-yet-distilled Pareto candidates (constraints ignored, since
        distillation may bring an infeasible trial back) with the study's recipe."""
        trials = study.get_trials(deepcopy=False, states=[TrialState.COMPLETE])
        done = {t.user_attrs.get("distilled_from") for t in trials} | {
            t.user_attrs.get("distilled_from")
            for t in study.get_trials(deepcopy=False, states=[TrialState.WAITING])
        }
        plain = [t for t in trials if not (t.user_attrs.get("plan") or {}).get("distill")]
        directions = study.directions
        front = [t for t in plain if not any(_dominates(o, t, directions) for o in plain)]
        first = 1 if directions[0] == optuna.study.StudyDirection.MINIMIZE else -1
        front.sort(key=lambda t: first * t.values[0])
        chosen = [t for t in front if t.number not in done and not pareto.is_repeat(t)]
        chosen = [
            t for t in chosen if CompressionPlan.from_dict(t.user_attrs["plan"]).summary() != "baseline"
        ]
        chosen = chosen[: self.spec.distill.finalists]
        recipe = DistillRecipe.from_dict(dict(self.spec.distill.recipe)).to_dict()
        for t in chosen:
            study.enqueue_trial(t.params, user_attrs={"distill": recipe, "distilled_from": t.number})
        if chosen:
            say(f"stage two: distilling {len(chosen)} Pareto candidates: trials {[t.number for t in chosen]}")
        return len(chosen)

    def overdue(self, executor: Executor) -> list[TrialResult]:
        """Cancel trials running past their timeout plus a grace period."""
        limit = self.spec.executor.trial_timeout_s
        if not limit:
            return []
        now = time.monotonic()
        out = []
        for number, (_, started) in list(self.running.items()):
            if now - started > limit + KILL_GRACE_S:
                result = executor.cancel(
                    number, f"TrialTimeout: killed after {now - started:.0f}s (limit {limit:g}s)"
                )
                if result is not None:
                    out.append(result)
        return out

    def remeasure_front(
        self,
        study: optuna.Study,
        executor: Executor,
        baseline_dir: Path,
        baseline: dict[str, float],
    ) -> None:
        """Time the front's trials again, each in a fresh process, interleaved with the baseline."""
        timing = timing_objectives(self.spec.objectives)
        front = [
            t
            for t in pareto.distinct(study.best_trials)
            if str(t.number) not in study.user_attrs.get("final_latency", {})
        ]
        if not timing or not front:
            return
        say(f"re-measuring the latency of {len(front)} front trials in fresh processes")
        final = dict(study.user_attrs.get("final_latency", {}))
        for trial in front:
            # Distillation changes weights, not shapes: timing the undistilled structure is
            # the same measurement without retraining; screening is for quality, not timing.
            plan = replace(CompressionPlan.from_dict(trial.user_attrs["plan"]), distill=None)
            job = replace(
                self.job(trial.number, plan, baseline_dir, baseline), objectives=timing, screen=None
            )
            result = _run_alone(executor, job, fresh_process=True)
            if result.values is None:
                say(f"re-measuring trial {trial.number} failed: {result.error}")
                continue
            lat = result.records.get("latency", {})
            final[str(trial.number)] = result.values | {"ratio": lat.get("ratio"), "noisy": lat.get("noisy")}
        study.set_user_attr("final_latency", final)

    def finish(self, study: optuna.Study, baseline: dict[str, float], stopped: str) -> RunResult:
        rows = pareto.front_rows(study, self.objectives, baseline) if baseline else []
        if rows and study.user_attrs.get("final_latency"):
            print("latency columns of the front: re-measured at the end in fresh processes")
        pareto.write_csv(rows, self.run_dir / "pareto.csv")
        pareto.write_csv(pareto.all_rows(study, self.objectives, baseline), self.run_dir / "trials.csv")
        tally = retry.tally(study.get_trials(deepcopy=False))
        counts = {key: tally[key] for key in ("complete", "failed", "repeats")}
        took = fmt_seconds(time.monotonic() - self.started)
        print(
            f"\nslimsearch: study {self.spec.name!r} stopped ({stopped}) after {took}: "
            f"{counts['complete']} trials complete, {counts['failed']} failed, "
            f"{counts['repeats']} repeated plans answered from earlier trials"
        )
        if baseline:
            print("baseline: " + ", ".join(f"{k} {v:.4g}" for k, v in baseline.items()))
        if rows:
            print(f"Pareto front ({len(rows)} trials, feasible only):")
            print(pareto.format_table(rows))
        elif counts["complete"]:
            print("No trial met the constraints; the nearest ones:")
            print(pareto.format_table(pareto.nearest_infeasible(study, self.objectives, baseline)))
        else:
            print("No trial completed.")
        print(
            f"front: {self.run_dir / 'pareto.csv'}  all trials: {self.run_dir / 'trials.csv'}  "
            f"storage: {storage_url(self.spec)}"
        )
        return RunResult(self.run_dir, study, baseline, rows, stopped, counts)


def _dominates(a: FrozenTrial, b: FrozenTrial, directions: list[optuna.study.StudyDirection]) -> bool:
    signs = [1 if d == optuna.study.StudyDirection.MINIMIZE else -1 for d in directions]
    pa = [s * v for s, v in zip(signs, a.values, strict=True)]
    pb = [s * v for s, v in zip(signs, b.values, strict=True)]
    return all(x <= y for x, y in zip(pa, pb, strict=True)) and pa != pb


def ask_retry_first(study: optuna.Study, distributions: dict[str, Any]) -> Trial:
    """``study.ask``, except that a re-queued retry of an orphaned trial runs before the seeds
    still waiting. Optuna pops the oldest WAITING trial and a retry is queued last, so with
    many seeds and a small budget the retry would never run. Optuna has no queue priority:
    this claims the retry the way ``ask`` claims a waiting trial (the storage's atomic
    WAITING -> RUNNING switch, safe against a second driver)."""
    for t in study.get_trials(deepcopy=False, states=[TrialState.WAITING]):
        if "retry_of" not in t.user_attrs:
            continue
        try:
            claimed = study._storage.set_trial_state_values(t._trial_id, state=TrialState.RUNNING)
        except optuna.exceptions.UpdateFinishedTrialError:
            continue
        if claimed:
            trial = Trial(study, t._trial_id)
            for name, dist in distributions.items():
                trial._suggest(name, dist)
            return trial
    return study.ask(fixed_distributions=distributions)


def queue_refinement(study: optuna.Study, space: SearchSpace, profile: sensitivity.Profile) -> bool:
    """Queue one step from the feasible front when nothing waits and it is refinement's turn
    (half of the trials after the seeds); True when one was queued."""
    if study.get_trials(deepcopy=False, states=[TrialState.WAITING]) or not refine.should_refine(study):
        return False
    proposal = refine.propose(study, space, profile)
    if proposal is None:
        return False
    study.enqueue_trial(proposal.params, user_attrs=proposal.user_attrs())
    return True


def _queue_seeds(study: optuna.Study, seeds: list[dict[str, Any]], kind: str, done_attr: str) -> None:
    """Queue configurations before sampling, once per study (``done_attr`` marks it done)."""
    for params in seeds:
        study.enqueue_trial(params, user_attrs={"seed": kind}, skip_if_exists=True)
    study.set_user_attr(done_attr, True)
    say(f"queued {len(seeds)} {kind} configurations")


def _run_alone(executor: Executor, job: TrialJob, fresh_process: bool = False) -> TrialResult:
    """Run one job outside the search loop and wait for it."""
    executor.submit(job, fresh_process=fresh_process)
    results: list[TrialResult] = []
    while not results:
        results = executor.poll(timeout=5.0)
    return results[0]


class Terminated(KeyboardInterrupt):
    """SIGTERM, handled as Ctrl-C is (the run stops cleanly), but exits with 143."""


def _sigterm_as_interrupt(signum: int, frame: object) -> None:
    raise Terminated


def run_study(
    study: str | Path | StudySpec,
    *,
    trials: int | None = None,
    timeout_s: float | None = None,
    executor: str | None = None,
    address: str | None = None,
    output: str | Path | None = None,
) -> RunResult:
    """Run (or resume) a study from a study file or a StudySpec; options override the file."""
    spec = study if isinstance(study, StudySpec) else load_study(study)
    if trials is not None or timeout_s is not None:
        spec = replace(
            spec,
            budget=replace(
                spec.budget,
                trials=trials if trials is not None else spec.budget.trials,
                timeout_s=timeout_s if timeout_s is not None else spec.budget.timeout_s,
            ),
        )
    if executor is not None or address is not None:
        kind = "ray" if address is not None else executor or spec.executor.kind
        spec = replace(
            spec, executor=replace(spec.executor, kind=kind, address=address or spec.executor.address)
        )
    if output is not None:
        spec = replace(spec, output=Path(output).resolve())
    return Driver(spec).run()


def changed_methods(attrs: Mapping[str, Any]) -> dict[str, tuple[int, int]]:
    """The methods whose version differs from the one a study was measured with: name ->
    (then, now). Studies from before the registry recorded only the bit-width quantizer's
    version ("quantizer")."""
    now = registry.versions()
    then = attrs.get("methods")
    if not isinstance(then, dict):
        width = registry.table_method().name
        then = {width: attrs.get("quantizer", 1)}
    return {name: (int(was), now[name]) for name, was in then.items() if name in now and now[name] != was}
