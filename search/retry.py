"""Trials that did not finish because the run stopped, and their second chance.

A trial left RUNNING by a killed driver (``kill -9``, a closed laptop) and a trial cancelled
by Ctrl-C or SIGTERM are both marked FAILED and queued again with their whole plan and the
attributes that say who proposed them (a seed, a refinement step, a stage-two
distillation); the ``Retries`` proposer (``search/proposers/retries.py``) runs them ahead of
every other proposal. A killed driver's trial may have been the cause, so it is retried once
(``MAX_RETRIES``); an interrupted one is not counted. Neither counts toward the trial
budget: its retry does.

A trial killed while its parameters were being written has only some of them. When it was
queued (a seed, a retry, a refinement step) the full plan is still known and is retried; a
sampler's half-drawn proposal is not, and the trial is marked plainly as not retried.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from slimsearch.search import record as attr
from slimsearch.search.log import say
from slimsearch.search.record import TrialRecord

MAX_RETRIES = 1


def full_params(trial: FrozenTrial, distributions: Mapping[str, Any]) -> dict[str, Any] | None:
    """The trial's whole parameter set, or None when part of it was never drawn."""
    if set(distributions) <= set(trial.params):
        return dict(trial.params)
    fixed = trial.system_attrs.get("fixed_params")  # set by enqueue_trial: the full plan
    if isinstance(fixed, Mapping) and set(distributions) <= set(fixed):
        return dict(fixed)
    return None


def fail_for_retry(
    study: optuna.Study, trial: FrozenTrial, distributions: Mapping[str, Any], reason: str, *, counted: bool
) -> str:
    """Mark an unfinished (RUNNING) trial FAILED, not counted toward the budget, and due for a
    retry with its whole plan (``retry_due``); returns what was done, for the log."""
    params = full_params(trial, distributions)
    retries = int(trial.user_attrs.get(attr.RETRIES, 0)) + (1 if counted else 0)
    live = optuna.trial.Trial(study, trial._trial_id)
    live.set_user_attr(attr.ORPHANED if counted else attr.INTERRUPTED, True)
    live.set_user_attr(attr.ERROR, reason)
    why_not = None
    if params is None:
        why_not = "it was stopped while the sampler was drawing its parameters"
    elif retries > MAX_RETRIES:
        why_not = "retry cap reached"
    if why_not is not None:
        live.set_user_attr(attr.NOT_RETRIED, why_not)
    if retries:
        live.set_user_attr(attr.RETRIES, retries)
    study.tell(trial.number, state=TrialState.FAIL)
    if params is None or why_not is not None:
        return f"not retried: {why_not}"
    return "to be retried first"


def retry_due(trial: FrozenTrial, distributions: Mapping[str, Any]) -> dict[str, Any] | None:
    """The params of a trial cut short by a stopped run and not yet retried, else None."""
    if trial.state != TrialState.FAIL or not TrialRecord.of(trial).cut_short:
        return None
    if attr.NOT_RETRIED in trial.user_attrs:
        return None
    return full_params(trial, distributions)


def retry_attrs(trial: FrozenTrial) -> dict[str, Any]:
    """A retry's user attributes: who proposed the original, and which trial it retries."""
    retries = int(trial.user_attrs.get(attr.RETRIES, 0))
    return TrialRecord.of(trial).proposed_by | {attr.RETRIES: retries, attr.RETRY_OF: trial.number}


def recover(study: optuna.Study, distributions: Mapping[str, Any]) -> None:
    """Trials an earlier driver left RUNNING (it was killed): FAILED, and retried once."""
    for t in study.get_trials(deepcopy=False, states=[TrialState.RUNNING]):
        done = fail_for_retry(
            study, t, distributions, "left running by a driver that was killed", counted=True
        )
        say(f"trial {t.number} was left running by an earlier driver: marked failed, {done}")


def counts_toward_budget(trial: FrozenTrial) -> bool:
    """Finished trials that spend the trial budget: not answered repeats (their plan was
    measured before), not trials cut short by the run stopping (their retry counts)."""
    if trial.state not in (TrialState.COMPLETE, TrialState.FAIL, TrialState.PRUNED):
        return False
    record = TrialRecord.of(trial)
    return not (record.is_repeat or record.cut_short)


def tally(trials: Sequence[FrozenTrial]) -> dict[str, int]:
    """How many trials spent the budget ("spent"), and of those how many completed and
    failed; how many repeated plans were answered from earlier trials."""
    spent = [t for t in trials if counts_toward_budget(t)]
    return {
        "spent": len(spent),
        "complete": sum(t.state == TrialState.COMPLETE for t in spent),
        "failed": sum(t.state == TrialState.FAIL for t in spent),
        "repeats": sum(TrialRecord.of(t).is_repeat for t in trials),
    }
