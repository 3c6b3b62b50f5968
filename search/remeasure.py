"""The front's latency, measured again at the end, each trial in a fresh process."""

from __future__ import annotations

from dataclasses import replace

import optuna

from slimsearch.search import pareto
from slimsearch.search.baseline import run_alone
from slimsearch.search.executors import Executor
from slimsearch.search.jobs import Jobs
from slimsearch.search.log import say
from slimsearch.search.worker import timing_objectives
from slimsearch.spaces import CompressionPlan


def remeasure_front(study: optuna.Study, executor: Executor, jobs: Jobs) -> None:
    """Time the front's trials again, each in a fresh process, interleaved with the baseline."""
    timing = timing_objectives(jobs.spec.objectives)
    done = study.user_attrs.get("final_latency", {})
    front = [t for t in pareto.distinct(study.best_trials) if str(t.number) not in done]
    if not timing or not front:
        return
    say(f"re-measuring the latency of {len(front)} front trials in fresh processes")
    final = dict(done)
    for trial in front:
        # Distillation changes weights, not shapes: timing the undistilled structure is
        # the same measurement without retraining; screening is for quality, not timing.
        plan = replace(CompressionPlan.from_dict(trial.user_attrs["plan"]), distill=None)
        job = replace(jobs.job(trial.number, plan), objectives=timing, screen=None)
        result = run_alone(executor, job, fresh_process=True)
        if result.values is None:
            say(f"re-measuring trial {trial.number} failed: {result.error}")
            continue
        lat = result.records.get("latency", {})
        final[str(trial.number)] = result.values | {"ratio": lat.get("ratio"), "noisy": lat.get("noisy")}
    study.set_user_attr("final_latency", final)
