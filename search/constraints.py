"""Constraints: bounds on any measured metric, relative to the baseline or absolute.

A study writes them as the named keys (``max_accuracy_drop: 1.0``) or as a list of
``{metric: NAME, BOUND: value}`` where BOUND is one of BOUNDS, or ``limit``, which reads the
evaluator's own comparison (``compare``: "difference" or "ratio") and direction: a
difference on a maximized metric is ``max_drop``, a ratio on a minimized one ``max_ratio``.
Each is kept in the study spec as ``key -> limit``; a listed one's key is ``metric.bound``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

BOUNDS = ("max_drop", "max_increase", "max_ratio", "min_ratio", "max", "min")
COMPARES = ("difference", "ratio")

# The named keys: (metric, bound).
NAMED = {
    "max_accuracy_drop": ("accuracy", "max_drop"),
    "max_perplexity_ratio": ("perplexity", "max_ratio"),
    "max_size_ratio": ("size_bytes", "max_ratio"),
    "max_latency_ratio": ("latency_ms", "max_ratio"),
    "max_memory_ratio": ("memory_bytes", "max_ratio"),
}


@dataclass(frozen=True)
class Constraint:
    key: str
    metric: str
    bound: str

    @property
    def relative(self) -> bool:
        return self.bound not in ("max", "min")

    def violation(self, value: float, baseline: float | None, limit: float) -> float:
        """Optuna's constraint value: <= 0 when ``value`` satisfies it."""
        if self.relative and baseline is None:
            raise ValueError(f"constraints.{self.key}: the baseline has no {self.metric!r} to compare to")
        if self.bound == "max_drop":
            return (baseline - value) - limit  # type: ignore[operator]
        if self.bound == "max_increase":
            return (value - baseline) - limit  # type: ignore[operator]
        if self.bound in ("max_ratio", "min_ratio"):
            if not baseline:
                raise ValueError(
                    f"constraints.{self.key}: the baseline's {self.metric} is {baseline}, so a ratio to it "
                    "means nothing; bound the difference (max_drop / max_increase) or the value (max / min)"
                )
            ratio = value / baseline
            return ratio - limit if self.bound == "max_ratio" else limit - ratio
        return value - limit if self.bound == "max" else limit - value


def resolve(key: str, metrics: Iterable[str]) -> Constraint:
    """The constraint a spec key names; max_latency_ratio reads latency_ratio (already a
    ratio, so its bound is its value) when the study measures that instead of latency_ms."""
    names = set(metrics)
    if key in NAMED:
        metric, bound = NAMED[key]
        if key == "max_latency_ratio" and "latency_ratio" in names:
            return Constraint(key, "latency_ratio", "max")
        return Constraint(key, metric, bound)
    metric, _, bound = key.rpartition(".")
    return Constraint(key, metric, bound)


def violations(
    constraints: Mapping[str, float],
    metrics: Iterable[str],
    values: Mapping[str, float],
    baseline: Mapping[str, float],
) -> dict[str, float]:
    names = list(metrics)
    out = {}
    for key, limit in constraints.items():
        c = resolve(key, names)
        out[key] = c.violation(values[c.metric], baseline.get(c.metric), limit)
    return out


def limit_on(constraints: Mapping[str, float], metric: str, bound: str) -> float | None:
    """The limit the study puts on ``metric`` with ``bound``, however it was written."""
    for key, limit in constraints.items():
        c = resolve(key, ())
        if (c.metric, c.bound) == (metric, bound):
            return limit
    return None


def check_baseline(
    constraints: Mapping[str, float], metrics: Iterable[str], baseline: Mapping[str, float]
) -> None:
    """ValueError naming the constraint when the baseline cannot anchor it (no value, or a
    zero one under a ratio); called once the baseline is measured, before any trial."""
    names = list(metrics)
    for key, limit in constraints.items():
        c = resolve(key, names)
        if c.metric not in baseline:
            raise ValueError(f"constraints.{key}: the baseline has no {c.metric!r} to compare to")
        c.violation(baseline[c.metric], baseline[c.metric], limit)


def bound_of(limit_key: str, evaluator: Any, where: str) -> str:
    """The bound ``limit_key`` means for ``evaluator`` ('limit': from its compare and direction)."""
    if limit_key != "limit":
        return limit_key
    compare = getattr(evaluator, "compare", "difference")
    if compare not in COMPARES:
        raise ValueError(
            f"{where}: the evaluator {evaluator.name!r} declares compare={compare!r}; it must be one of "
            f"{list(COMPARES)} (or write the bound itself: one of {list(BOUNDS)})"
        )
    maximize = evaluator.direction == "maximize"
    if compare == "difference":
        return "max_drop" if maximize else "max_increase"
    return "min_ratio" if maximize else "max_ratio"


def parse_listed(item: Any, where: str, evaluators: Mapping[str, Any]) -> tuple[str, float]:
    """(spec key, limit) of one ``{metric: NAME, BOUND: value}`` entry; ValueError naming
    what is wrong and what is allowed."""
    if not isinstance(item, Mapping) or "metric" not in item:
        raise ValueError(
            f"{where}: give {{metric: NAME, max_drop: 1.0}} (bounds: {', '.join(BOUNDS)}, limit)"
        )
    metric = str(item["metric"])
    if metric not in evaluators:
        raise ValueError(
            f"{where}.metric: {metric!r} is not measured by this study; measured: {sorted(evaluators)} "
            "(add it to objectives, or to metrics to measure it without optimizing it)"
        )
    given = [k for k in item if k != "metric"]
    if len(given) != 1 or given[0] not in (*BOUNDS, "limit"):
        raise ValueError(
            f"{where}: give exactly one bound beside metric, one of {[*BOUNDS, 'limit']}; got {given}"
        )
    value = item[given[0]]
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{where}.{given[0]}: {value!r} is not a number")
    bound = bound_of(given[0], evaluators[metric], where)
    if bound in ("max_ratio", "min_ratio") and value <= 0:
        raise ValueError(f"{where}.{given[0]}: a ratio bound must be positive, got {value}")
    return f"{metric}.{bound}", float(value)
