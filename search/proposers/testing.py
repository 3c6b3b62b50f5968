"""The conformance suite every proposer passes (``tests/test_proposer_conformance.py``).

    check_proposer(make, study, distributions, evaluate)

``make(study)`` builds the proposer over a study (called again midway, as a resumed run
builds a new one); ``evaluate(params)`` gives a trial's objective values. The suite runs up
to ``steps`` trials the way the loop does (enqueue the proposal, ask, tell) and checks the
contract in ``base.py``: proposing writes nothing, parameters lie in the distributions,
attributes are JSON, no plan is proposed twice (unless ``may_repeat``), and a proposer
built afresh over the study does not propose what was tried before it.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import optuna
from optuna.distributions import BaseDistribution, CategoricalDistribution
from optuna.trial import TrialState

from slimsearch.search.proposers.base import Proposal, Proposer, params_key


def _snapshot(study: optuna.Study) -> list[tuple[Any, ...]]:
    return [
        (
            t.number,
            t.state,
            json.dumps(t.params, sort_keys=True, default=str),
            json.dumps(t.user_attrs, default=str),
        )
        for t in study.get_trials(deepcopy=False)
    ]


def _check_params(proposal: Proposal, distributions: Mapping[str, BaseDistribution]) -> None:
    json.dumps(proposal.attrs)  # user attributes must be JSON
    if proposal.params is None:
        return
    unknown = set(proposal.params) - set(distributions)
    assert not unknown, f"proposed parameters outside the distributions: {sorted(unknown)}"
    for name, value in proposal.params.items():
        dist = distributions[name]
        if isinstance(dist, CategoricalDistribution):
            assert value in dist.choices, f"{name}={value!r} is not one of {dist.choices}"


def check_proposer(
    make: Callable[[optuna.Study], Proposer],
    study: optuna.Study,
    distributions: Mapping[str, BaseDistribution],
    evaluate: Callable[[Mapping[str, Any]], Sequence[float]],
    steps: int = 12,
) -> list[Proposal]:
    """Run the suite; returns the proposals made (at least one is required)."""
    proposer = make(study)
    made: list[Proposal] = []
    keys: list[str] = []
    for step in range(steps):
        if step == steps // 2:
            proposer = make(study)  # a resumed run: its state must come from the study
        before = _snapshot(study)
        proposal = proposer.propose(study)
        assert _snapshot(study) == before, f"{type(proposer).__name__}.propose wrote to the study"
        if proposal is None:
            break
        again = proposer.propose(study)
        assert again == proposal, "two calls without a trial in between proposed different plans"
        _check_params(proposal, distributions)
        if proposal.params is not None:
            study.enqueue_trial(proposal.params, user_attrs=proposal.attrs)
        trial = study.ask(fixed_distributions=dict(distributions))
        key = params_key(trial.params)
        if not proposer.may_repeat:
            assert key not in keys, f"{type(proposer).__name__} proposed {trial.params} twice"
        for name, value in proposal.attrs.items():
            assert trial.user_attrs.get(name) == value
        made.append(proposal)
        keys.append(key)
        study.tell(trial, list(evaluate(trial.params)))
    assert made, f"{type(proposer).__name__} proposed nothing on the suite's study"
    assert not study.get_trials(deepcopy=False, states=[TrialState.WAITING]), "a queued trial was left"
    return made
