"""The latency protocol: interleaved ratio, noise gate, shapes, provenance, exclusivity."""

from __future__ import annotations

import fcntl
import threading
import time
from dataclasses import replace
from pathlib import Path

import pytest

from slimsearch.evaluators import EvalContext, LatencyRatio, LatencySpec, measure
from slimsearch.evaluators import latency as latency_module
from slimsearch.search.locks import machine_lock
from slimsearch.spaces import CompressionPlan
from tiny import tiny_bert

SPEC = LatencySpec(batch_size=1, seq_len=8, warmup=1, repeats=9, threads=1)


def test_interleaved_ratio_of_a_model_against_itself_is_near_one() -> None:
    model = tiny_bert()
    out = measure(model, SPEC, vocab_size=96, reference=model)
    low, high = out["ratio_ci95"]
    assert low <= high
    assert 0.5 < out["ratio"] < 2.0  # same model: the ratio is 1 up to timing noise
    assert out["baseline_median_ms"] > 0 and out["warmup_passes"] >= SPEC.warmup


def test_noise_gate_retries_then_flags_noise() -> None:
    spec = LatencySpec(batch_size=1, seq_len=8, warmup=0, repeats=5, threads=1, max_cv=1e-9, retries=2)
    out = measure(tiny_bert(), spec, vocab_size=96)
    assert out["attempts"] == 3 and out["noisy"] is True


def test_precision_adds_blocks_until_the_cap_and_zero_turns_it_off() -> None:
    model = tiny_bert()
    strict = LatencySpec(
        batch_size=1, seq_len=8, warmup=0, repeats=5, threads=1, precision=1e-9, max_repeats=20
    )
    assert measure(model, strict, vocab_size=96, reference=model)["repeats"] == 20
    off = LatencySpec(batch_size=1, seq_len=8, warmup=0, repeats=5, threads=1, precision=0, max_repeats=20)
    assert measure(model, off, vocab_size=96, reference=model)["repeats"] == 5


def test_drift_gate_remeasures_when_the_baseline_runs_slower_than_its_quietest(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    model = tiny_bert()
    spec = LatencySpec(batch_size=1, seq_len=8, warmup=0, repeats=5, threads=1, max_cv=10.0, retries=1)
    key = latency_module.quiet_key(1, 8, 1, model)
    # Pretend this baseline once ran 100x faster: every attempt now looks like a busy machine.
    monkeypatch.setitem(latency_module._QUIETEST, key, 1e-6)
    out = measure(model, spec, vocab_size=96, reference=model)
    assert out["attempts"] == 2 and out["noisy"] is True and out["baseline_drift"] > 1.0
    monkeypatch.setitem(latency_module._QUIETEST, key, 1e9)  # now it is the quietest ever seen
    out = measure(model, spec, vocab_size=96, reference=model)
    assert out["attempts"] == 1 and out["noisy"] is False and out["baseline_drift"] == 0.0
    assert out["quiet_key"] == key


def test_quiet_times_travel_through_records(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(latency_module, "_QUIETEST", {"k": 5.0})
    latency_module.remember_quiet({"k": 7.0, "other": 3.0})  # keeps the quieter of the two
    assert latency_module._QUIETEST == {"k": 5.0, "other": 3.0}
    record = {"shapes": [{"quiet_key": "k", "baseline_median_ms": 4.0}, {"median_ms": 1.0}]}
    assert latency_module.quiet_times(record) == {"k": 4.0}


def test_several_shapes_and_ratio_evaluator_records_provenance() -> None:
    spec = LatencySpec(batch_size=1, seq_len=8, warmup=1, repeats=5, threads=1, shapes=((2, 16),))
    model = tiny_bert()
    ctx = EvalContext(task="classification", batches=[], vocab_size=96, plan=CompressionPlan(), latency=spec)
    with pytest.raises(ValueError, match="needs the baseline model"):
        LatencyRatio().evaluate(model, ctx)
    ctx.reference = model
    ratio = LatencyRatio().evaluate(model, ctx)
    rec = ctx.records["latency"]
    assert [(s["batch_size"], s["seq_len"]) for s in rec["shapes"]] == [(1, 8), (2, 16)]
    assert ratio == pytest.approx(rec["ratio"]) and ratio > 0
    assert {"cpu", "threads", "torch", "node"} <= set(rec["environment"])


def test_exclusive_lock_waits_for_shared_holders(tmp_path: Path) -> None:
    events: list[str] = []
    holding = threading.Event()

    def reader() -> None:
        with machine_lock(tmp_path, exclusive=False):
            events.append("read-start")
            holding.set()
            time.sleep(0.3)
            events.append("read-end")

    thread = threading.Thread(target=reader)
    thread.start()
    assert holding.wait(60), "the reader never took its lock"
    with machine_lock(tmp_path, exclusive=True):
        events.append("timing")
    thread.join()
    assert events == ["read-start", "read-end", "timing"]
    # And while timing holds it, nobody else gets it.
    lock_file = tmp_path / "locks" / "measure.lock"
    with machine_lock(tmp_path, exclusive=True), lock_file.open("a") as f, pytest.raises(BlockingIOError):
        fcntl.flock(f, fcntl.LOCK_SH | fcntl.LOCK_NB)


def test_time_budget_bounds_a_measurement_and_flags_it() -> None:
    """A measurement that cannot settle (impossible precision and CV gates) ends at its time
    budget with the best attempt kept and flagged, instead of running to max_repeats times
    every retry. The deadline is already past: no wall-clock race is involved."""
    model = tiny_bert()
    unsettled = LatencySpec(
        batch_size=1, seq_len=8, warmup=0, repeats=5, threads=1, precision=1e-9, max_cv=1e-9
    )
    spec = replace(unsettled, max_repeats=10_000, retries=5, time_budget=1e-9)
    out = measure(model, spec, vocab_size=96, reference=model, deadline=time.monotonic())
    assert out["repeats"] == 5 and out["attempts"] == 1  # one block, one attempt, then it stopped
    assert out["out_of_time"] is True and out["noisy"] is True
    unbounded = replace(unsettled, max_repeats=15, retries=1, time_budget=0)
    out = measure(model, unbounded, vocab_size=96, reference=model)
    assert out["repeats"] == 15 and out["attempts"] == 2 and out["out_of_time"] is False


def test_time_budget_is_checked_in_the_study_file() -> None:
    with pytest.raises(ValueError, match="time_budget"):
        LatencySpec(time_budget=-1)
