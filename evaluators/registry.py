"""Evaluators by name: the built-ins, or a user's class given as ``package.module:Name``."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

from slimsearch.evaluators.base import Evaluator
from slimsearch.evaluators.choice import ChoiceAccuracy
from slimsearch.evaluators.decode import DecodeSpeedup, DecodeTokensPerS, TimeToFirstToken
from slimsearch.evaluators.latency import LatencyMs, LatencyRatio
from slimsearch.evaluators.lm_eval_task import LmEvalTask
from slimsearch.evaluators.memory import ResidentBytes
from slimsearch.evaluators.quality import Accuracy, Perplexity
from slimsearch.evaluators.size import SizeBytes
from slimsearch.evaluators.token_f1 import TokenF1

_REGISTRY: dict[str, Callable[..., Any]] = {}


def register_evaluator(name: str, factory: Callable[..., Any]) -> None:
    if name in _REGISTRY:
        raise ValueError(f"an evaluator named {name!r} is already registered")
    _REGISTRY[name] = factory


for _cls in (
    Accuracy,
    Perplexity,
    SizeBytes,
    LatencyMs,
    LatencyRatio,
    TimeToFirstToken,
    DecodeTokensPerS,
    DecodeSpeedup,
    ResidentBytes,
    ChoiceAccuracy,
    LmEvalTask,
    TokenF1,
):
    register_evaluator(_cls.name, _cls)


def evaluator_names() -> list[str]:
    return sorted(_REGISTRY)


def import_object(ref: str) -> Any:
    """Import ``package.module:Name``."""
    module_name, _, attr = ref.partition(":")
    if not module_name or not attr:
        raise ValueError(f"{ref!r} is not of the form package.module:Name")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ValueError(f"cannot import module {module_name!r} for {ref!r}: {exc}") from None
    try:
        return getattr(module, attr)
    except AttributeError:
        raise ValueError(f"module {module_name!r} has no attribute {attr!r} (from {ref!r})") from None


def make_evaluator(ref: str, options: dict[str, Any] | None = None) -> Evaluator:
    """Build an evaluator from a registered name or ``package.module:Name``."""
    if ":" in ref:
        factory = import_object(ref)
    elif ref in _REGISTRY:
        factory = _REGISTRY[ref]
    else:
        raise ValueError(
            f"unknown evaluator {ref!r}: choose one of {evaluator_names()} "
            "or give your own class as package.module:Name"
        )
    evaluator = factory(**(options or {}))
    if not isinstance(evaluator, Evaluator):
        raise ValueError(
            f"{ref!r} does not follow the evaluator protocol: it needs a 'name', a 'direction' "
            "('minimize' or 'maximize') and evaluate(model, context) -> float"
        )
    if evaluator.direction not in ("minimize", "maximize"):
        raise ValueError(f"{ref!r} has direction {evaluator.direction!r}; use 'minimize' or 'maximize'")
    return evaluator
