"""Export folders round-trip: every compression method on tiny BERT and tiny Llama (tied and
untied head) loads back with identical outputs, and ``slimsearch export`` rebuilds a trial
of a real (tiny) study whose reported bytes and accuracy match what loads back."""

from __future__ import annotations

import argparse
import copy
import json
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import Tensor, nn
from transformers import LlamaForCausalLM

import slimsearch
from conftest import tiny_study
from slimsearch.evaluators import Accuracy, EvalContext
from slimsearch.search import models, tasks
from slimsearch.search.driver import run_study
from slimsearch.search.export import (
    INFO_FILE,
    PLAN_FILE,
    REALIZED_TEXT,
    WEIGHTS,
    ExportMismatch,
    realization,
    write_export,
)
from slimsearch.search.results import Run, open_run
from slimsearch.search.results_cli import add_commands
from slimsearch.search.study_file import StudyError, study_from_mapping
from slimsearch.spaces import CompressionPlan, LayerSettings, apply_plan, state_digest
from slimsearch.spaces.methods import PackedEmbedding, TiedHead
from slimsearch.spaces.testing import MethodCase, registry_cases
from tiny import LM_TEXT, MODELS, tiny_bert, tiny_llama


@pytest.fixture(scope="module")
def tokenizer() -> Any:
    return models._word_tokenizer(LM_TEXT.split(), 96)


def _inputs() -> dict[str, Tensor]:
    ids = torch.randint(3, 96, (2, 10), generator=torch.Generator().manual_seed(3))
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0
    return {"input_ids": ids, "attention_mask": mask}


@torch.no_grad()
def _logits(model: nn.Module) -> Tensor:
    out: Tensor = model(**_inputs()).logits
    return out


@pytest.mark.parametrize("model_name", sorted(MODELS))
@pytest.mark.parametrize("case", registry_cases(), ids=lambda c: c.name)
def test_every_method_round_trips(case: MethodCase, model_name: str, tokenizer: Any, tmp_path: Path) -> None:
    base = MODELS[model_name](0)
    plan = case.plan(base)
    if plan is None:
        pytest.skip(f"{case.name} does not apply to {model_name}")
    compressed = apply_plan(copy.deepcopy(base), plan, calibration=_inputs()).eval()
    expected = _logits(compressed)
    assert not torch.equal(expected, _logits(base)), "the plan should change the model"

    size = write_export(compressed, tokenizer, plan, tmp_path / "out")
    assert size == (tmp_path / "out" / WEIGHTS).stat().st_size
    assert json.loads((tmp_path / "out" / INFO_FILE).read_text())["size_bytes"] == size

    loaded, loaded_tokenizer = slimsearch.load(tmp_path / "out")
    assert type(loaded) is type(base)
    assert not loaded.training
    assert torch.equal(_logits(loaded), expected)
    mine, theirs = compressed.state_dict(), loaded.state_dict()
    assert mine.keys() == theirs.keys()
    for name, tensor in mine.items():
        assert theirs[name].dtype == tensor.dtype and torch.equal(theirs[name], tensor), name
    assert loaded_tokenizer("the model")["input_ids"] == tokenizer("the model")["input_ids"]


def test_tied_weights_stay_tied(tokenizer: Any, tmp_path: Path) -> None:
    # Embeddings off: the head and the table are one Parameter, stored once (an alias).
    base = tiny_llama(0)
    plan = CompressionPlan(layers={"model.layers.0.mlp.up_proj": LayerSettings(bits=8)})
    write_export(apply_plan(copy.deepcopy(base), plan), tokenizer, plan, tmp_path / "a")
    loaded, _ = slimsearch.load(tmp_path / "a")
    assert isinstance(loaded, LlamaForCausalLM)
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
    # Embeddings packed: the head becomes a TiedHead that reads the packed table.
    plan = CompressionPlan(layers={"model.embed_tokens": LayerSettings(bits=4)})
    compressed = apply_plan(copy.deepcopy(base), plan)
    write_export(compressed, tokenizer, plan, tmp_path / "b")
    loaded, _ = slimsearch.load(tmp_path / "b")
    assert isinstance(loaded.lm_head, TiedHead) and isinstance(loaded.model.embed_tokens, PackedEmbedding)
    assert loaded.lm_head._embedding[0] is loaded.model.embed_tokens
    assert torch.equal(_logits(loaded), _logits(compressed))


def test_load_refuses_incomplete_or_edited_folders(tokenizer: Any, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="not a slimsearch export"):
        slimsearch.load(tmp_path)
    plan = CompressionPlan(layers={"re:.*intermediate.dense": LayerSettings(bits=8)})
    write_export(apply_plan(tiny_bert(0), plan), tokenizer, plan, tmp_path / "out")
    other = CompressionPlan(layers={"re:.*intermediate.dense": LayerSettings(bits=4)})
    (tmp_path / "out" / PLAN_FILE).write_text(json.dumps(other.to_dict()))
    with pytest.raises(ValueError, match="differs from the plan inside"):
        slimsearch.load(tmp_path / "out")


def test_write_export_refuses_a_non_empty_folder(tokenizer: Any, tmp_path: Path) -> None:
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    plan = CompressionPlan()
    with pytest.raises(StudyError, match="not empty"):
        write_export(tiny_bert(0), tokenizer, plan, tmp_path / "out")
    assert (tmp_path / "out" / "keep.txt").read_text() == "mine"
    write_export(tiny_bert(0), tokenizer, plan, tmp_path / "out", overwrite=True)
    assert not (tmp_path / "out" / "keep.txt").exists()


# -- through a real (tiny) study ----------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> Run:
    root = tmp_path_factory.mktemp("study")
    run_study(study_from_mapping(tiny_study(root)))  # 8 trials
    return open_run(root / "run")


def _accuracy(run: Run, model: nn.Module, tokenizer: Any) -> float:
    spec = run.spec
    test = tasks.classification_splits(spec.task, run.cache_dir()).test
    batches = tasks.classification_batches(tokenizer, test, spec.task.max_length, spec.task.eval_batch_size)
    context = EvalContext(
        task="classification", batches=batches, vocab_size=len(tokenizer), plan=CompressionPlan()
    )
    return Accuracy().evaluate(model, context)


def test_export_trial_revalidates_and_loads_back(tiny_run: Run, tmp_path: Path) -> None:
    # The smallest front trial, not the knee: the knee depends on measured latency, so on timing.
    size = tiny_run.objectives.index("size_bytes")
    trial = min(tiny_run.front_numbers(), key=lambda n: tiny_run.trial(n).values[size])
    report = tiny_run.export(trial, tmp_path / "out", repeats=5)
    out = tmp_path / "out"
    for name in (WEIGHTS, "config.json", PLAN_FILE, INFO_FILE, "README.md", "tokenizer.json"):
        assert (out / name).is_file(), name
    assert report.size_bytes == (out / WEIGHTS).stat().st_size == report.measured["size_bytes"]
    info = json.loads((out / INFO_FILE).read_text())
    assert info["size_bytes"] == report.size_bytes and info["trial"] == trial and info["on_front"]
    # Rebuilt from the plan alone, it scores what the search measured.
    assert report.measured["accuracy"] == tiny_run.trial(trial).values[0]
    lat = report.latency
    assert lat.baseline_ms > 0 and lat.candidate_ms > 0 and lat.repeats == 5
    card = (out / "README.md").read_text()
    assert f"exactly {report.size_bytes} bytes" in card and f"ratio {lat.ratio:.3f}" in card
    assert report.realized and "not** on the study's Pareto front" not in card
    for kind, realized in report.realized.items():
        assert f"- {kind}: {REALIZED_TEXT[realized]}." in card
    stored = CompressionPlan.from_dict(json.loads((out / PLAN_FILE).read_text()))
    assert stored == CompressionPlan.from_dict(tiny_run.trial(trial).user_attrs["plan"])

    model, tokenizer = slimsearch.load(out)
    assert type(model).__name__ == "BertForSequenceClassification"
    for path, count in realization(model).items():  # what the loaded model really runs on
        assert f"- {count} x {path}" in card
    assert _accuracy(tiny_run, model, tokenizer) == report.measured["accuracy"]


def test_export_off_front_trial_warns(
    tiny_run: Run, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    off = [t.number for t in tiny_run.complete_trials() if t.number not in tiny_run.front_numbers()]
    if not off:
        pytest.skip("every trial of this tiny run is on the front")
    report = tiny_run.export(off[0], tmp_path / "out", repeats=3)
    assert not report.on_front
    assert "is not on the Pareto front" in capsys.readouterr().err
    assert "not** on the study's Pareto front" in (tmp_path / "out" / "README.md").read_text()


def test_export_bad_requests_name_the_fix(tiny_run: Run, tmp_path: Path) -> None:
    with pytest.raises(StudyError, match="the study has trials 0 to 7"):
        tiny_run.export(99, tmp_path / "a")
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "x").write_text("")
    with pytest.raises(StudyError, match="not empty"):
        tiny_run.export(tiny_run.front_numbers()[0], tmp_path / "b")
    with pytest.raises(StudyError, match="not a slimsearch run folder"):
        open_run(tmp_path)


def test_cli_export_command(tiny_run: Run, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    parser = argparse.ArgumentParser(prog="slimsearch")
    add_commands(parser.add_subparsers(dest="command", required=True))
    trial = tiny_run.front_numbers()[0]
    args = parser.parse_args(
        ["export", str(tiny_run.path), str(tmp_path / "out"), "--trial", str(trial), "--repeats", "3"]
    )
    assert args.func(args) == 0
    out = capsys.readouterr().out
    size = (tmp_path / "out" / WEIGHTS).stat().st_size
    assert f"weights: {size} bytes" in out and "latency vs baseline" in out


# -- the exported model is the measured model ------------------------------------------------
@pytest.fixture(scope="module")
def structured_run(tmp_path_factory: pytest.TempPathFactory) -> Run:
    root = tmp_path_factory.mktemp("structured")
    space = {
        "default": {"bits": [32, 8]},
        "structured": {"heads": [0.0, 0.5], "neurons": [0.0, 0.5]},
    }
    data = tiny_study(root, space=space, budget={"trials": 6}, constraints={"max_accuracy_drop": 100.0})
    data["screening"] = False
    run_study(study_from_mapping(data))
    return open_run(root / "run")


def _structured_trial(run: Run) -> int:
    for t in run.complete_trials():
        plan = CompressionPlan.from_dict(t.user_attrs["plan"])
        if (
            any(not s.is_off for s in plan.structured.values())
            and "reused_from" not in t.user_attrs["records"]
        ):
            return t.number
    raise AssertionError("the uniform seeds include structured plans: one must have run")


def test_export_of_a_structured_trial_is_the_searched_model(structured_run: Run, tmp_path: Path) -> None:
    # Heads and neurons are chosen on a calibration batch at trial time; the trial records
    # which were kept and the digest of its weights, and export rebuilds exactly that.
    number = _structured_trial(structured_run)
    records = structured_run.trial(number).user_attrs["records"]
    assert records["selection"] and len(records["state_sha256"]) == 64
    report = structured_run.export(number, tmp_path / "out", repeats=3)
    assert report.identical is True and report.state_sha256 == records["state_sha256"]
    assert report.measured["accuracy"] == structured_run.trial(number).values[0]
    assert report.size_bytes == structured_run.trial(number).user_attrs["metrics"]["size_bytes"]
    assert "bit for bit the model the search measured" in (tmp_path / "out" / "README.md").read_text()
    stored = CompressionPlan.from_dict(json.loads((tmp_path / "out" / PLAN_FILE).read_text()))
    assert dict(stored.selection) == records["selection"]  # the folder alone rebuilds it
    loaded, _ = slimsearch.load(tmp_path / "out")
    assert state_digest(loaded) == records["state_sha256"]
    # What the old export did (the plan without the calibration batch) is another model.
    base, _ = models.load_baseline(structured_run.baseline_dir(), "classification")
    plan = CompressionPlan.from_dict(structured_run.trial(number).user_attrs["plan"])
    assert state_digest(apply_plan(base, plan)) != records["state_sha256"]


def _tampered(run: Run, number: int, monkeypatch: pytest.MonkeyPatch, **attrs: Any) -> None:
    """Make ``run.trial(number)`` carry other user attributes (a finished trial's stored ones
    cannot be changed)."""
    trial = copy.deepcopy(run.trial(number))
    for key, value in attrs.items():
        trial.user_attrs[key] = dict(trial.user_attrs[key]) | value
    original = run.trial
    monkeypatch.setattr(run, "trial", lambda n: trial if n == number else original(n))


def test_export_refuses_a_rebuild_that_differs(
    structured_run: Run, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    number = _structured_trial(structured_run)
    _tampered(structured_run, number, monkeypatch, records={"state_sha256": "0" * 64})
    with pytest.raises(ExportMismatch, match="differs from the one the search measured"):
        structured_run.export(number, tmp_path / "refused", repeats=3)
    assert not (tmp_path / "refused").exists()  # nothing written
    report = structured_run.export(number, tmp_path / "forced", repeats=3, allow_mismatch=True)
    assert report.identical is False
    assert "differs from the model the search measured" in (tmp_path / "forced" / "README.md").read_text()


def test_export_refuses_a_revalidation_outside_rounding(
    structured_run: Run, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    number = _structured_trial(structured_run)
    accuracy = structured_run.trial(number).user_attrs["metrics"]["accuracy"]
    _tampered(structured_run, number, monkeypatch, metrics={"accuracy": accuracy - 20})
    with pytest.raises(
        ExportMismatch,
        match=r"differs from the search beyond rounding: accuracy [\d.]+ now, [\d.]+ in the search",
    ):
        structured_run.export(number, tmp_path / "refused", repeats=3)


def test_cli_export_mismatch_exits_non_zero(
    structured_run: Run, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from slimsearch.search import export

    number = _structured_trial(structured_run)
    monkeypatch.setattr(export, "measured_records", lambda run, trial: {"state_sha256": "f" * 64})
    parser = argparse.ArgumentParser(prog="slimsearch")
    add_commands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(
        ["export", str(structured_run.path), str(tmp_path / "o"), "--trial", str(number)]
    )
    with pytest.raises(ExportMismatch):
        args.func(args)
    from slimsearch.search.cli import main

    code = main(
        ["export", str(structured_run.path), str(tmp_path / "o"), "--trial", str(number), "--repeats", "2"]
    )
    assert code == 1 and not (tmp_path / "o").exists()
    assert "differs from the one the search measured" in capsys.readouterr().err
