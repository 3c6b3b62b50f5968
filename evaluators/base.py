"""The evaluator protocol and the context every evaluator receives.

Evaluators know nothing of Optuna or Ray: they take a torch model and a context and return
one number, so a user can test a plugin with plain torch.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal, Protocol, runtime_checkable

from torch import Tensor, nn

from slimsearch.spaces.plan import CompressionPlan

Direction = Literal["minimize", "maximize"]
TaskKind = Literal["classification", "causal-lm"]


@dataclass(frozen=True)
class LatencySpec:
    """How latency is measured: forward passes of one input shape, with a fixed thread count."""

    batch_size: int = 1
    seq_len: int = 64
    warmup: int = 5
    repeats: int = 20
    threads: int = 2

    def __post_init__(self) -> None:
        for name in ("batch_size", "seq_len", "warmup", "repeats", "threads"):
            value = getattr(self, name)
            low = 0 if name == "warmup" else 1
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise ValueError(f"latency.{name}={value!r}: give an integer >= {low}")


@dataclass
class EvalContext:
    """What an evaluator may use. ``batches`` are ready model inputs: for classification
    dicts of input_ids / attention_mask / labels; for causal LMs dicts of input_ids blocks.
    ``records`` collects details an evaluator wants kept with the trial (e.g. latency spread).
    """

    task: TaskKind
    batches: list[dict[str, Tensor]]
    vocab_size: int
    plan: CompressionPlan
    latency: LatencySpec = field(default_factory=LatencySpec)
    baseline: dict[str, float] = field(default_factory=dict)
    options: dict[str, Any] = field(default_factory=dict)
    records: dict[str, Any] = field(default_factory=dict)


@runtime_checkable
class Evaluator(Protocol):
    """A measurement of a compressed model: ``name``, ``direction`` and ``evaluate``."""

    name: str
    direction: Direction

    def evaluate(self, model: nn.Module, context: EvalContext) -> float: ...
