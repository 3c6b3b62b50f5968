"""Front refinement: sensitivity-guided steps from the feasible Pareto front.

Seeds give the search good starting points, but a sampler over dozens of per-layer knobs
mostly proposes plans far from them (on MiniLM, 50 multivariate-TPE trials after the seeds
added 0.2% hypervolume). A refinement step instead takes a feasible front trial and
compresses it a little further where the sensitivity profile says it hurts least: each
searched knob's best next value (bytes saved per unit of estimated loss added, from the
profile's measured options), and the top 1, 2, 4, ... of those moves at once. A parent's
successive children take successively longer steps (then shorter ones, below where it
started); a child that stays feasible joins the front and is refined in turn, starting at
twice the step that made it, so the front walks down in size while the constraint holds.
A step that broke the constraint rules out the longer ones from the same parent (they hold
its moves), and screening rejects an overlong step in seconds. When a parent's prefixes
are spent, each lower-ranked move is tried by itself (a ranking is an estimate: the second
move alone may keep the constraint where the first broke it). When every front parent's
ranked steps are spent, each knob's milder values (int8 where the ranking took 4 bits) and
then its next larger value are tried one at a time: on a small space refinement walks the
front's whole single-knob neighbourhood before it gives its turns to the sampler.

    step = propose(study, space, profile)   # params of one new plan, or None
    # the Refinement proposer (search/proposers/refinement.py) hands it to the loop
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from slimsearch.search.proposers.base import turn_due
from slimsearch.search.record import REFINE_ALONE, REFINE_MOVES, REFINED_FROM, SEED, TrialRecord
from slimsearch.search.sensitivity import Profile, cost_floor, matching_option, off_params, option_cost
from slimsearch.spaces import SearchSpace

ATTR = REFINED_FROM  # user attribute a refinement trial carries: its parent's number
ALONE = REFINE_ALONE  # set on a child that took one lower-ranked move by itself


@dataclass(frozen=True)
class Move:
    param: str
    value: Any
    saved: int  # bytes
    ratio: float  # bytes saved per unit of estimated loss added


@dataclass(frozen=True)
class Proposal:
    params: dict[str, Any]
    parent: int
    moves: int
    alone: bool = False  # one lower-ranked move by itself, not a prefix of the ranking

    def user_attrs(self) -> dict[str, Any]:
        attrs = {SEED: "refine", ATTR: self.parent, REFINE_MOVES: self.moves}
        return attrs | ({ALONE: True} if self.alone else {})


def _single_moves(
    profile: Profile, params: Mapping[str, Any], off: Mapping[str, Any], larger: bool = False
) -> list[list[Move]]:
    """Per searched knob, every value that makes its unit smaller (``larger``: bigger) by
    changing that knob alone, best ratio first: bytes saved per loss added (``larger``:
    estimated loss taken back per byte added, ``saved`` then negative)."""
    floor = cost_floor(profile)
    out = []
    for options in profile.options.values():
        current = matching_option(options, params)
        if current is None:
            continue
        cost = option_cost(profile, current, off)
        unit: list[Move] = []
        for param in current.params:
            for o in options:
                changed = [p for p, v in o.params.items() if v != current.params[p]]
                if changed != [param] or o.bytes == current.bytes or (o.bytes > current.bytes) != larger:
                    continue
                saved = current.bytes - o.bytes
                if larger:
                    ratio = (max(cost - option_cost(profile, o, off), 0.0) + floor) / -saved
                else:
                    ratio = saved / (max(option_cost(profile, o, off) - cost, 0.0) + floor)
                unit.append(Move(param, o.params[param], saved, ratio))
        if unit:
            out.append(sorted(unit, key=lambda m: -m.ratio))
    return out


def moves(profile: Profile, params: Mapping[str, Any], off: Mapping[str, Any]) -> list[Move]:
    """For each searched knob, its best value that makes the unit smaller, best ratio first."""
    best = [unit[0] for unit in _single_moves(profile, params, off)]
    return sorted(best, key=lambda m: (-m.ratio, m.param))


def alternatives(profile: Profile, params: Mapping[str, Any], off: Mapping[str, Any]) -> list[Move]:
    """The single-knob steps ``moves`` passes over, best ratio first: each knob's milder
    values (int8 where 4 bits ranked first; a harsher one is reached from the child the
    best move makes), then each knob's next larger value (a front point more accurate than
    its neighbour may sit one level up from it)."""
    milder = [m for unit in _single_moves(profile, params, off) for m in unit[1:] if m.saved < unit[0].saved]
    up = [max(unit, key=lambda m: m.saved) for unit in _single_moves(profile, params, off, larger=True)]
    return sorted(milder, key=_by_ratio) + sorted(up, key=_by_ratio)


def _by_ratio(move: Move) -> tuple[float, str, str]:
    return (-move.ratio, move.param, str(move.value))


def _key(params: Mapping[str, Any]) -> str:
    return json.dumps(dict(params), sort_keys=True, default=str)


def propose(study: optuna.Study, space: SearchSpace, profile: Profile) -> Proposal | None:
    """A not-yet-tried step from the feasible front (study.best_trials), or None when every
    front trial has run out of new steps. Parents with the fewest children go first."""
    off = off_params(space)
    names = set(off)
    trials = study.get_trials(deepcopy=False)
    # A queued trial's params live in its fixed params until a sampler call fills them in.
    tried = {
        _key(off | {k: v for k, v in source.items() if k in names})
        for t in trials
        for source in (t.params, t.system_attrs.get("fixed_params", {}))
        if source
    }
    children: dict[int, int] = {}
    # The smallest step that broke the constraint, per parent: a longer step from there holds
    # the same moves and more, so it is not tried.
    broke: dict[int, int] = {}
    for t in trials:
        if ATTR not in t.user_attrs:
            continue
        parent_number = int(t.user_attrs[ATTR])
        children[parent_number] = children.get(parent_number, 0) + 1
        if _infeasible(t) and not t.user_attrs.get(ALONE):
            size = int(t.user_attrs.get(REFINE_MOVES, 1))
            broke[parent_number] = min(size, broke.get(parent_number, size))
    front: list[FrozenTrial] = [t for t in study.best_trials if not TrialRecord.of(t).distilled]
    front.sort(key=lambda t: (children.get(t.number, 0), t.number))
    # Every parent's ranked steps first; only when all of them are tried, the milder values
    # the ranking passed over and one level up, one knob at a time (on a small space, the
    # front's whole neighbourhood).
    for ranked_pass in (True, False):
        for parent in front:
            params = off | {k: v for k, v in parent.params.items() if k in names}
            if ranked_pass:
                steps = _ranked_steps(profile, parent, params, off, broke)
            else:
                steps = [([move], True) for move in alternatives(profile, params, off)]
            for chosen, alone in steps:
                child = dict(params) | {move.param: move.value for move in chosen}
                if _key(child) not in tried:
                    return Proposal(child, parent.number, len(chosen), alone)
    return None


def _ranked_steps(
    profile: Profile,
    parent: FrozenTrial,
    params: Mapping[str, Any],
    off: Mapping[str, Any],
    broke: Mapping[int, int],
) -> list[tuple[list[Move], bool]]:
    """A parent's steps in the order its children try them: (moves, taken alone)."""
    ranked = moves(profile, params, off)
    # A step that kept its child feasible is doubled from there on: a walk down the
    # front grows geometrically instead of one knob per trial.
    start = 2 * int(parent.user_attrs.get(REFINE_MOVES, 0)) or 1
    limit = broke.get(parent.number, len(ranked) + 1)
    # The ranking's prefixes first; then each lower-ranked move by itself, so every ranked
    # move is reachable even when the prefixes holding it broke the constraint.
    steps = [(ranked[:count], False) for count in step_sizes(start, len(ranked)) if count < limit]
    return steps + [([move], True) for move in ranked[1:]]


def _infeasible(trial: FrozenTrial) -> bool:
    """Rejected by screening, or complete with a constraint violated."""
    if trial.state == TrialState.PRUNED:
        return True
    return trial.state == TrialState.COMPLETE and any(c > 0 for c in trial.constraints.values())


def step_sizes(start: int, available: int) -> list[int]:
    """Moves per child, in the order a parent's children try them: powers of two from
    ``start`` up (the last one taking every available move), then down from below it."""
    if available < 1:
        return []
    sizes = [1 << i for i in range(available.bit_length()) if 1 << i < available] + [available]
    start = min(start, available)
    up = [n for n in sizes if n >= start]
    down = [n for n in sizes if n < start][::-1]
    return up + down


def should_refine(study: optuna.Study) -> bool:
    """Half of the trials after the seeds: refine when refinements have not outnumbered the
    sampler's own trials (seeds, retries and stage-two trials count for neither)."""
    return turn_due(study, "refined from")
