"""The conformance suite every evaluator passes (the pattern of Optuna's
``optuna/testing/pytest_samplers.py``). To test an evaluator, subclass it::

    class TestMine(EvaluatorConformance):
        @pytest.fixture
        def evaluator(self): return make_evaluator("pkg.module:Mine")

        @pytest.fixture
        def model(self): return tiny_bert()          # a fresh eval-mode model

        @pytest.fixture
        def context(self, model): return EvalContext(...)   # the task's test batches

The contract:
- ``name`` is a non-empty string, ``direction`` "minimize" or "maximize", ``compare`` (when
  set) "difference" or "ratio", ``tasks`` (when set) a subset of the task kinds;
- ``evaluate`` returns a finite float;
- it changes neither the model (every tensor, and train/eval mode) nor the context's batches;
- a repeatable evaluator (``repeatable`` not False) that does not time (``exclusive`` not
  True) gives the same number twice on the same model.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from slimsearch.evaluators.base import EvalContext, Evaluator

TASK_KINDS = ("classification", "token-classification", "causal-lm")
COMPARES = ("difference", "ratio")


def _snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


class EvaluatorConformance:
    """Inherit and provide the ``evaluator``, ``model`` and ``context`` fixtures."""

    def test_declares_its_protocol(self, evaluator: Any) -> None:
        assert isinstance(evaluator, Evaluator)
        assert isinstance(evaluator.name, str) and evaluator.name
        assert evaluator.direction in ("minimize", "maximize")
        assert getattr(evaluator, "compare", "difference") in COMPARES
        tasks = getattr(evaluator, "tasks", None)
        assert tasks is None or (tasks and set(tasks) <= set(TASK_KINDS))

    def test_returns_a_finite_float(self, evaluator: Any, model: nn.Module, context: EvalContext) -> None:
        value = evaluator.evaluate(model, context)
        assert isinstance(value, float) and math.isfinite(value)

    def test_changes_neither_the_model_nor_the_data(
        self, evaluator: Any, model: nn.Module, context: EvalContext
    ) -> None:
        before = _snapshot(model)
        training = [m.training for m in model.modules()]
        batches = [{k: v.clone() for k, v in b.items()} for b in context.batches]
        evaluator.evaluate(model, context)
        after = model.state_dict()
        assert before.keys() == after.keys()
        assert all(torch.equal(before[k], after[k]) for k in before)
        assert [m.training for m in model.modules()] == training
        assert len(batches) == len(context.batches)
        for old, new in zip(batches, context.batches, strict=True):
            assert old.keys() == new.keys() and all(torch.equal(old[k], new[k]) for k in old)

    def test_repeats_its_number(self, evaluator: Any, model: nn.Module, context: EvalContext) -> None:
        if getattr(evaluator, "exclusive", False) or getattr(evaluator, "repeatable", True) is False:
            return  # a timing or a resident-memory reading moves from run to run by nature
        assert evaluator.evaluate(model, context) == evaluator.evaluate(model, context)
