"""The answer: trials as rows, the Pareto front as a table and CSV."""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from slimsearch.search.record import TrialRecord
from slimsearch.spaces import CompressionPlan

CONSTRAINT_PREFIX = "constraints:"


def violation(trial: FrozenTrial) -> float:
    """Total amount by which a trial breaks its constraints (0 when feasible)."""
    return sum(max(0.0, float(v)) for k, v in trial.system_attrs.items() if k.startswith(CONSTRAINT_PREFIX))


def trial_row(
    trial: FrozenTrial,
    objectives: Sequence[str],
    baseline: dict[str, float],
    final: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """One trial as a table row; ``final`` holds re-measured values that replace the trial's."""
    row: dict[str, Any] = {"trial": trial.number}
    values = dict(zip(objectives, trial.values or [], strict=False))
    for name, value in (final or {}).items():
        if name in values and isinstance(value, (int, float)):
            values[name] = float(value)
    for name, value in values.items():
        row[name] = value
        base = baseline.get(name)
        if name == "accuracy" and base is not None:
            row["accuracy_drop"] = base - value
        elif base and not name.endswith("_ratio"):
            row[f"{name}_ratio"] = value / base
    row["feasible"] = violation(trial) == 0.0
    plan = trial.user_attrs.get("plan")
    row["plan"] = CompressionPlan.from_dict(plan).summary() if plan else ""
    return row


def is_repeat(trial: FrozenTrial) -> bool:
    """A trial answered from an earlier one with the same plan (nothing was measured)."""
    return TrialRecord.of(trial).is_repeat


def distinct(trials: Sequence[FrozenTrial]) -> list[FrozenTrial]:
    """``trials`` (e.g. Optuna's best trials), each plan once: the trial that measured it."""
    seen: set[str] = set()
    out = []
    for t in sorted(trials, key=lambda t: (is_repeat(t), t.number)):
        key = json.dumps(t.user_attrs.get("plan"), sort_keys=True)
        if key not in seen:
            seen.add(key)
            out.append(t)
    return sorted(out, key=lambda t: t.number)


def _dominated(
    row: dict[str, Any], other: dict[str, Any], signs: Sequence[int], names: Sequence[str]
) -> bool:
    pairs = [(s * float(other[n]), s * float(row[n])) for s, n in zip(signs, names, strict=True)]
    return all(o <= r for o, r in pairs) and any(o < r for o, r in pairs)


def front_rows(
    study: optuna.Study, objectives: Sequence[str], baseline: dict[str, float]
) -> list[dict[str, Any]]:
    """The Pareto front as table rows, sorted by the first objective: the feasible,
    non-dominated trials, each distinct plan once.

    Latency values re-measured at the end of the run replace the trial-time ones, and the
    front is then taken again on those numbers: a row dominated on what it shows is dropped.
    """
    final = study.user_attrs.get("final_latency", {})
    rows = [trial_row(t, objectives, baseline, final.get(str(t.number))) for t in distinct(study.best_trials)]
    signs = [1 if d == optuna.study.StudyDirection.MINIMIZE else -1 for d in study.directions]
    names = list(objectives)
    rows = [r for r in rows if not any(_dominated(r, o, signs, names) for o in rows if o is not r)]
    first = objectives[0]
    reverse = study.directions[0] == optuna.study.StudyDirection.MAXIMIZE
    return sorted(rows, key=lambda r: r[first], reverse=reverse)


def nearest_infeasible(
    study: optuna.Study, objectives: Sequence[str], baseline: dict[str, float], n: int = 5
) -> list[dict[str, Any]]:
    done = study.get_trials(deepcopy=False, states=[TrialState.COMPLETE])
    done = sorted(done, key=violation)[:n]
    return [trial_row(t, objectives, baseline) | {"violation": violation(t)} for t in done]


def all_rows(
    study: optuna.Study, objectives: Sequence[str], baseline: dict[str, float]
) -> list[dict[str, Any]]:
    rows = []
    for t in study.get_trials(deepcopy=False):
        if t.state == TrialState.COMPLETE:
            row = trial_row(t, objectives, baseline)
        else:
            row = {"trial": t.number, "plan": "", "feasible": False}
        row["state"] = t.state.name
        row["error"] = t.user_attrs.get("error", "")
        row["source"] = trial_source(t)
        rows.append(row)
    return rows


def trial_source(trial: FrozenTrial) -> str:
    """Who proposed the trial (see TrialRecord.source)."""
    return TrialRecord.of(trial).source


def _fmt(value: Any) -> str:
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if abs(value) >= 1e5:
            return f"{value / 1e6:.2f}M"
        return f"{value:.3f}" if abs(value) < 10 else f"{value:.2f}"
    return str(value)


def format_table(rows: Sequence[dict[str, Any]], max_plan: int = 60) -> str:
    if not rows:
        return "(no rows)"
    columns: list[str] = []
    for row in rows:
        columns += [c for c in row if c not in columns]
    cells = [[_fmt(row.get(c, ""))[: max_plan if c == "plan" else None] for c in columns] for row in rows]
    widths = [max(len(c), *(len(r[i]) for r in cells)) for i, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)) for r in cells]
    return "\n".join(lines)


def write_csv(rows: Sequence[dict[str, Any]], path: Path) -> None:
    columns: list[str] = []
    for row in rows:
        columns += [c for c in row if c not in columns]
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns or ["trial"])
        writer.writeheader()
        writer.writerows(rows)
