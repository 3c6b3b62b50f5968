"""The search loop: ask a proposer for a plan, submit it, tell Optuna what it measured.

    loop = SearchLoop(spec, study, space, distributions, executor, jobs)
    stopped = loop.run([Retries(...), Seeds(...), Refinement(...), Sampler()], deadline, budget)

Each free executor slot goes to the first proposer with a proposal (``search/proposers``).
A plan measured (or screened out) before is answered from that measurement: it is stored as
a trial (so the sampler learns from it) but spends no budget. The driver and the benchmarks
run this same loop; only the executor differs.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import optuna
from optuna.trial import Trial, TrialState

from slimsearch.search import constraints, progress, retry
from slimsearch.search import record as attr
from slimsearch.search.executors import Executor
from slimsearch.search.faults import FailureStreak, RunFolderWatch
from slimsearch.search.jobs import Jobs
from slimsearch.search.log import say
from slimsearch.search.proposers import Proposal, Proposer
from slimsearch.search.study_file import StudySpec
from slimsearch.search.worker import TrialResult
from slimsearch.spaces import CompressionPlan, SearchSpace
from slimsearch.spaces.methods.distill import DistillRecipe

# A trial past its timeout first gets TrialTimeout raised inside it; past this much more,
# its task is killed (code stuck in native calls cannot see the signal).
KILL_GRACE_S = 10.0
# Answered repeats cost no budget, so a sampler that only proposes measured plans (a small
# space, fully explored) would never stop: this many in a row end the run.
MAX_REPEATS_IN_A_ROW = 100


def constraint_values(
    spec: StudySpec, values: dict[str, float], baseline: dict[str, float]
) -> dict[str, float]:
    """Optuna constraint values: <= 0 means satisfied."""
    return constraints.violations(spec.constraints, [o.name for o in spec.measured()], values, baseline)


def distill_distributions(spec: StudySpec) -> dict[str, Any]:
    """Searched recipe knobs (every-trial mode), as fixed categorical distributions."""
    return {
        f"distill:{key}": optuna.distributions.CategoricalDistribution(list(values))
        for key, values in spec.distill.search.items()
    }


class SearchLoop:
    def __init__(
        self,
        spec: StudySpec,
        study: optuna.Study,
        space: SearchSpace,
        distributions: dict[str, Any],
        executor: Executor,
        jobs: Jobs,
        watch: RunFolderWatch | None = None,
    ) -> None:
        self.spec = spec
        self.study = study
        self.space = space
        self.distributions = distributions
        self.executor = executor
        self.jobs = jobs
        self.watch = watch
        self.objectives = [o.name for o in spec.objectives]
        self.running: dict[int, tuple[Trial, float]] = {}
        self.known: dict[str, TrialResult] = {}  # plan JSON -> its first measured result
        self.started = time.monotonic()
        self.done_here = 0  # trials finished by this loop (for the ETA)
        self.max_repeats = MAX_REPEATS_IN_A_ROW
        self.streak = FailureStreak(spec.executor.max_consecutive_failures)
        self.budget: int | None = spec.budget.trials
        self.remembered = False
        self.verbose = True  # one progress line per trial (benchmarks running many loops turn it off)

    def spent(self) -> int:
        """Finished trials that spent the budget (see retry.counts_toward_budget)."""
        return retry.tally(self.study.get_trials(deepcopy=False))["spent"]

    def run(
        self, proposers: Sequence[Proposer], deadline: float | None = None, budget: int | None = None
    ) -> str:
        """Run trials until the budget or the deadline is reached or the proposers run dry;
        returns why it stopped: "budget", "timeout" or "exhausted"."""
        study, executor = self.study, self.executor
        if not self.remembered:
            self.remember()
        self.budget = budget = budget if budget is not None else self.spec.budget.trials
        stopped = "budget"
        repeats = 0  # answered repeats in a row
        waited = dry = False
        while True:
            if self.watch is not None:
                self.watch.check()
            out_of_time = deadline is not None and time.monotonic() >= deadline
            if out_of_time and not study.get_trials(deepcopy=False, states=[TrialState.COMPLETE]):
                if not waited:  # so that the run always ends with a front
                    say("the search's time is up before any trial finished: waiting for the first one")
                    waited = True
                out_of_time = executor.in_flight() > 0
            if out_of_time:
                stopped = "timeout"
            while not out_of_time and not dry and executor.in_flight() < executor.capacity:
                if budget is not None and self.spent() + len(self.running) >= budget:
                    break
                if repeats >= self.max_repeats:
                    say(
                        f"the last {repeats} proposals were all plans measured before: the space looks "
                        "exhausted, so the search stops here"
                    )
                    return "exhausted"
                proposal = next((p for pr in proposers if (p := pr.propose(study)) is not None), None)
                if proposal is None:  # nothing left to propose (stage two's finalists are done)
                    dry = True
                    break
                trial = self.ask(proposal)
                plan = self.plan_of(trial)
                trial.set_user_attr(attr.PLAN, plan.to_dict())
                self.running[trial.number] = (trial, time.monotonic())
                earlier = self.known.get(plan.to_json())
                if earlier is not None:  # the same plan was measured before: answer from it
                    self.answer_repeat(trial, earlier)
                    repeats += 1
                    continue
                repeats = 0
                executor.submit(self.jobs.job(trial.number, plan))
            if executor.in_flight() == 0:
                return stopped
            for result in executor.poll(timeout=1.0) + self.overdue():
                self.tell(result)
                self.done_here += 1
                self.show(result)
                self.streak.note(None if result.values is not None or result.pruned else result.error or "?")

    def ask(self, proposal: Proposal) -> Trial:
        """The trial for a proposal: queued and claimed at once, so no queue ever builds up
        (a trial some older version queued is claimed first, as Optuna pops the oldest)."""
        if proposal.params is not None:
            self.study.enqueue_trial(proposal.params, user_attrs=proposal.attrs)
        return self.study.ask(fixed_distributions=self.distributions)

    def plan_of(self, trial: Trial) -> CompressionPlan:
        """The trial's plan: its space params decoded, with the distillation recipe it runs."""
        spec = self.spec
        plan = self.space.decode({k: v for k, v in trial.params.items() if not k.startswith("distill:")})
        recipe: dict[str, Any] | None = None
        if attr.DISTILL in trial.user_attrs:  # a second-stage finalist
            recipe = dict(trial.user_attrs[attr.DISTILL])
        elif spec.distill.mode == "every-trial":
            recipe = dict(spec.distill.recipe)
            recipe |= {k.split(":", 1)[1]: v for k, v in trial.params.items() if k.startswith("distill:")}
        if recipe is None or recipe.get("kind", "logits") == "off" or recipe.get("steps", 1) == 0:
            return plan
        return replace(plan, distill=DistillRecipe.from_dict(recipe).to_dict())

    def answer_repeat(self, trial: Trial, earlier: TrialResult) -> None:
        records = {k: v for k, v in earlier.records.items() if k == "screen"}
        values = dict(earlier.values) if earlier.values is not None else None
        records |= {attr.REUSED_FROM: earlier.number}
        reused = TrialResult(trial.number, values, records, pruned=earlier.pruned)
        self.tell(reused)
        self.show(reused)

    def show(self, result: TrialResult) -> None:
        if not self.verbose:
            return
        progress.trial_line(
            self.study,
            result,
            self.jobs.baseline,
            objectives=self.objectives,
            running=len(self.running),
            started=self.started,
            done_here=self.done_here,
            budget=self.budget,
        )

    def tell(self, result: TrialResult) -> None:
        study, baseline = self.study, self.jobs.baseline
        trial, _ = self.running.pop(result.number)
        trial.set_user_attr(attr.SECONDS, round(result.seconds, 2))
        trial.set_user_attr(attr.NODE, result.node)
        measured = result.pruned or result.values is not None
        if measured and attr.REUSED_FROM not in result.records:  # proposed again, it is answered from this
            self.known.setdefault(CompressionPlan.from_dict(trial.user_attrs[attr.PLAN]).to_json(), result)
        if result.pruned:
            trial.set_user_attr(attr.RECORDS, result.records)
            study.tell(trial, state=TrialState.PRUNED)
            return
        if result.values is None:
            trial.set_user_attr(attr.ERROR, result.error or "unknown error")
            trial.set_user_attr(attr.TRACEBACK, (result.traceback or "")[-4000:])
            study.tell(trial, state=TrialState.FAIL)
            say(f"trial {result.number} FAILED: {result.error}")
            return
        trial.set_user_attr(attr.METRICS, result.values)
        trial.set_user_attr(attr.RECORDS, result.records)
        self.jobs.note_quiet(result.records)
        source = trial.user_attrs.get(attr.DISTILLED_FROM)
        if source is not None:  # stage two: keep the before-distillation values beside the after
            before = attr.TrialRecord.of(study.get_trials(deepcopy=False)[source]).metrics
            trial.set_user_attr(attr.BEFORE_DISTILL, before)
        for key, value in constraint_values(self.spec, result.values, baseline).items():
            trial.set_constraint(key, value)
        study.tell(trial, [result.values[name] for name in self.objectives])

    def remember(self) -> None:
        """Plans measured (or screened out) in earlier runs: a repeat is answered from them."""
        self.remembered = True
        for t in self.study.get_trials(deepcopy=False, states=[TrialState.COMPLETE, TrialState.PRUNED]):
            record = attr.TrialRecord.of(t)
            if record.plan is None or record.is_repeat:
                continue
            key = CompressionPlan.from_dict(record.plan).to_json()
            records = record.records
            if t.state == TrialState.COMPLETE:
                self.known.setdefault(key, TrialResult(t.number, record.metrics, records))
            else:
                self.known.setdefault(key, TrialResult(t.number, None, records, pruned=True))

    def overdue(self) -> list[TrialResult]:
        """Cancel trials running past their timeout plus a grace period."""
        limit = self.spec.executor.trial_timeout_s
        if not limit:
            return []
        now = time.monotonic()
        out = []
        for number, (_, started) in list(self.running.items()):
            if now - started > limit + KILL_GRACE_S:
                reason = f"TrialTimeout: killed after {now - started:.0f}s (limit {limit:g}s)"
                result = self.executor.cancel(number, reason)
                if result is not None:
                    out.append(result)
        return out

    def cancel_running(self, stopped: str) -> None:
        """Trials cut short by the run stopping: FAILED, not counted, retried first next time."""
        for number in list(self.running):
            try:
                done = retry.fail_for_retry(
                    self.study,
                    self.study.get_trials(deepcopy=False)[number],
                    self.distributions,
                    f"cancelled: the run was {stopped}",
                    counted=False,
                )
                say(f"trial {number}: cancelled, {done}")
            except Exception as exc:  # the storage itself may be what failed
                say(f"trial {number}: could not be marked cancelled ({type(exc).__name__}: {exc})")
        self.running.clear()
