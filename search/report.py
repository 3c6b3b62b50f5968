"""``slimsearch report RUN``: one self-contained HTML page (plotly inline, works offline) and CSVs.

The page shows the front as 2D projections of each objective pair and a 3D view (baseline
marked, dominated and infeasible trials greyed, the knee highlighted), the hypervolume over
trials and over wall time, a per-layer heatmap of the front's choices, and parameter
importances when there are enough trials. Hypervolume is computed on losses relative to the
baseline (accuracy drop, size/latency ratios) against a fixed reference point (the study's
constraints where it has them), so runs of one study compare. Accuracy or perplexity better
than the baseline's counts as the baseline's: that margin is test-set noise, not volume.
"""

from __future__ import annotations

import html
import math
import warnings
from dataclasses import dataclass
from itertools import combinations
from pathlib import Path
from typing import Any

import numpy as np
import optuna
import pandas as pd
import plotly.graph_objects as go
from optuna.trial import FrozenTrial

from slimsearch.search import pareto, sensitivity
from slimsearch.search.results import Axis, Run, knob_order, open_run
from slimsearch.search.study_file import StudyError
from slimsearch.spaces.methods import registry

MIN_TRIALS_FOR_IMPORTANCE = 8
TOP_IMPORTANCES = 12
GREY = "rgba(150,150,150,0.55)"
LIGHT = "rgba(190,190,190,0.45)"
FRONT = "#1f77b4"
KNEE = "#d62728"


@dataclass(frozen=True)
class ReportFiles:
    html: Path
    front_csv: Path
    trials_csv: Path


# -- hypervolume --------------------------------------------------------------------------
def _hv_slices(points: np.ndarray, reference: np.ndarray) -> float:
    """Exact hypervolume by slicing along the last axis (fine for the few points of a front)."""
    if len(points) == 0:
        return 0.0
    if points.shape[1] == 1:
        return float(reference[0] - points[:, 0].min())
    order = np.argsort(points[:, -1])
    pts = points[order]
    volume = 0.0
    for i in range(len(pts)):
        top = pts[i + 1, -1] if i + 1 < len(pts) else reference[-1]
        depth = top - pts[i, -1]
        if depth > 0:
            volume += depth * _hv_slices(pts[: i + 1, :-1], reference[:-1])
    return volume


def hypervolume(losses: np.ndarray, reference: np.ndarray) -> float:
    """Volume dominated by ``losses`` (rows, all minimized) and bounded by ``reference``;
    points not strictly better than the reference on every axis add nothing."""
    if len(losses) == 0:
        return 0.0
    inside = losses[(losses < reference).all(axis=1)]
    if len(inside) == 0:
        return 0.0
    try:  # optuna's exact WFG; private, so keep our own as the fallback
        from optuna._hypervolume import compute_hypervolume
    except ImportError:
        return _hv_slices(inside, reference)
    return float(compute_hypervolume(inside, reference))


def _hv_reference(axes: list[Axis]) -> np.ndarray:
    return np.array([a.reference for a in axes], dtype=float)


def hypervolume_history(run: Run, feasible: list[FrozenTrial]) -> pd.DataFrame:
    """Hypervolume after each feasible complete trial, by trial number and by finish time."""
    axes = run.axes()
    reference = _hv_reference(axes)
    finite = np.isfinite(reference)
    rows = []
    origin = min((t.datetime_start for t in run.all_trials if t.datetime_start), default=None)
    for order_key in ("number", "time"):
        if order_key == "number":
            ordered = sorted(feasible, key=lambda t: t.number)
        else:
            ordered = sorted(feasible, key=lambda t: (t.datetime_complete or t.datetime_start, t.number))
        seen: list[list[float]] = []
        for t in ordered:
            seen.append([a.volume_loss(v) for a, v in zip(axes, t.values, strict=True)])
            losses = np.array(seen)[:, finite]
            value = hypervolume(losses, reference[finite]) if finite.any() else math.nan
            elapsed = (
                (t.datetime_complete - origin).total_seconds() if origin and t.datetime_complete else math.nan
            )
            rows.append({"order": order_key, "trial": t.number, "elapsed_s": elapsed, "hypervolume": value})
    return pd.DataFrame(rows, columns=["order", "trial", "elapsed_s", "hypervolume"])


# -- figures ------------------------------------------------------------------------------
def _display(name: str, value: float) -> float:
    return value / 1e6 if name in ("size_bytes", "memory_bytes") else value


def _title(name: str) -> str:
    return {
        "size_bytes": "size (MB)",
        "memory_bytes": "resident memory (MB)",
        "latency_ms": "latency (ms)",
        "ttft_ms": "time to first token (ms)",
        "decode_tokens_per_s": "decode (tokens/s)",
        "accuracy": "accuracy (%)",
    }.get(name, name)


def _groups(run: Run) -> dict[str, list[FrozenTrial]]:
    front = set(run.front_numbers())
    knee = run.knee()
    out: dict[str, list[FrozenTrial]] = {"infeasible": [], "dominated": [], "front": [], "knee": []}
    for t in run.complete_trials():
        if t.number == knee:
            out["knee"].append(t)
        elif t.number in front:
            out["front"].append(t)
        elif pareto.violation(t) > 0:
            out["infeasible"].append(t)
        else:
            out["dominated"].append(t)
    return out


_STYLE: dict[str, dict[str, Any]] = {
    "infeasible": {"color": GREY, "symbol": "x", "size": 7},
    "dominated": {"color": LIGHT, "symbol": "circle", "size": 7},
    "front": {"color": FRONT, "symbol": "circle", "size": 10},
    "knee": {"color": KNEE, "symbol": "star", "size": 16},
}
_STYLE_3D: dict[str, dict[str, Any]] = {
    "infeasible": {"color": GREY, "symbol": "x", "size": 3},
    "dominated": {"color": LIGHT, "symbol": "circle", "size": 3},
    "front": {"color": FRONT, "symbol": "circle", "size": 5},
    "knee": {"color": KNEE, "symbol": "diamond", "size": 8},
}


def _hover(t: FrozenTrial, objectives: list[str]) -> str:
    from slimsearch.spaces import CompressionPlan

    plan = CompressionPlan.from_dict(t.user_attrs["plan"]).summary() if "plan" in t.user_attrs else ""
    values = "<br>".join(f"{n}: {v:.4g}" for n, v in zip(objectives, t.values, strict=True))
    return f"trial {t.number}<br>{values}<br>{html.escape(plan[:80])}"


def projections_figure(run: Run, groups: dict[str, list[FrozenTrial]]) -> go.Figure | None:
    from plotly.subplots import make_subplots

    objectives = run.objectives
    pairs = list(combinations(range(len(objectives)), 2))
    if not pairs:
        return None
    fig = make_subplots(rows=1, cols=len(pairs), horizontal_spacing=0.08)
    baseline = run.baseline
    for col, (i, j) in enumerate(pairs, start=1):
        xi, yj = objectives[i], objectives[j]
        for name, trials in groups.items():
            if not trials:
                continue
            style = _STYLE[name]
            fig.add_trace(
                go.Scatter(
                    x=[_display(xi, t.values[i]) for t in trials],
                    y=[_display(yj, t.values[j]) for t in trials],
                    mode="markers",
                    name=name,
                    legendgroup=name,
                    showlegend=col == 1,
                    marker={"color": style["color"], "symbol": style["symbol"], "size": style["size"]},
                    text=[_hover(t, objectives) for t in trials],
                    hoverinfo="text",
                ),
                row=1,
                col=col,
            )
        if xi in baseline and yj in baseline:
            fig.add_trace(
                go.Scatter(
                    x=[_display(xi, baseline[xi])],
                    y=[_display(yj, baseline[yj])],
                    mode="markers",
                    name="baseline",
                    legendgroup="baseline",
                    showlegend=col == 1,
                    marker={"color": "black", "symbol": "diamond-open", "size": 14, "line": {"width": 2}},
                    hoverinfo="text",
                    text=["baseline"],
                ),
                row=1,
                col=col,
            )
        fig.update_xaxes(title_text=_title(xi), row=1, col=col)
        fig.update_yaxes(title_text=_title(yj), row=1, col=col)
    fig.update_layout(title="Pareto front: 2D projections", height=430, margin={"t": 60, "b": 40})
    return fig


def front_3d_figure(run: Run, groups: dict[str, list[FrozenTrial]]) -> go.Figure | None:
    objectives = run.objectives
    if len(objectives) < 3:
        return None
    fig = go.Figure()
    for name, trials in groups.items():
        if not trials:
            continue
        style = _STYLE_3D[name]
        fig.add_trace(
            go.Scatter3d(
                x=[_display(objectives[0], t.values[0]) for t in trials],
                y=[_display(objectives[1], t.values[1]) for t in trials],
                z=[_display(objectives[2], t.values[2]) for t in trials],
                mode="markers",
                name=name,
                marker={"color": style["color"], "symbol": style["symbol"], "size": style["size"]},
                text=[_hover(t, objectives) for t in trials],
                hoverinfo="text",
            )
        )
    base = run.baseline
    if all(o in base for o in objectives[:3]):
        fig.add_trace(
            go.Scatter3d(
                x=[_display(objectives[0], base[objectives[0]])],
                y=[_display(objectives[1], base[objectives[1]])],
                z=[_display(objectives[2], base[objectives[2]])],
                mode="markers",
                name="baseline",
                marker={"color": "black", "symbol": "diamond-open", "size": 8},
                text=["baseline"],
                hoverinfo="text",
            )
        )
    fig.update_layout(
        title="Pareto front: 3D view (drag to rotate)",
        height=560,
        scene={
            "xaxis_title": _title(objectives[0]),
            "yaxis_title": _title(objectives[1]),
            "zaxis_title": _title(objectives[2]),
        },
        margin={"t": 60, "b": 10},
    )
    return fig


def hypervolume_figure(history: pd.DataFrame, axes: list[Axis]) -> go.Figure | None:
    from plotly.subplots import make_subplots

    if history.empty or history["hypervolume"].isna().all():
        return None
    fig = make_subplots(rows=1, cols=2, subplot_titles=("over trials", "over wall time"))
    by_number = history[history["order"] == "number"]
    by_time = history[history["order"] == "time"]
    series = [(by_number["trial"], by_number, "by trial"), (by_time["elapsed_s"] / 60.0, by_time, "by time")]
    for col, (x, frame, name) in enumerate(series, start=1):
        fig.add_trace(
            go.Scatter(
                x=x,
                y=frame["hypervolume"],
                mode="lines+markers",
                line={"shape": "hv"},
                name=name,
                showlegend=False,
            ),
            row=1,
            col=col,
        )
    fig.update_xaxes(title_text="trial number (feasible trials)", row=1, col=1)
    fig.update_xaxes(title_text="minutes since the first trial started", row=1, col=2)
    fig.update_yaxes(title_text="hypervolume", row=1, col=1)
    ref = ", ".join(f"{a.label} {a.reference:g}" for a in axes)
    fig.update_layout(title=f"Hypervolume (losses relative to the baseline; reference: {ref})", height=380)
    return fig


def _short_names(layers: list[str]) -> list[str]:
    """Layer names without the prefix they all share, so heatmap columns stay readable."""
    if len(layers) < 2:
        return layers
    parts = [n.split(".") for n in layers]
    common = 0
    while all(len(p) > common + 1 for p in parts) and len({p[common] for p in parts}) == 1:
        common += 1
    return [".".join(p[common:]) for p in parts]


def heatmap_figure(front: pd.DataFrame) -> go.Figure | None:
    from plotly.subplots import make_subplots

    order = knob_order()
    knob_cols = [c for c in front.columns if c.rsplit(":", 1)[-1] in order and ":" in c]
    if front.empty or not knob_cols:
        return None
    layers = list(dict.fromkeys(c.rsplit(":", 1)[0] for c in knob_cols))
    shown = [k for k in order if any(f"{layer}:{k}" in front for layer in layers)]
    labels = [
        f"trial {int(t)}" + (" (knee)" if k else "")
        for t, k in zip(front["trial"], front["knee"], strict=True)
    ]
    fig = make_subplots(
        rows=len(shown),
        cols=1,
        subplot_titles=[f"{k} per layer" for k in shown],
        shared_xaxes=True,
        vertical_spacing=0.08 if len(shown) > 1 else 0.0,
    )
    short = _short_names(layers)
    for row, knob in enumerate(shown, start=1):
        method = registry.get(knob)
        z: list[list[float]] = []
        text: list[list[str]] = []
        for _, record in front.iterrows():
            zr, tr = [], []
            for layer in layers:
                value = record.get(f"{layer}:{knob}")
                missing = value is None or (isinstance(value, float) and math.isnan(value)) or value is pd.NA
                zr.append(math.nan if missing else float(value))
                tr.append(method.display(None if missing else value))
            z.append(zr)
            text.append(tr)
        fig.add_trace(
            go.Heatmap(
                z=z,
                x=short,
                y=labels,
                text=text,
                texttemplate="%{text}" if len(layers) <= 40 else None,
                colorscale=method.colorscale,
                showscale=False,
                hovertemplate="%{y}<br>%{x}<br>" + knob + ": %{text}<extra></extra>",
            ),
            row=row,
            col=1,
        )
    fig.update_xaxes(tickangle=45, tickfont={"size": 9})
    fig.update_layout(
        title="The front's choices per layer (rank: blank = full rank)",
        height=260 + len(shown) * (60 + 26 * len(front)),
        margin={"b": 200},
    )
    return fig


def run_profile(run: Run) -> sensitivity.Profile | None:
    """The sensitivity profile cached for this run's baseline, task and space, if one was computed."""
    try:
        fingerprint = str(run.study.user_attrs["fingerprint"]["space"])
        key = sensitivity.profile_key(Path(run.info["baseline_dir"]), run.spec.task, fingerprint)
        return sensitivity.read_profile(sensitivity.profile_path(run.cache_dir(), key))
    except (KeyError, TypeError, StudyError, ValueError, OSError):  # optional section: never fail the report
        return None


def sensitivity_figure(profile: sensitivity.Profile) -> go.Figure | None:
    """Loss increase when only one layer takes one value: what the sensitivity seeds avoid."""
    rows = sensitivity.heatmap_rows(profile)
    if not rows:
        return None
    units = list(profile.options)
    order = knob_order()
    names = sorted(rows, key=lambda r: (order.index(r.split("=")[0]) if r.split("=")[0] in order else 99, r))
    z = [[rows[r][u] for u in units] for r in names]
    fig = go.Figure(
        go.Heatmap(
            z=z,
            x=_short_names(units),
            y=names,
            colorscale="RdBu_r",
            zmid=0.0,
            colorbar={"title": "loss +"},
            hovertemplate="%{x}<br>%{y}<br>loss change %{z:.4g}<extra></extra>",
        )
    )
    fig.update_xaxes(tickangle=45, tickfont={"size": 9})
    fig.update_layout(
        title=f"Sensitivity: {profile.metric} change (baseline {profile.baseline_loss:.4g}, "
        f"{profile.rows} test rows) when only that layer is compressed",
        height=220 + 28 * len(names),
        margin={"b": 200},
    )
    return fig


def importances(run: Run) -> dict[str, dict[str, float]] | str:
    """PED-ANOVA importances of the searched parameters for each objective, or why there are
    none. PED-ANOVA needs no scikit-learn (fANOVA does) and takes milliseconds."""
    done = run.complete_trials()
    if len(done) < MIN_TRIALS_FOR_IMPORTANCE:
        return f"skipped: {len(done)} complete trials, importances need at least {MIN_TRIALS_FOR_IMPORTANCE}"
    # The "good" group is the best quantile of trials: keep at least 3 trials in it.
    evaluator = optuna.importance.PedAnovaImportanceEvaluator(target_quantile=max(0.1, 3 / len(done)))
    out: dict[str, dict[str, float]] = {}
    for i, (name, axis) in enumerate(zip(run.objectives, run.axes(), strict=True)):
        sign = -1.0 if axis.maximize else 1.0  # PED-ANOVA ranks what makes the target low

        def target(t: FrozenTrial, i: int = i, sign: float = sign) -> float:
            return sign * float(t.values[i])

        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                scores = optuna.importance.get_param_importances(
                    run.study, evaluator=evaluator, target=target, normalize=True
                )
        except (RuntimeError, ValueError) as exc:  # e.g. no parameter varies yet
            return f"skipped: optuna could not compute importances ({exc})"
        out[name] = dict(scores)
    return out


def _knob_kind(param: str) -> str:
    return param.rsplit(":", 1)[-1] if ":" in param else param


def importance_figure(scores: dict[str, dict[str, float]]) -> go.Figure:
    """Per objective: importance summed by knob kind (left), and the top parameters (right)."""
    from plotly.subplots import make_subplots

    names = list(scores)
    fig = make_subplots(
        rows=len(names),
        cols=2,
        column_widths=[0.3, 0.7],
        horizontal_spacing=0.32,
        subplot_titles=[t for n in names for t in (f"{n}: by knob", f"{n}: top parameters")],
    )
    for row, name in enumerate(names, start=1):
        kinds: dict[str, float] = {}
        for param, value in scores[name].items():
            kinds[_knob_kind(param)] = kinds.get(_knob_kind(param), 0.0) + value
        fig.add_trace(
            go.Bar(x=list(kinds), y=list(kinds.values()), showlegend=False, marker={"color": FRONT}),
            row=row,
            col=1,
        )
        top = list(scores[name].items())[:TOP_IMPORTANCES][::-1]
        fig.add_trace(
            go.Bar(
                x=[v for _, v in top],
                y=[k for k, _ in top],
                orientation="h",
                showlegend=False,
                marker={"color": FRONT},
            ),
            row=row,
            col=2,
        )
    fig.update_yaxes(tickfont={"size": 9})
    fig.update_layout(
        title="Parameter importances (PED-ANOVA; which choices separate the best trials)",
        height=60 + len(names) * (40 + 22 * TOP_IMPORTANCES),
    )
    return fig


# -- the page -----------------------------------------------------------------------------
def _table(df: pd.DataFrame) -> str:
    def cell(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:.4g}"
        return html.escape(str(v))

    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in df.columns)
    body = "".join(
        "<tr"
        + (' class="knee"' if bool(row.get("knee", False)) else "")
        + ">"
        + "".join(f"<td>{cell(row[c])}</td>" for c in df.columns)
        + "</tr>"
        for _, row in df.iterrows()
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


_CSS = """
body { font-family: system-ui, sans-serif; margin: 24px; color: #222; }
h1 { margin-bottom: 4px; } .muted { color: #666; }
table { border-collapse: collapse; font-size: 13px; margin: 8px 0 20px; }
th, td { border: 1px solid #ddd; padding: 3px 8px; text-align: right; }
td:last-child, th:last-child { text-align: left; }
tr.knee { background: #fde2e2; font-weight: 600; }
.figure { margin: 18px 0 30px; } code { background: #f3f3f3; padding: 1px 4px; }
"""


def render_html(run: Run, figures: list[go.Figure], front: pd.DataFrame, notes: list[str], hv: float) -> str:
    summary_cols = [c for c in front.columns if ":" not in c]
    counts = {s: sum(t.state.name == s for t in run.all_trials) for s in ("COMPLETE", "FAIL", "RUNNING")}
    knee = run.knee()
    base = ", ".join(f"{k} {v:.4g}" for k, v in run.baseline.items())
    parts = [
        "<!DOCTYPE html><html><head><meta charset='utf-8'>",
        f"<title>slimsearch report: {html.escape(run.name)}</title><style>{_CSS}</style></head><body>",
        f"<h1>slimsearch report: {html.escape(run.name)}</h1>",
        f"<p class='muted'>{html.escape(str(run.path))}: {counts['COMPLETE']} trials complete, "
        f"{counts['FAIL']} failed, {counts['RUNNING']} running; front of {len(front)}; "
        f"hypervolume {hv:.4g}</p>",
        f"<p>Baseline: {html.escape(base)}</p>",
    ]
    if knee is not None:
        parts.append(
            f"<p>Knee point (best compromise after scaling each objective over the front): "
            f"<b>trial {knee}</b>. Export it with "
            f"<code>slimsearch export {html.escape(str(run.path))} --trial {knee} OUT/</code></p>"
        )
    parts += ["<h2>Pareto front (feasible trials)</h2>", _table(front[summary_cols])]
    for i, fig in enumerate(figures):
        parts.append(
            "<div class='figure'>"
            + fig.to_html(
                full_html=False, include_plotlyjs=(i == 0), config={"displaylogo": False, "responsive": True}
            )
            + "</div>"
        )
    parts += [f"<p class='muted'>{html.escape(n)}</p>" for n in notes]
    parts.append("</body></html>")
    return "\n".join(parts)


def write_report(run: Run | str | Path, out: str | Path | None = None) -> ReportFiles:
    """Write ``report.html`` (or ``out``) plus ``report_front.csv`` and ``report_trials.csv``
    beside it; returns their paths."""
    run = run if isinstance(run, Run) else open_run(run)
    html_path = Path(out) if out is not None else run.path / "report.html"
    html_path.parent.mkdir(parents=True, exist_ok=True)
    front = run.pareto()
    groups = _groups(run)
    feasible = [t for t in run.complete_trials() if pareto.violation(t) == 0]
    history = hypervolume_history(run, feasible)
    by_number = history[history["order"] == "number"]
    final_hv = float(by_number["hypervolume"].iloc[-1]) if not by_number.empty else 0.0

    notes: list[str] = []
    figures = [
        projections_figure(run, groups),
        front_3d_figure(run, groups),
        hypervolume_figure(history, run.axes()),
        heatmap_figure(front),
    ]
    profile = run_profile(run)
    if profile is not None:
        figures.append(sensitivity_figure(profile))
    scores = importances(run)
    if isinstance(scores, str):
        notes.append(f"Parameter importances {scores}.")
    else:
        figures.append(importance_figure(scores))
    notes.append("Greyed: dominated feasible trials (circles) and trials that break a constraint (crosses).")
    if run.study.user_attrs.get("final_latency"):
        notes.append(
            "The front table shows latencies re-measured at the end of the run in fresh processes; "
            "the plots and the hypervolume use the values measured during the search, as Optuna saw them."
        )
    page = render_html(run, [f for f in figures if f is not None], front, notes, final_hv)
    html_path.write_text(page, encoding="utf-8")

    front_csv = html_path.with_name(html_path.stem + "_front.csv")
    trials_csv = html_path.with_name(html_path.stem + "_trials.csv")
    front.to_csv(front_csv, index=False)
    trials = run.trials()
    hv = by_number.set_index("trial")["hypervolume"].rename("hypervolume_after")
    trials = trials.join(hv, on="trial")
    # Infeasible and failed trials leave the hypervolume where it was.
    trials["hypervolume_after"] = trials["hypervolume_after"].ffill().fillna(0.0)
    trials.to_csv(trials_csv, index=False)
    return ReportFiles(html_path, front_csv, trials_csv)
