"""The proposer interface: who decides what the next trial's plan is.

The search loop asks its proposers in order, once per free slot, and runs the first
proposal it gets. A proposer is one small object:

- ``propose(study)`` is called just before a trial is asked for. It reads the study (its
  trials, their parameters and attributes) and returns a ``Proposal``: the parameters of one
  plan and the user attributes the trial should carry (who proposed it), or ``params=None``
  for "let the study's Optuna sampler draw it". It returns None when it has nothing to
  propose now (its seeds are spent, it is not its turn); the loop then asks the next one.
- It must not write to the study: the loop enqueues a proposal and asks for it at once
  (``study.enqueue_trial`` then ``study.ask``, Optuna's public API only), so only one
  queued trial ever waits and a proposer's order is the order trials run in.
- Its state lives in the study, not in the object: on a resume, a new proposer over the
  same study proposes what the killed run had not yet tried. A plan it proposed is tried
  (any trial, in any state, holds its parameters or queued parameters), so it does not
  propose it again; ``tried`` gives that set.
- Proposals are cheap (no model evaluation); the loop's trial pays for the measurement.

A proposer class registers itself by its ``name``; ``tests/test_proposer_conformance.py``
runs every registered proposer through the same suite (valid parameters, nothing written to
the study, no plan proposed twice unless ``may_repeat``, state recovered from the study).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

import optuna
from optuna.trial import FrozenTrial

from slimsearch.search.record import TrialRecord

REGISTRY: dict[str, type[Proposer]] = {}


@dataclass(frozen=True)
class Proposal:
    params: dict[str, Any] | None  # None: the study's sampler draws the trial
    attrs: dict[str, Any] = field(default_factory=dict)  # user attributes the trial carries


class Proposer:
    """One source of plans; see the module docstring for the contract."""

    name: ClassVar[str] = ""
    # True for a proposer that cannot know what was tried (the sampler): its repeats are
    # answered from storage by the loop instead.
    may_repeat: ClassVar[bool] = False

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if cls.name:
            REGISTRY[cls.name] = cls

    def propose(self, study: optuna.Study) -> Proposal | None:
        raise NotImplementedError


def params_key(params: Mapping[str, Any], names: Iterable[str] | None = None) -> str:
    """A comparable key for a parameter set, restricted to ``names`` when given."""
    if names is not None:
        wanted = set(names)
        params = {k: v for k, v in params.items() if k in wanted}
    return json.dumps(dict(params), sort_keys=True, default=str)


def trial_params(trial: FrozenTrial) -> dict[str, Any]:
    """A trial's parameters, or the queued ones of a trial still waiting for its ask."""
    fixed = trial.system_attrs.get("fixed_params")
    return dict(trial.params) if trial.params or not isinstance(fixed, Mapping) else dict(fixed)


def tried(study: optuna.Study, names: Iterable[str]) -> set[str]:
    """Keys (``params_key`` over ``names``) of every plan any trial of the study holds."""
    names = list(names)
    return {params_key(trial_params(t), names) for t in study.get_trials(deepcopy=False)}


def turn_due(study: optuna.Study, source_prefix: str) -> bool:
    """For a proposer that takes turns with the sampler: its steps (trials whose source starts
    with ``source_prefix``) have not outnumbered the sampler's own trials (seeds, retries
    and stage-two trials count for neither)."""
    sources = [TrialRecord.of(t).source for t in study.get_trials(deepcopy=False)]
    return sum(source.startswith(source_prefix) for source in sources) <= sources.count("sampler")
