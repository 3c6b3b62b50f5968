"""Evolution in the manner of EvoPress: mutations that move compression between layers at
constant size, from the feasible front.

EvoPress (Sieberling et al., 2024) searches per-layer compression levels at a fixed total
size: a child is its parent with one to three *level switches* (one layer compressed one
level further, another one level less, so the size holds) and selection keeps the children
that score best on growing subsets of the calibration data. Here every feasible front trial
is a parent (the front is the population, one per size), so the search improves quality at
each size the front already reaches while refinement (``refinement.py``) walks it down in
size. A switch pairs a unit's next smaller option with the other unit's larger option whose
added bytes come closest to the saved ones; a pair more than ``TOLERANCE`` apart is no
switch (units of very different sizes have none), and a parent with no switch at all takes
one random single-level step up or down instead.

Selection in stages, cheapest first: ``OFFSPRING`` random children per parent are ranked by
the sensitivity profile's additive estimate (no tokens), the best untried one becomes a
trial, where screening (``screening:``, a small token subset) rejects a bad child in seconds
before the full evaluation; a child that beats its parent joins the front and is mutated in
turn. Unlike EvoPress, children are not all scored on a token subset first: here each
costs a model build, so the profile stands in for that first subset.

Every other trial after the seeds and refinement steps, as refinement shares with the
sampler. The random draws are seeded by the parent and how many children it has, so the
same study gives the same proposal (a resumed run goes on where it stopped).
"""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from typing import Any

import optuna

from slimsearch.search.proposers.base import Proposal, Proposer, params_key, tried, turn_due
from slimsearch.search.record import EVOLVE_SWITCHES, EVOLVED_FROM, SEED, TrialRecord
from slimsearch.search.sensitivity import Option, Profile, matching_option, off_params, option_cost
from slimsearch.spaces import SearchSpace

OFFSPRING = 16  # random children drawn per parent and round, ranked by the profile
ROUNDS = 4  # fresh draws per parent before the next parent is tried
TOLERANCE = 0.25  # a switch's bytes may differ by this fraction of the bytes it moves


class Evolution(Proposer):
    name = "evolution"

    def __init__(self, space: SearchSpace, profile: Profile, seed: int = 0) -> None:
        self.space = space
        self.profile = profile
        self.seed = seed

    def propose(self, study: optuna.Study) -> Proposal | None:
        if not should_evolve(study):
            return None
        off = off_params(self.space)
        seen = tried(study, off)
        children: dict[int, int] = {}
        for t in study.get_trials(deepcopy=False):
            if EVOLVED_FROM in t.user_attrs:
                number = int(t.user_attrs[EVOLVED_FROM])
                children[number] = children.get(number, 0) + 1
        front = [t for t in study.best_trials if not TrialRecord.of(t).distilled]
        front.sort(key=lambda t: (children.get(t.number, 0), t.number))
        for parent in front:
            params = off | {k: v for k, v in parent.params.items() if k in off}
            for round_ in range(ROUNDS):
                rng = random.Random(f"{self.seed}:{parent.number}:{children.get(parent.number, 0)}:{round_}")
                best = self._best_child(rng, params, off, seen)
                if best is not None:
                    child, switches = best
                    attrs = {SEED: "evolve", EVOLVED_FROM: parent.number, EVOLVE_SWITCHES: switches}
                    return Proposal(child, attrs)
        return None

    def _best_child(
        self, rng: random.Random, params: dict[str, Any], off: Mapping[str, Any], seen: set[str]
    ) -> tuple[dict[str, Any], int] | None:
        """The untried child with the lowest estimated loss among ``OFFSPRING`` draws."""
        ranked: list[tuple[float, int, str, dict[str, Any]]] = []
        for _ in range(OFFSPRING):
            drawn = mutate(rng, self.profile, params)
            if drawn is None:
                return None
            child, switches = drawn
            key = params_key(child, off)
            if key in seen:
                continue
            ranked.append((self.estimate(child, off), switches, key, child))
        if not ranked:
            return None
        _, switches, _, child = min(ranked, key=lambda r: r[:3])
        return child, switches

    def estimate(self, params: Mapping[str, Any], off: Mapping[str, Any]) -> float:
        """The profile's additive loss estimate of a plan."""
        total = 0.0
        for options in self.profile.options.values():
            option = matching_option(options, params)
            if option is not None:
                total += option_cost(self.profile, option, off)
        return total


def mutate(
    rng: random.Random, profile: Profile, params: Mapping[str, Any]
) -> tuple[dict[str, Any], int] | None:
    """A child of ``params`` and its number of level switches (0: a single-level step, when
    no switch exists), or None when no unit of the plan can move at all."""
    current = {u: o for u, options in profile.options.items() if (o := matching_option(options, params))}
    if not current:
        return None
    # EvoPress draws the number of switches as min of two uniform draws from 1..3.
    wanted = min(rng.randint(1, 3), rng.randint(1, 3))
    child = dict(params)
    switches = 0
    for _ in range(wanted):
        switch = _switch(rng, profile, current)
        if switch is None:
            break
        for unit, option in switch:
            current[unit] = option
            child.update(option.params)
        switches += 1
    if switches:
        return child, switches
    step = _step(rng, profile, current)
    if step is None:
        return None
    _, option = step
    child.update(option.params)
    return child, 0


def _smaller(options: Sequence[Option], current: Option) -> list[Option]:
    """The unit's next level down: its largest options below ``current``."""
    below = [o for o in options if o.bytes < current.bytes]
    top = max((o.bytes for o in below), default=None)
    return [o for o in below if o.bytes == top]


def _switch(
    rng: random.Random, profile: Profile, current: Mapping[str, Option]
) -> list[tuple[str, Option]] | None:
    """One level down on a random unit, and on another unit the larger option whose added
    bytes best match the saved ones; None when no pair comes within ``TOLERANCE``."""
    units = list(current)
    rng.shuffle(units)
    for down in units:
        lower = _smaller(profile.options[down], current[down])
        if not lower:
            continue
        new = rng.choice(lower)
        saved = current[down].bytes - new.bytes
        best: tuple[int, float, str, Option] | None = None
        for up in units:
            if up == down:
                continue
            for o in profile.options[up]:
                added = o.bytes - current[up].bytes
                if added <= 0:
                    continue
                gap = abs(added - saved)
                score = (gap, rng.random(), up, o)
                if gap <= TOLERANCE * saved and (best is None or score[:2] < best[:2]):
                    best = score
        if best is not None:
            return [(down, new), (best[2], best[3])]
    return None


def _step(rng: random.Random, profile: Profile, current: Mapping[str, Option]) -> tuple[str, Option] | None:
    """A random unit one level down or up (its closest option in bytes on that side)."""
    moves: list[tuple[str, Option]] = []
    for unit, option in current.items():
        options = profile.options[unit]
        moves += [(unit, o) for o in _smaller(options, option)]
        above = [o for o in options if o.bytes > option.bytes]
        low = min((o.bytes for o in above), default=None)
        moves += [(unit, o) for o in above if o.bytes == low]
    return rng.choice(moves) if moves else None


def should_evolve(study: optuna.Study) -> bool:
    """Evolution steps have not outnumbered the sampler's own trials."""
    return turn_due(study, "evolved from")
