"""The uncompressed baseline's measurement, once per study, and running one job alone."""

from __future__ import annotations

import optuna

from slimsearch.search.executors import Executor
from slimsearch.search.faults import RunAborted
from slimsearch.search.jobs import Jobs
from slimsearch.search.log import say
from slimsearch.search.worker import TrialJob, TrialResult
from slimsearch.spaces import CompressionPlan


def run_alone(executor: Executor, job: TrialJob, fresh_process: bool = False) -> TrialResult:
    """Run one job outside the search loop and wait for it."""
    executor.submit(job, fresh_process=fresh_process)
    results: list[TrialResult] = []
    while not results:
        results = executor.poll(timeout=5.0)
    return results[0]


def measure_baseline(study: optuna.Study, executor: Executor, jobs: Jobs) -> dict[str, float]:
    """The stored baseline values, or the baseline measured now (and stored)."""
    stored = study.user_attrs.get("baseline")
    if stored:
        jobs.note_quiet(study.user_attrs.get("baseline_records", {}))
        return dict(stored)
    say("measuring the uncompressed baseline")
    result = run_alone(executor, jobs.job(-1, CompressionPlan()))
    if result.values is None:  # every trial would fail the same way
        say(f"the baseline's measurement failed:\n{result.traceback or result.error}")
        raise RunAborted(
            f"the uncompressed baseline could not be evaluated ({result.error}); fix the cause "
            "(the traceback is above) and run the study again"
        )
    study.set_user_attr("baseline", result.values)
    study.set_user_attr("baseline_records", result.records)
    jobs.note_quiet(result.records)
    say("baseline: " + ", ".join(f"{k} {v:.4g}" for k, v in result.values.items()))
    return result.values
