"""Decode speed (time to first token, tokens/s) and resident memory, the causal-LM objectives."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import optuna
import pytest
import torch

from conftest import tiny_lm_study, tiny_study
from slimsearch.evaluators import EvalContext, LatencySpec, make_evaluator, measure_decode
from slimsearch.evaluators.latency import quiet_times
from slimsearch.search.driver import run_study
from slimsearch.search.export import export_trial
from slimsearch.search.study_file import StudyError, study_from_mapping
from slimsearch.spaces import CompressionPlan, apply_plan
from tiny import LLAMA_INT4, tiny_bert, tiny_llama, wide_llama

SPEC = LatencySpec(
    batch_size=1, seq_len=8, warmup=1, repeats=5, threads=1, max_drift=0, decode_tokens=6, time_budget=10
)


def _context(task: Any, reference: torch.nn.Module | None, vocab: int = 96) -> EvalContext:
    return EvalContext(
        task=task, batches=[], vocab_size=vocab, plan=CompressionPlan(), latency=SPEC, reference=reference
    )


def test_decode_against_itself_generates_the_same_tokens_at_a_speedup_near_one() -> None:
    model = tiny_llama()
    record = measure_decode(model, SPEC, vocab_size=96, reference=model)
    assert record["same_tokens_as_baseline"] == SPEC.decode_tokens + 1
    assert 0.2 < record["speedup"] < 5.0  # the same model: 1 up to timing noise
    low, high = record["speedup_ci95"]
    assert low <= high
    assert record["ttft_ms"] > 0 and record["tokens_per_s"] > 0
    assert record["decode"]["repeats"] >= 5 and record["prompt_tokens"] == 8
    keys = quiet_times(record)
    assert sorted(k.split("-")[0] for k in keys) == ["decode6", "ttft"]


def test_decode_evaluators_read_one_measurement() -> None:
    model = tiny_llama()
    context = _context("causal-lm", model)
    values = {n: make_evaluator(n).evaluate(model, context) for n in ("ttft_ms", "decode_tokens_per_s")}
    record = context.records["decode"]
    assert values == {"ttft_ms": record["ttft_ms"], "decode_tokens_per_s": record["tokens_per_s"]}
    assert make_evaluator("decode_speedup").evaluate(model, context) == record["speedup"]


def test_decode_refuses_a_classifier_and_a_missing_baseline() -> None:
    with pytest.raises(ValueError, match="decode speed needs a causal LM; this task is 'classification'"):
        make_evaluator("ttft_ms").evaluate(tiny_bert(), _context("classification", None))
    with pytest.raises(ValueError, match=r"decode_speedup needs the baseline model in context\.reference"):
        make_evaluator("decode_speedup").evaluate(tiny_llama(), _context("causal-lm", None))


def test_a_classification_study_with_a_decode_objective_is_refused_at_load(tmp_path: Path) -> None:
    data = tiny_study(tmp_path, objectives=["accuracy", "decode_tokens_per_s"])
    with pytest.raises(StudyError, match=r"objectives\[1\].name: 'decode_tokens_per_s' measures task kind"):
        study_from_mapping(data)
    data = tiny_study(tmp_path, latency={"decode_tokens": 0})
    with pytest.raises(StudyError, match=r"latency.decode_tokens=0: give an integer >= 1"):
        study_from_mapping(data)


def test_resident_memory_is_measured_and_falls_with_4_bit_weights() -> None:
    base = wide_llama()
    weights = sum(p.numel() * p.element_size() for p in base.parameters())
    packed = apply_plan(copy.deepcopy(base), LLAMA_INT4).eval()
    evaluator = make_evaluator("memory_bytes")
    records = {}
    for name, model in (("fp32", base), ("int4", packed)):
        context = _context("causal-lm", base, vocab=4096)
        evaluator.evaluate(model, context)
        records[name] = context.records["memory"]
    fp32, int4 = records["fp32"]["resident_bytes"], records["int4"]["resident_bytes"]
    assert 0.8 * weights < fp32 < 2.0 * weights, records
    assert int4 < 0.5 * fp32, records
    assert records["fp32"]["workload"] == "prompt 1x8 + 6 tokens, KV cache"


def test_resident_memory_of_a_classifier_runs_its_forward_pass() -> None:
    context = _context("classification", None)
    value = make_evaluator("memory_bytes").evaluate(tiny_bert(), context)
    assert value == context.records["memory"]["resident_bytes"]
    assert context.records["memory"]["workload"] == "forward 1x8"


def test_a_causal_study_searches_memory_and_decode_speed(tmp_path: Path) -> None:
    data = tiny_lm_study(
        tmp_path,
        space={"default": {"bits": [32, 4]}, "embeddings": [32, 8]},
        objectives=["perplexity", "memory_bytes", "decode_speedup"],
        constraints={"max_memory_ratio": 2.0},
        budget={"trials": 3},
    )
    data["latency"] |= {"decode_tokens": 4, "time_budget": 5}
    result = run_study(study_from_mapping(data))
    study = result.study
    complete = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert len(complete) == 3 and result.front
    for trial in complete:
        records = trial.user_attrs["records"]
        assert trial.user_attrs["metrics"]["memory_bytes"] == records["memory"]["resident_bytes"]
        assert trial.user_attrs["metrics"]["decode_speedup"] == records["decode"]["speedup"]
    baseline = study.user_attrs["baseline"]
    assert baseline["memory_bytes"] > 0 and 0.2 < baseline["decode_speedup"] < 5.0
    # An export re-measures memory and decode speed and reports them; they need not repeat.
    report = export_trial(result.run_dir, complete[-1].number, tmp_path / "out")
    assert report.measured["memory_bytes"] > 0 and report.measured["decode_speedup"] > 0
    assert "memory_bytes" in (tmp_path / "out" / "README.md").read_text()
