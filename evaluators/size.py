"""Size: bytes of the compressed model as slimsearch serializes it (safetensors + plan)."""

from __future__ import annotations

from torch import nn

from slimsearch.evaluators.base import Direction, EvalContext
from slimsearch.spaces.serialize import serialized_size


class SizeBytes:
    name = "size_bytes"
    compare = "ratio"
    direction: Direction = "minimize"

    def evaluate(self, model: nn.Module, context: EvalContext) -> float:
        return float(serialized_size(model, context.plan))
