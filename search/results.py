"""A finished (or running) study's results from Python: ``open_run(path)``.

The run folder's ``run.json`` says where the Optuna storage is; everything else (the
baseline's metrics, each trial's plan and measurements) is read from the study itself.
``Run.pareto()`` and ``Run.trials()`` are pandas DataFrames; ``Run.export`` rebuilds a trial.

Objectives are also put on a common "loss" scale relative to the baseline (accuracy drop in
points, ratios for size/latency/perplexity) so fronts can be compared across models, with a
fixed reference point for the hypervolume and a knee point (the front point nearest to the
utopia point after normalizing each axis over the front).
"""

from __future__ import annotations

import datetime as dt
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import optuna
import pandas as pd
import yaml
from optuna.trial import FrozenTrial, TrialState

from slimsearch.search import models, pareto
from slimsearch.search.constraints import resolve
from slimsearch.search.study_file import StudyError, StudySpec, study_from_mapping
from slimsearch.spaces import CompressionPlan
from slimsearch.spaces.methods import registry

if TYPE_CHECKING:
    from slimsearch.search.export import ExportReport

RUN_INFO = "run.json"  # the driver's file (driver.RUN_INFO); not imported to keep this light


def knob_order() -> tuple[str, ...]:
    """The layer methods as the results table and report list them: the last stage first
    (bits, sparsity, rank for the built-in ones)."""
    methods = registry.methods("linear")
    ranked = sorted(methods, key=lambda m: -registry.STAGES.index(m.stage))
    return tuple(m.name for m in ranked)


# Reference points for objectives that no constraint bounds: a trial must be at least this
# good to add hypervolume (5 accuracy points / 5 % lost, or 1.25x the baseline's cost).
DEFAULT_DROP_REFERENCE = 5.0
DEFAULT_RATIO_REFERENCE = 1.25
QUALITY_OBJECTIVES = ("accuracy", "perplexity")  # measured on a test split, so noisy


@dataclass(frozen=True)
class Axis:
    """One objective as a loss to minimize, relative to the baseline."""

    name: str
    maximize: bool
    baseline: float | None
    reference: float

    @property
    def label(self) -> str:
        if self.maximize:
            if self.name == "accuracy":
                return "accuracy drop (points)"
            return f"{self.name} drop (%)" if self.baseline else f"-{self.name}"
        return f"{self.name} ratio to baseline" if self.baseline else self.name

    def loss(self, value: float) -> float:
        base = self.baseline
        if self.maximize:
            if self.name == "accuracy" and base is not None:
                return base - value
            return 100.0 * (base - value) / abs(base) if base else -value
        return value / base if base else value

    def volume_loss(self, value: float) -> float:
        """``loss`` for hypervolumes: a quality objective (accuracy, perplexity) is never
        credited beyond the baseline's own. Beating the baseline by a point is test-set
        noise, and a lucky trial would otherwise stretch the volume past the origin."""
        loss = self.loss(value)
        if self.name in QUALITY_OBJECTIVES and self.baseline is not None:
            return max(loss, self.loss(self.baseline))
        return loss


def make_axes(
    objectives: Sequence[str],
    directions: Sequence[optuna.study.StudyDirection],
    baseline: dict[str, float],
    constraints: dict[str, float],
) -> list[Axis]:
    # A constraint bounds its axis's volume where it is in the axis's unit: points of accuracy
    # dropped, or a ratio to the baseline of a minimized objective.
    limits = {}
    for key, value in constraints.items():
        c = resolve(key, objectives)
        if (c.metric, c.bound) == ("accuracy", "max_drop") or c.bound == "max_ratio":
            limits[c.metric] = value
    axes = []
    for name, direction in zip(objectives, directions, strict=True):
        maximize = direction == optuna.study.StudyDirection.MAXIMIZE
        base = baseline.get(name)
        reference = limits.get(name, DEFAULT_DROP_REFERENCE if maximize else DEFAULT_RATIO_REFERENCE)
        if not base and not (maximize and name == "accuracy"):
            reference = math.inf  # no baseline to be relative to: this axis cannot bound a volume
        axes.append(Axis(name, maximize, base, reference))
    return axes


def knee_index(losses: np.ndarray) -> int | None:
    """Row of ``losses`` (one front point per row) nearest the utopia point once each axis
    is scaled to [0, 1] over the front; None for an empty front."""
    if len(losses) == 0:
        return None
    low = losses.min(axis=0)
    span = losses.max(axis=0) - low
    scaled = (losses - low) / np.where(span > 0, span, 1.0)
    return int(np.argmin(np.linalg.norm(scaled, axis=1)))


def plan_columns(plan: CompressionPlan) -> dict[str, Any]:
    """One column per layer knob, named like the Optuna params: ``<layer>:<knob>``."""
    out: dict[str, Any] = {}
    for layer, settings in plan.layers.items():
        for knob in knob_order():
            out[f"{layer}:{knob}"] = getattr(settings, knob)
    return out


class Run:
    """A run folder: the study, its baseline, and its trials as tables.

    Trials are read once, when first needed; ``refresh()`` re-reads a study that is still running.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path).resolve()
        info_path = self.path / RUN_INFO
        if not info_path.is_file():
            raise StudyError(
                f"{path}: not a slimsearch run folder (no {RUN_INFO}); give the study's output folder, "
                "e.g. runs/minilm-sentiment"
            )
        self.info: dict[str, Any] = json.loads(info_path.read_text())
        from slimsearch.search.storage import open_for_reading

        optuna.logging.set_verbosity(optuna.logging.WARNING)
        self.study = optuna.load_study(
            study_name=self.info["study_name"],
            storage=open_for_reading(self.info["storage"], self.info["url"]),
        )
        self.name: str = self.info["study_name"]
        self.objectives: list[str] = list(self.info["objectives"])

    def __repr__(self) -> str:
        return f"Run({str(self.path)!r}, study={self.name!r}, objectives={self.objectives})"

    # -- the study ----------------------------------------------------------------------
    @property
    def baseline(self) -> dict[str, float]:
        return {k: float(v) for k, v in dict(self.study.user_attrs.get("baseline", {})).items()}

    @cached_property
    def raw(self) -> dict[str, Any]:
        path = self.path / "study.yaml"
        if not path.is_file():
            raise StudyError(
                f"{self.path}: no study.yaml; this run folder was not written by `slimsearch run`"
            )
        data: dict[str, Any] = yaml.safe_load(path.read_text())
        return data

    @cached_property
    def spec(self) -> StudySpec:
        """The study as validated from the run's study.yaml (relative paths from the cwd)."""
        try:
            return study_from_mapping(self.raw)
        except StudyError as exc:
            raise StudyError(
                f"{self.path / 'study.yaml'}: {exc} (run this from the folder the study ran in)"
            ) from None

    @property
    def constraints(self) -> dict[str, float]:
        raw = self.raw.get("constraints") or {}
        if isinstance(raw, Mapping):  # named keys: read without validating the whole study again
            return {k: float(v) for k, v in raw.items() if v is not None}
        return dict(self.spec.constraints)

    def cache_dir(self) -> Path:
        return Path(self.info["cache_dir"]) if "cache_dir" in self.info else self.spec.cache

    def baseline_dir(self) -> Path:
        """The baseline model folder (run.json's, or recomputed for runs that predate it)."""
        if "baseline_dir" in self.info:
            folder = Path(self.info["baseline_dir"])
        else:
            folder = self.spec.cache / "baselines" / models.baseline_key(self.spec)
        if not (folder / "config.json").is_file():
            raise StudyError(
                f"the run's baseline folder {folder} is missing; rebuild it with "
                f"`slimsearch setup {self.path / 'study.yaml'}` (same cache folder)"
            )
        return folder

    def axes(self) -> list[Axis]:
        return make_axes(self.objectives, self.study.directions, self.baseline, self.constraints)

    @cached_property
    def all_trials(self) -> list[FrozenTrial]:
        return self.study.get_trials(deepcopy=False)

    @cached_property
    def _front_rows(self) -> list[dict[str, Any]]:
        """The driver's front table (latencies re-measured at the end of the run, where it did)."""
        return pareto.front_rows(self.study, self.objectives, self.baseline)

    @cached_property
    def _front(self) -> list[int]:
        return [int(r["trial"]) for r in self._front_rows]

    def refresh(self) -> None:
        for name in ("all_trials", "_front_rows", "_front"):
            self.__dict__.pop(name, None)

    def complete_trials(self) -> list[FrozenTrial]:
        return [t for t in self.all_trials if t.state == TrialState.COMPLETE]

    def front_numbers(self) -> list[int]:
        """Numbers of the Pareto-optimal feasible trials, sorted by the first objective."""
        return list(self._front)

    def trial(self, number: int) -> FrozenTrial:
        trials = self.all_trials
        if not 0 <= number < len(trials):
            raise StudyError(f"--trial {number}: the study has trials 0 to {len(trials) - 1}")
        trial = trials[number]
        if trial.state != TrialState.COMPLETE or "plan" not in trial.user_attrs:
            raise StudyError(
                f"--trial {number} is {trial.state.name}, not a complete trial with a plan; "
                f"pick one of the front {self.front_numbers()} (see `slimsearch pareto {self.path}`)"
            )
        return trial

    def knee(self) -> int | None:
        """The front's knee trial: the best compromise after scaling each objective."""
        rows = self._front_rows
        axes = self.axes()
        losses = np.array([[a.loss(float(row[a.name])) for a in axes] for row in rows])
        index = knee_index(losses)
        return None if index is None else int(rows[index]["trial"])

    # -- tables -------------------------------------------------------------------------
    def trials(self) -> pd.DataFrame:
        """Every trial: state, objectives, ratios to the baseline, feasibility, timing."""
        baseline = self.baseline
        front = set(self.front_numbers()) if baseline else set()
        trials = self.all_trials
        starts = [t.datetime_start for t in trials if t.datetime_start is not None]
        origin = min(starts) if starts else None
        rows = []
        for t in trials:
            if t.state == TrialState.COMPLETE:
                row = pareto.trial_row(t, self.objectives, baseline)
            else:
                row = {"trial": t.number, "feasible": False, "plan": ""}
            row["state"] = t.state.name
            row["on_front"] = t.number in front
            row["violation"] = pareto.violation(t) if t.state == TrialState.COMPLETE else math.nan
            row["seconds"] = t.user_attrs.get("seconds", math.nan)
            row["completed_s"] = _since(origin, t.datetime_complete)
            row["error"] = t.user_attrs.get("error", "")
            row["source"] = pareto.trial_source(t)
            rows.append(row)
        return pd.DataFrame(rows)

    def pareto(self) -> pd.DataFrame:
        """One row per front trial: objectives, accuracy_drop / ratios, the plan summary,
        ``knee``, and one column per layer knob (``<layer>:bits``, ``:sparsity``, ``:rank``;
        rank <NA> means full rank)."""
        baseline = self.baseline
        if not baseline:
            return pd.DataFrame(columns=["trial", *self.objectives])
        rows = [dict(r) for r in self._front_rows]
        knee = self.knee()
        plans = {}
        for row in rows:
            trial = self.trial(int(row["trial"]))
            row["knee"] = row["trial"] == knee
            plans[row["trial"]] = plan_columns(CompressionPlan.from_dict(trial.user_attrs["plan"]))
        table = pd.DataFrame(rows)
        knobs = pd.DataFrame([plans[r["trial"]] for r in rows], index=table.index)
        for column in knobs.columns:
            if column.endswith(":rank"):
                knobs[column] = knobs[column].astype("Int64")
        return pd.concat([table, knobs], axis=1)

    # -- actions ------------------------------------------------------------------------
    def export(
        self,
        trial: int,
        out: str | Path,
        *,
        overwrite: bool = False,
        repeats: int | None = None,
        allow_mismatch: bool = False,
    ) -> ExportReport:
        from slimsearch.search.export import export_trial

        return export_trial(
            self, trial, out, overwrite=overwrite, repeats=repeats, allow_mismatch=allow_mismatch
        )

    def report(self, out: str | Path | None = None) -> Path:
        from slimsearch.search.report import write_report

        return write_report(self, out).html


def _since(origin: dt.datetime | None, when: dt.datetime | None) -> float:
    if origin is None or when is None:
        return math.nan
    return (when - origin).total_seconds()


def open_run(path: str | Path) -> Run:
    """Open a run folder (the study's output, e.g. ``runs/minilm-sentiment``)."""
    return Run(path)
