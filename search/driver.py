"""The driver: sets a run up, runs the search loop over its proposers, writes the front.

Only the driver's process talks to the storage; executors compute and return. A trial that
fails is told FAILED with its error, and the search goes on. Whatever happens, the run ends
by writing the Pareto front it has.
"""

from __future__ import annotations

import signal
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import optuna

from slimsearch.search import constraints, models, pareto, preflight, progress, retry, storage
from slimsearch.search.baseline import measure_baseline
from slimsearch.search.executors import make_executor
from slimsearch.search.faults import RunAborted, RunFolderWatch
from slimsearch.search.jobs import Jobs
from slimsearch.search.locks import run_lock
from slimsearch.search.log import fmt_seconds, say
from slimsearch.search.loop import SearchLoop, distill_distributions
from slimsearch.search.opening import RUN_INFO, open_study, storage_url
from slimsearch.search.proposers import Finalists, Proposer, Retries
from slimsearch.search.proposers.default import default_proposers
from slimsearch.search.remeasure import remeasure_front
from slimsearch.search.study_file import StudyError, StudySpec, load_study
from slimsearch.spaces import SearchSpace
from slimsearch.spaces.methods.distill import DistillRecipe

__all__ = ["RUN_INFO", "Driver", "RunResult", "default_proposers", "run_study"]
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


class Driver:
    def __init__(self, spec: StudySpec) -> None:
        self.spec = spec
        self.run_dir = spec.output
        self.started = time.monotonic()

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
        study = open_study(spec, space, baseline_dir)
        watch = RunFolderWatch(self.run_dir, storage.storage_path(self.run_dir, spec.storage))
        watch.start()
        distributions = space.distributions() | distill_distributions(spec)
        retry.recover(study, distributions)
        ex = spec.executor
        gpus = ex.gpus_per_trial if spec.device != "cpu" else 0.0
        executor = make_executor(
            ex.kind, self.run_dir, ex.max_in_flight, spec.latency.threads, ex.address, gpus
        )
        if ex.kind == "inprocess" and ex.trial_timeout_s:
            say(
                "note: in-process, executor.trial_timeout is a signal that Python code sees; a native "
                "call that blocks signals runs past it (executor kind ray kills the task instead)"
            )
        jobs = Jobs(spec, baseline_dir)
        loop = SearchLoop(spec, study, space, distributions, executor, jobs, watch)
        stopped, error = "budget", None
        previous_term = signal.signal(signal.SIGTERM, _sigterm_as_interrupt)
        try:
            jobs.baseline = measure_baseline(study, executor, jobs)
            try:  # a constraint the baseline cannot anchor (a ratio to zero) fails before any trial
                constraints.check_baseline(spec.constraints, [o.name for o in spec.measured()], jobs.baseline)
            except ValueError as exc:
                raise StudyError(str(exc)) from None
            proposers = default_proposers(spec, space, distributions, baseline_dir)
            # The time budget is the search's: set-up (fetching, fine-tuning, the baseline
            # measurement, the sensitivity profile) does not spend it.
            deadline = time.monotonic() + spec.budget.timeout_s if spec.budget.timeout_s else None
            if deadline is not None:
                say(
                    f"set-up took {fmt_seconds(time.monotonic() - self.started)}; the search's "
                    f"{fmt_seconds(spec.budget.timeout_s or 0)} start now"
                )
            stopped = self.loop(loop, proposers, deadline)
            if spec.distill.mode == "finalists" and stopped not in ("timeout", "exhausted"):
                recipe = DistillRecipe.from_dict(dict(spec.distill.recipe)).to_dict()
                finalists = Finalists(spec.distill.finalists, recipe)
                chosen = finalists.candidates(study)
                if chosen:
                    numbers = [t.number for t in chosen]
                    say(f"stage two: distilling {len(chosen)} Pareto candidates: trials {numbers}")
                    budget = loop.spent() + len(chosen)
                    stopped = self.loop(loop, [Retries(distributions), finalists], deadline, budget=budget)
            if spec.remeasure_front:
                remeasure_front(study, executor, jobs)
        except KeyboardInterrupt as exc:
            stopped = "terminated" if isinstance(exc, Terminated) else "interrupted"
            say(f"{stopped}: cancelling running trials (they are retried first on a resume)")
        except RunAborted as exc:
            stopped, error = "aborted", str(exc)
            say(f"error: {exc}")
        finally:
            signal.signal(signal.SIGTERM, previous_term)
            loop.cancel_running(stopped)
            executor.shutdown()
        if stopped == "aborted" and not watch.intact():  # nothing left to write the front into
            print(f"\nslimsearch: error: {error}")
            return RunResult(self.run_dir, study, {}, [], stopped, {}, error)
        result = self.finish(study, dict(study.user_attrs.get("baseline", {})), stopped)
        result.error = error
        return result

    def loop(
        self,
        loop: SearchLoop,
        proposers: Sequence[Proposer],
        deadline: float | None,
        budget: int | None = None,
    ) -> str:
        return loop.run(proposers, deadline, budget)

    def finish(self, study: optuna.Study, baseline: dict[str, float], stopped: str) -> RunResult:
        objectives = [o.name for o in self.spec.objectives]
        rows = pareto.front_rows(study, objectives, baseline) if baseline else []
        pareto.write_csv(rows, self.run_dir / "pareto.csv")
        pareto.write_csv(pareto.all_rows(study, objectives, baseline), self.run_dir / "trials.csv")
        took = time.monotonic() - self.started
        url = storage_url(self.spec)
        counts = progress.summary(
            study, self.spec.name, rows, objectives, baseline, stopped, took, self.run_dir, url
        )
        return RunResult(self.run_dir, study, baseline, rows, stopped, counts)


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
