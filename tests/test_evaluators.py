"""Evaluators on tiny models: known answers, the plugin protocol, the registry."""

from __future__ import annotations

import math
from types import SimpleNamespace
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from slimsearch.evaluators import (
    Accuracy,
    EvalContext,
    LatencyMs,
    LatencySpec,
    Perplexity,
    SizeBytes,
    make_evaluator,
)
from slimsearch.spaces import CompressionPlan, LayerSettings, apply_plan
from slimsearch.spaces.serialize import to_bytes
from tiny import tiny_bert, tiny_llama


class FixedLogits(nn.Module):
    """Predicts class 1 for rows whose first token is odd: a model with a known accuracy."""

    def forward(self, input_ids: torch.Tensor, attention_mask: Any = None) -> SimpleNamespace:
        odd = (input_ids[:, 0] % 2).float()
        return SimpleNamespace(logits=torch.stack([1 - odd, odd], dim=1))


def test_accuracy_counts_correct_rows() -> None:
    ids = torch.tensor([[1, 0], [2, 0], [3, 0], [4, 0]])
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": torch.tensor([1, 0, 0, 0])}
    ctx = EvalContext(task="classification", batches=[batch], vocab_size=8, plan=CompressionPlan())
    assert Accuracy().evaluate(FixedLogits(), ctx) == 75.0


def test_perplexity_matches_cross_entropy() -> None:
    model = tiny_llama()
    ids = torch.randint(0, 96, (2, 12), generator=torch.Generator().manual_seed(1))
    ctx = EvalContext(task="causal-lm", batches=[{"input_ids": ids}], vocab_size=96, plan=CompressionPlan())
    with torch.no_grad():
        logits = model(input_ids=ids).logits[:, :-1]
    expected = math.exp(F.cross_entropy(logits.reshape(-1, 96), ids[:, 1:].reshape(-1)).item())
    assert Perplexity().evaluate(model, ctx) == pytest.approx(expected, rel=1e-5)


def test_quality_evaluators_refuse_the_wrong_task() -> None:
    ctx = EvalContext(task="causal-lm", batches=[], vocab_size=8, plan=CompressionPlan())
    with pytest.raises(ValueError, match="needs a classification or token-classification task"):
        Accuracy().evaluate(FixedLogits(), ctx)


def test_size_is_serialized_bytes_and_shrinks_with_bits() -> None:
    base = tiny_bert()
    plan = CompressionPlan({"re:.*layer.*": LayerSettings(bits=8)})
    small = apply_plan(tiny_bert(), plan)
    ctx0 = EvalContext(task="classification", batches=[], vocab_size=96, plan=CompressionPlan())
    ctx1 = EvalContext(task="classification", batches=[], vocab_size=96, plan=plan)
    size0 = SizeBytes().evaluate(base, ctx0)
    size1 = SizeBytes().evaluate(small, ctx1)
    assert size0 == len(to_bytes(base, CompressionPlan()))
    assert size1 == len(to_bytes(small, plan))
    assert size1 < 0.75 * size0


def test_latency_returns_median_and_records_spread() -> None:
    ctx = EvalContext(
        task="classification",
        batches=[],
        vocab_size=96,
        plan=CompressionPlan(),
        latency=LatencySpec(batch_size=2, seq_len=8, warmup=1, repeats=5, threads=1),
    )
    value = LatencyMs().evaluate(tiny_bert(), ctx)
    rec = ctx.records["latency"]
    shape = rec["shapes"][0]
    assert value == rec["median_ms"] == shape["median_ms"] > 0
    assert shape["iqr_ms"] >= 0 and shape["batch_size"] == 2 and shape["cv"] >= 0
    assert rec["environment"]["threads"] == 1 and rec["environment"]["torch"] == torch.__version__
    assert torch.get_num_threads() == 1
    assert "ratio" not in shape  # no baseline model given, so no ratio is claimed


def test_latency_spec_validation() -> None:
    with pytest.raises(ValueError, match=r"latency\.seq_len"):
        LatencySpec(seq_len=0)


def test_custom_evaluator_plugs_in_by_reference() -> None:
    ev = make_evaluator("plugins.custom_eval:ParamCount")
    assert ev.name == "param_count" and ev.direction == "minimize"
    ctx = EvalContext(task="classification", batches=[], vocab_size=96, plan=CompressionPlan())
    model = tiny_bert()
    assert ev.evaluate(model, ctx) == sum(t.numel() for t in model.state_dict().values())


@pytest.mark.parametrize(
    ("ref", "message"),
    [
        ("nope", "unknown evaluator 'nope'"),
        ("plugins.custom_eval:Missing", "has no attribute 'Missing'"),
        ("plugins.custom_eval:NotAnEvaluator", "does not follow the evaluator protocol"),
        ("not_a_module_anywhere:X", "cannot import module"),
    ],
)
def test_bad_evaluator_references(ref: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        make_evaluator(ref)
