"""Screening for causal LMs: the first evaluation blocks, paired with the baseline (KL and a
perplexity-ratio bound), reject a trial before its full score."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import optuna
import pytest
import torch

from conftest import tiny_study
from slimsearch.evaluators import EvalContext
from slimsearch.evaluators.quality import Perplexity
from slimsearch.search import models, worker
from slimsearch.search.driver import run_study
from slimsearch.search.jobs import Jobs
from slimsearch.search.study_file import StudyError, study_from_mapping
from slimsearch.spaces import CompressionPlan, LayerSettings
from tiny import LM_TEXT, tiny_llama_config

INT4 = CompressionPlan(layers={r"re:model\.layers\.\d+\..*": LayerSettings(bits=4)})


def causal(tmp_path: Path, ratio: float, **overrides: Any) -> dict[str, Any]:
    return tiny_study(
        tmp_path,
        model={"config": tiny_llama_config()},
        task={"kind": "causal-lm", "text": LM_TEXT, "block_size": 8, "eval_blocks": 4},
        space={"default": {"bits": [32, 4]}},
        objectives=["perplexity", "size_bytes"],
        constraints={"max_perplexity_ratio": ratio},
        screening={"tokens": 8},
        **overrides,
    )


def test_the_screen_is_the_perplexity_ratio_on_its_blocks_and_the_kl(tmp_path: Path) -> None:
    spec = study_from_mapping(causal(tmp_path, 1.1))
    baseline_dir = models.prepare_baseline(spec)
    jobs = Jobs(spec, baseline_dir, {"perplexity": 10.0})
    job = jobs.job(0, INT4)
    assert job.screen is not None and job.screen.blocks == 1 and job.screen.max_ratio == 1.1
    model, _, _ = worker.measured_model(job)
    ids = worker.screen_blocks(worker.job_data(job), job.screen.blocks)
    record = worker.lm_screen_record(job, model, ids)
    # The same ratio as perplexity on those blocks, computed the evaluator's way.
    context = EvalContext(
        task="causal-lm", batches=[{"input_ids": ids}], vocab_size=0, plan=CompressionPlan()
    )
    base = Perplexity().evaluate(worker.cached_baseline(job)[0], context)
    ours = Perplexity().evaluate(model, context)
    assert record["perplexity_ratio"] == pytest.approx(ours / base, rel=1e-5)
    assert record["tokens"] == ids.shape[0] * (ids.shape[1] - 1) == 7
    assert record["kl"] > 0 and record["lower_bound"] < record["perplexity_ratio"]
    # The baseline's own plan: no divergence, ratio 1.
    same, _, _ = worker.measured_model(jobs.job(1, CompressionPlan()))
    again = worker.lm_screen_record(job, same, ids)
    assert again["kl"] == pytest.approx(0.0, abs=1e-6) and again["perplexity_ratio"] == pytest.approx(1.0)


def test_a_study_screens_out_what_its_limit_rules_out(tmp_path: Path) -> None:
    # A limit below the baseline itself (0.5x) rules out every plan, the all-off one too.
    strict = run_study(study_from_mapping(causal(tmp_path / "strict", 0.5, budget={"trials": 2})))
    trials = strict.study.get_trials()
    assert [t.state for t in trials] == [optuna.trial.TrialState.PRUNED] * 2
    for t in trials:
        screen = t.user_attrs["records"]["screen"]
        assert screen["lower_bound"] > screen["threshold"] == 0.5
        assert t.user_attrs["records"]["fidelity"] == "screen"
    # A generous one lets them through to the full score, with the screen recorded.
    loose = run_study(study_from_mapping(causal(tmp_path / "loose", 100.0, budget={"trials": 2})))
    complete = loose.study.get_trials(states=[optuna.trial.TrialState.COMPLETE])
    assert len(complete) == 2
    for t in complete:
        assert t.user_attrs["records"]["fidelity"] == "full"
        assert math.isfinite(t.user_attrs["records"]["screen"]["kl"])


def test_lm_screening_off_without_tokens(tmp_path: Path) -> None:
    data = causal(tmp_path, 1.1)
    data["screening"] = {"examples": 200}
    spec = study_from_mapping(data)
    assert Jobs(spec, tmp_path, {"perplexity": 10.0}).job(0, INT4).screen is None


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"task": {"kind": "classification"}}, "it screens causal LMs"),
        ({"screening": {"tokens": 32}}, r"takes 4 of the 4 evaluation blocks.*give at most 24"),
        ({"screening": {"tokens": 0}}, "screening.tokens"),
    ],
)
def test_bad_lm_screening_is_refused_at_load(tmp_path: Path, change: dict[str, Any], message: str) -> None:
    data = causal(tmp_path, 1.1)
    if "task" in change:
        data = tiny_study(tmp_path, screening={"tokens": 8})
    else:
        data |= change
    with pytest.raises(StudyError, match=message):
        study_from_mapping(data)


def test_screen_blocks_are_the_first_evaluation_blocks(tmp_path: Path) -> None:
    spec = study_from_mapping(causal(tmp_path, 1.1))
    job = Jobs(spec, models.prepare_baseline(spec)).job(0, INT4)
    data = worker.job_data(job)
    first = torch.cat([b["input_ids"] for b in data.test_batches()])[:2]
    assert torch.equal(worker.screen_blocks(data, 2), first)
