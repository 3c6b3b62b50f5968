"""A method from a user's package is one file: it passes the conformance suite generated
from the registry and runs a whole tiny study (search, export, load)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from optuna.trial import TrialState

from conftest import tiny_study
from slimsearch.search import export
from slimsearch.search.driver import run_study
from slimsearch.search.results import open_run
from slimsearch.search.study_file import StudyError, study_from_mapping
from slimsearch.spaces import CompressionPlan, LayerSettings, apply_plan
from slimsearch.spaces.methods import Method, registry
from slimsearch.spaces.methods.registry import LinearWork, register
from slimsearch.spaces.testing import MethodCase, cases_for
from tiny import OnTinyModels, tiny_bert

PLUGIN = "plugins.act_prune:ActivationPruning"
BLOCK_LINEARS = r"re:.*\b(layer|layers)\.\d+\..*"


@pytest.fixture(scope="module")
def plugin() -> Iterator[Method]:
    method = registry.resolve(PLUGIN)
    yield method
    registry.unregister(method.name)


def _cases(method: Method) -> list[MethodCase]:
    both = {"act_sparsity": 0.5, "bits": 4}
    combined = MethodCase(
        "act_sparsity+bits",
        lambda m: CompressionPlan(layers={BLOCK_LINEARS: LayerSettings(**both)}),
        ("act_sparsity", "bits4"),
    )
    return [*cases_for(method), combined]


class TestPluginMethod(OnTinyModels):
    @pytest.fixture(params=[0, 1], ids=["alone", "with-bits"])
    def case(self, request: pytest.FixtureRequest, plugin: Method) -> MethodCase:
        return _cases(plugin)[request.param]


def test_plugin_cases_are_generated(plugin: Method) -> None:
    assert [c.name for c in cases_for(plugin)] == ["act_sparsity=0.5"]


def test_plugin_refuses_layers_without_statistics(plugin: Method) -> None:
    plan = CompressionPlan(layers={BLOCK_LINEARS: LayerSettings(act_sparsity=0.5)})
    with pytest.raises(ValueError, match="act_sparsity needs the calibration statistics"):
        apply_plan(tiny_bert(0), plan)  # no calibration batch, no statistics
    rank = CompressionPlan(layers={BLOCK_LINEARS: LayerSettings(act_sparsity=0.5, rank=2)})
    ids = torch.randint(3, 96, (2, 8))
    with pytest.raises(ValueError, match="low-rank factor"):
        apply_plan(tiny_bert(0), rank, calibration={"input_ids": ids, "attention_mask": torch.ones_like(ids)})


def test_registry_refuses_duplicates_and_unknown_names(plugin: Method) -> None:
    with pytest.raises(ValueError, match="'act_sparsity' is already registered"):
        register(type(plugin))
    with pytest.raises(ValueError, match=r"unknown compression method 'quip'.*'act_sparsity'.*'bits'"):
        registry.get("quip")
    with pytest.raises(ValueError, match="unknown method 'quip'"):
        LayerSettings(quip=4)
    with pytest.raises(
        ValueError, match=r"named 'bits', which slimsearch\.spaces\.methods\.bits\.Bits already registered"
    ):
        registry.resolve("plugins.act_prune:ClashesWithBits")
    with pytest.raises(ValueError, match="no Method subclass named 'Nope'"):
        registry.resolve("plugins.act_prune:Nope")

    class BadStage(Method):
        name = "bad_stage"
        stage = "later"  # type: ignore[assignment]
        scopes = frozenset({"linear"})
        off = 0

    with pytest.raises(ValueError, match="stage 'later' is not one of"):
        register(BadStage)


def test_plugin_runs_a_tiny_study_and_its_export_loads(plugin: Method, tmp_path: Path) -> None:
    data = tiny_study(
        tmp_path,
        methods=[PLUGIN],
        space={"default": {"bits": [32, 8], "act_sparsity": [0.0, 0.5]}},
        budget={"trials": 6},
    )
    result = run_study(study_from_mapping(data))
    run = open_run(result.run_dir)
    trials = [t for t in run.study.trials if t.state == TrialState.COMPLETE]
    assert len(trials) == 6
    pruned = [t for t in trials if "a0.5" in CompressionPlan.from_dict(t.user_attrs["plan"]).summary()]
    assert pruned, "the uniform seeds include act_sparsity 0.5 on every layer"
    # The whole-layer seed is smaller than the baseline and was measured, not guessed.
    assert min(t.values[1] for t in pruned) < run.baseline["size_bytes"]
    report = run.export(pruned[0].number, tmp_path / "out", repeats=3)
    assert report.identical
    model, _ = export.load(tmp_path / "out")
    layer = model.bert.encoder.layer[0].attention.self.query
    assert "act_sparsity" in layer.made_by and layer.sparse


def test_study_file_names_a_missing_method_before_any_work(tmp_path: Path) -> None:
    with pytest.raises(StudyError, match=r"methods: method 'plugins\.nope:X': cannot import 'plugins\.nope'"):
        study_from_mapping(tiny_study(tmp_path, methods=["plugins.nope:X"]))
    with pytest.raises(StudyError, match="unknown knob"):
        study_from_mapping(tiny_study(tmp_path, space={"default": {"act_sparsity_typo": [0.0]}}))


def test_layer_work_is_plain_data() -> None:
    work = LinearWork(torch.ones(2, 3), None)
    assert (work.in_features, work.out_features) == (3, 2)
