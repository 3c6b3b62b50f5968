"""Everything the search prints while it runs: one line per finished trial, and the summary
at the end. The loop and the driver call these; nothing else prints progress."""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from slimsearch.search import pareto, retry
from slimsearch.search.log import fmt_seconds, say
from slimsearch.search.worker import TrialResult

# progress shows these against the baseline
RATIO_SHOWN = ("size_bytes", "latency_ms", "perplexity", "memory_bytes", "ttft_ms", "decode_tokens_per_s")


def trial_line(
    study: optuna.Study,
    result: TrialResult,
    baseline: dict[str, float],
    *,
    objectives: Sequence[str],
    running: int,
    started: float,
    done_here: int,
    budget: int | None,
) -> None:
    """One line for a finished trial: its values, the budget, the front and an ETA."""
    trials = study.get_trials(deepcopy=False)
    counts = retry.tally(trials)
    counted, failed, repeats = counts["spent"], counts["failed"], counts["repeats"]
    screened = sum(t.state == TrialState.PRUNED for t in trials)
    best_trials = pareto.distinct(study.best_trials) if counts["complete"] else []
    elapsed = time.monotonic() - started
    eta = ""
    if budget and done_here:
        eta = f", ETA {fmt_seconds(elapsed / done_here * max(0, budget - counted))}"
    if result.values:
        parts = []
        for name, value in result.values.items():
            base = baseline.get(name)
            shown = f" ({value / base:.2f}x)" if base and name in RATIO_SHOWN else ""
            parts.append(f"{name} {value:.4g}{shown}")
        what = ", ".join(parts)
    elif result.pruned:
        scr = result.records.get("screen", {})
        if not scr:  # a result read back without its screening record (a benchmark's cache)
            what = "screened out"
        elif "perplexity_ratio" in scr:
            what = (
                f"screened out (perplexity {scr['perplexity_ratio']:.3f}x, at least "
                f"{scr['lower_bound']:.3f}x, on {scr['tokens']} tokens)"
            )
        else:
            what = f"screened out (accuracy {scr.get('accuracy', 0):.1f} on {scr.get('examples')} examples)"
    else:
        what = "failed"
    if "reused_from" in result.records:
        what += f" (same plan as trial {result.records['reused_from']}: answered from it, not counted)"
    total = f"/{budget}" if budget else ""
    say(
        f"trial {result.number}: {what} [{result.seconds:.1f}s] | {counted}{total} done "
        f"({failed} failed, {screened} screened out, {repeats} repeats answered, "
        f"{running} running), front {len(best_trials)}, "
        f"elapsed {fmt_seconds(elapsed)}{eta}{best_so_far(study, objectives, best_trials)}"
    )


def best_so_far(study: optuna.Study, objectives: Sequence[str], front: Sequence[FrozenTrial]) -> str:
    """Each objective's best value among feasible front trials."""
    if not front:
        return ""
    parts = []
    for i, (name, direction) in enumerate(zip(objectives, study.directions, strict=True)):
        values = [t.values[i] for t in front]
        best = max(values) if direction == optuna.study.StudyDirection.MAXIMIZE else min(values)
        parts.append(f"{name} {best:.4g}")
    return " | best: " + ", ".join(parts)


def summary(
    study: optuna.Study,
    name: str,
    rows: list[dict[str, Any]],
    objectives: Sequence[str],
    baseline: dict[str, float],
    stopped: str,
    took: float,
    run_dir: Path,
    url: str,
) -> dict[str, int]:
    """The end-of-run printout (counts, baseline, the front); returns the counts."""
    tally = retry.tally(study.get_trials(deepcopy=False))
    counts = {key: tally[key] for key in ("complete", "failed", "repeats")}
    if rows and study.user_attrs.get("final_latency"):
        print("latency columns of the front: re-measured at the end in fresh processes")
    print(
        f"\nslimsearch: study {name!r} stopped ({stopped}) after {fmt_seconds(took)}: "
        f"{counts['complete']} trials complete, {counts['failed']} failed, "
        f"{counts['repeats']} repeated plans answered from earlier trials"
    )
    if baseline:
        print("baseline: " + ", ".join(f"{k} {v:.4g}" for k, v in baseline.items()))
    if rows:
        print(f"Pareto front ({len(rows)} trials, feasible only):")
        print(pareto.format_table(rows))
    elif counts["complete"]:
        print("No trial met the constraints; the nearest ones:")
        print(pareto.format_table(pareto.nearest_infeasible(study, list(objectives), baseline)))
    else:
        print("No trial completed.")
    print(f"front: {run_dir / 'pareto.csv'}  all trials: {run_dir / 'trials.csv'}  storage: {url}")
    return counts
