"""Every attribute slimsearch stores on an Optuna trial, named once, and a typed view of them.

Who writes what:
- a proposer, when the trial is queued (who proposed it): ``seed`` (uniform, sensitivity,
  refine, evolve), ``refined_from`` / ``refine_moves`` / ``refine_alone`` (a refinement step),
  ``evolved_from`` / ``evolve_switches`` (an evolution step),
  ``distill`` / ``distilled_from`` (a stage-two finalist), ``retries`` / ``retry_of`` (a retry);
- the loop, when the trial is asked for and when it finishes: ``plan``, ``seconds``,
  ``node``, then ``metrics`` and ``records`` (measured or screened; ``records.reused_from``
  on a repeat answered from an earlier trial), or ``error`` and ``traceback``, and
  ``before_distill`` for a finalist;
- ``retry.fail_for_retry``, for a trial a stopped run cut short: ``interrupted`` (Ctrl-C,
  SIGTERM) or ``orphaned`` (a killed driver), ``error``, ``retries``, and ``not_retried``
  with the reason when it is not retried.

    record = TrialRecord.of(frozen_trial)
    record.source, record.is_repeat, record.cut_short
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from optuna.trial import FrozenTrial

PLAN, METRICS, RECORDS, SECONDS, NODE = "plan", "metrics", "records", "seconds", "node"
ERROR, TRACEBACK, BEFORE_DISTILL = "error", "traceback", "before_distill"
SEED, REFINED_FROM, REFINE_MOVES, REFINE_ALONE = "seed", "refined_from", "refine_moves", "refine_alone"
DISTILL, DISTILLED_FROM = "distill", "distilled_from"
EVOLVED_FROM, EVOLVE_SWITCHES = "evolved_from", "evolve_switches"
RETRIES, RETRY_OF = "retries", "retry_of"
INTERRUPTED, ORPHANED, NOT_RETRIED = "interrupted", "orphaned", "not_retried"
REUSED_FROM = "reused_from"  # a key of ``records``

# Set by the loop as a trial runs and finishes.
RESULT_KEYS = frozenset({PLAN, METRICS, RECORDS, SECONDS, NODE, ERROR, TRACEBACK, BEFORE_DISTILL})
# Set when a stopped run cut the trial short, or by its retry.
CUT_SHORT_KEYS = frozenset({RETRIES, RETRY_OF, INTERRUPTED, ORPHANED, NOT_RETRIED})
NOT_COUNTED = (INTERRUPTED, ORPHANED)  # a trial with one of these spends no budget
# Everything else a trial carries says who proposed it, and comes back on its retry.
PROPOSER_KEYS = frozenset(
    {SEED, REFINED_FROM, REFINE_MOVES, REFINE_ALONE, DISTILL, DISTILLED_FROM, EVOLVED_FROM, EVOLVE_SWITCHES}
)


@dataclass(frozen=True)
class TrialRecord:
    number: int
    attrs: Mapping[str, Any] = field(default_factory=dict)

    @classmethod
    def of(cls, trial: FrozenTrial) -> TrialRecord:
        return cls(trial.number, trial.user_attrs)

    @property
    def plan(self) -> dict[str, Any] | None:
        return self.attrs.get(PLAN)

    @property
    def metrics(self) -> dict[str, float]:
        return dict(self.attrs.get(METRICS, {}))

    @property
    def records(self) -> dict[str, Any]:
        return dict(self.attrs.get(RECORDS, {}))

    @property
    def distilled(self) -> bool:
        """The plan carries a distillation recipe (every-trial mode, or a finalist)."""
        return bool((self.plan or {}).get(DISTILL))

    @property
    def is_repeat(self) -> bool:
        """Answered from an earlier trial with the same plan (nothing was measured)."""
        return REUSED_FROM in self.attrs.get(RECORDS, {})

    @property
    def cut_short(self) -> bool:
        """Stopped by the run (not by its own fault): it spends no budget; its retry does."""
        return any(self.attrs.get(key) for key in NOT_COUNTED)

    @property
    def proposed_by(self) -> dict[str, Any]:
        """The attributes that say who proposed the trial (a retry carries them again)."""
        return {k: v for k, v in self.attrs.items() if k not in RESULT_KEYS | CUT_SHORT_KEYS}

    @property
    def source(self) -> str:
        """Who proposed the trial: a seed family, a refinement step (and its parent), a
        retry, stage-two distillation, or the sampler."""
        attrs = self.attrs
        if DISTILLED_FROM in attrs:
            return f"distilled from {attrs[DISTILLED_FROM]}"
        if RETRY_OF in attrs:
            return f"retry of {attrs[RETRY_OF]}"
        if attrs.get(SEED) == "refine":
            return f"refined from {attrs.get(REFINED_FROM)}"
        if attrs.get(SEED) == "evolve":
            return f"evolved from {attrs.get(EVOLVED_FROM)}"
        if SEED in attrs:
            return f"{attrs[SEED]} seed"
        return "sampler"
