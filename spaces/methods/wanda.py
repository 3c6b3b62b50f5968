"""Wanda pruning (the ``wanda`` knob; Sun et al., 2023): unstructured, activation-aware.

A weight's score is its magnitude times the norm of the input column it multiplies on the
calibration rows (``sqrt(act_sq)``); each output row drops its lowest-scoring fraction, or
``n`` of every ``m`` consecutive weights for an ``"n:m"`` value such as ``"2:4"``. No weight
is updated. Stored like magnitude sparsity (bitmask plus kept values), so realized for size
only.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any, ClassVar

import torch

from slimsearch.spaces.methods.pruning import check_amount, pattern, pattern_mask, row_mask, short_amount
from slimsearch.spaces.methods.registry import QAT, SIZE, LinearWork, Method, Scope, Stage, register


@register
class Wanda(Method):
    name = "wanda"
    position = 11
    stage: ClassVar[Stage] = "sparsify"
    scopes: ClassVar[frozenset[Scope]] = frozenset({"linear"})
    off = 0.0
    needs = frozenset({"act_sq"})
    qat: ClassVar[QAT] = "requantize"  # pruned entries stay zero while the kept ones train
    colorscale = "Reds"

    def check(self, value: Any) -> Any:
        return check_amount(self.name, value)

    def short(self, value: Any) -> str:
        return short_amount("w", value)

    def realized(self, value: Any) -> str:
        return SIZE

    def examples(self) -> tuple[Any, ...]:
        return (0.5, "2:4")

    def sparsify(self, work: LinearWork, value: Any) -> LinearWork:
        act = getattr(work.stats, "act_sq", None)
        norms = act.clamp_min(0).sqrt() if act is not None else torch.ones(work.in_features)
        score = work.weight.abs() * norms[None, :]
        if work.keep is not None:
            score = torch.where(work.keep, score, torch.full_like(score, -1.0))  # already pruned first
        nm = pattern(value)
        keep = pattern_mask(score, *nm) if nm else row_mask(score, float(value))
        if work.keep is not None:
            keep = keep & work.keep
        return replace(work, weight=work.weight * keep, keep=keep, made_by=(*work.made_by, self.name))
