"""The architecture matrix: tiny random models of 22 transformers families, saved as a user
would, each searched end to end, its structured pruning checked against zeroed units, and
its exported front point loaded back to the searched number."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from families import FAMILIES, STRUCTURED, build, save_family

import slimsearch
from conftest import tiny_study
from slimsearch.evaluators import EvalContext, make_evaluator
from slimsearch.search.data import TaskData
from slimsearch.search.driver import run_study
from slimsearch.search.results import open_run
from slimsearch.search.study_file import study_from_mapping
from slimsearch.spaces import CompressionPlan, LayerSettings, StructuredSettings, apply_plan
from slimsearch.spaces.apply import compress
from slimsearch.spaces.linears import as_linears
from slimsearch.spaces.methods.structured import find_units, prune_structured
from slimsearch.spaces.space import DEFAULT_LAYERS as BLOCK_LINEARS
from tiny import sentiment_rows, zero_removed

LM = " ".join(t for t, _ in sentiment_rows(200))


def _study(name: str, tmp_path: Path) -> dict[str, object]:
    rows = sentiment_rows(48)
    kind = save_family(name, tmp_path / "model", [t for t, _ in rows] + [LM])
    if kind == "classification":
        task: dict[str, object] = {
            "kind": kind,
            "rows": rows,
            "train_size": 32,
            "test_size": 16,
            "max_length": 16,
        }
        quality = "accuracy"
    else:
        task = {"kind": kind, "text": LM * 3, "block_size": 16, "eval_blocks": 4}
        quality = "perplexity"
    space: dict[str, object] = {"default": {"bits": [32, 8, 4]}}
    if STRUCTURED[name]:
        space["structured"] = {kind: [0.0, 0.5] for kind in STRUCTURED[name]}
    return tiny_study(
        tmp_path,
        model={"source": str(tmp_path / "model")},
        task=task,
        space=space,
        objectives=[quality, "size_bytes"],
        constraints={},
        budget={"trials": 4},
    )


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_a_study_runs_and_its_export_loads_back(name: str, tmp_path: Path) -> None:
    spec = study_from_mapping(_study(name, tmp_path))
    result = run_study(spec)
    assert result.counts["complete"] == 4 and result.counts["failed"] == 0
    run = open_run(spec.output)
    size = run.objectives.index("size_bytes")
    smallest = min(run.front_numbers(), key=lambda n: run.trial(n).values[size])
    report = run.export(smallest, tmp_path / "out", repeats=3)  # re-measures: must equal the search
    quality = run.objectives[0]
    assert report.measured[quality] == run.trial(smallest).values[0]
    model, tokenizer = slimsearch.load(tmp_path / "out")
    data = TaskData(spec.task, spec.cache, tokenizer)
    context = EvalContext(
        task=spec.task.kind,  # type: ignore[arg-type]
        batches=data.test_batches(),
        vocab_size=len(tokenizer),
        plan=CompressionPlan(),
    )
    assert make_evaluator(quality).evaluate(model, context) == pytest.approx(
        report.measured[quality], rel=1e-6
    )


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_structured_pruning_equals_the_model_with_the_removed_units_zeroed(name: str) -> None:
    model = build(name)
    as_linears(model)
    with torch.no_grad():  # weights large enough that every unit matters
        for p in model.parameters():
            p.normal_(0, 0.3)
    units = find_units(model)
    assert sorted({u.kind for u in units}) == sorted(STRUCTURED[name])
    if not units:
        return
    reference = copy.deepcopy(model)
    ids = torch.randint(4, 120, (2, 10), generator=torch.Generator().manual_seed(2))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    kept = prune_structured(model, {(u.block, u.kind): 0.5 for u in units}, batch)
    zero_removed(reference, units, kept)
    with torch.no_grad():
        torch.testing.assert_close(model(**batch).logits, reference(**batch).logits, atol=1e-4, rtol=1e-4)
    assert sum(p.numel() for p in model.parameters()) < sum(p.numel() for p in reference.parameters())


@pytest.mark.parametrize(("name", "layers"), [("gpt2", 8), ("falcon", 8)])
def test_linears_under_other_classes_become_equal_linears(name: str, layers: int) -> None:
    model = build(name)
    ids = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = model(ids).logits
        # GPT-2: c_attn, c_proj, c_fc, c_proj in each of 2 blocks; Falcon: qkv, dense, h_to_4h, 4h_to_h
        assert as_linears(model) == layers
        torch.testing.assert_close(model(ids).logits, before, atol=1e-6, rtol=1e-6)
    assert as_linears(model) == 0
    assert all(type(m) is torch.nn.Linear for m in model.modules() if isinstance(m, torch.nn.Linear))


@pytest.mark.parametrize("name", sorted(n for n in FAMILIES if STRUCTURED[n]))
def test_a_structurally_pruned_model_exports_and_loads_back_equal(name: str, tmp_path: Path) -> None:
    from slimsearch.search.export import write_export
    from slimsearch.search.models import _word_tokenizer

    model = build(name)
    as_linears(model)
    offered = {kind: 0.5 for kind in STRUCTURED[name]}
    plan = CompressionPlan(
        layers={BLOCK_LINEARS: LayerSettings(bits=8)}, structured={"re:.*": StructuredSettings(**offered)}
    )
    ids = torch.randint(4, 120, (2, 10), generator=torch.Generator().manual_seed(3))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    plan = compress(model, plan, calibration=batch)  # with the kept heads and neurons recorded
    compressed = model.eval()
    with torch.no_grad():
        expected = compressed(**batch).logits
    write_export(compressed, _word_tokenizer(LM.split(), 128), plan, tmp_path / "out")
    loaded, _ = slimsearch.load(tmp_path / "out")
    with torch.no_grad():
        assert torch.equal(loaded(**batch).logits, expected)


def test_a_rebuild_without_the_kept_alibi_heads_is_refused(tmp_path: Path) -> None:
    from slimsearch.search.export import write_export
    from slimsearch.search.models import _word_tokenizer

    model = build("bloom")
    as_linears(model)
    plan = CompressionPlan(structured={"re:.*": StructuredSettings(heads=0.5)})
    apply_plan(model, plan)  # the plan as written, without the kept heads compress() records
    write_export(model, _word_tokenizer(LM.split(), 128), plan, tmp_path / "out")
    with pytest.raises(ValueError, match="records no kept heads for this ALiBi attention"):
        slimsearch.load(tmp_path / "out")
