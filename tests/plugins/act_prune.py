"""A compression method from outside slimsearch, in one file: activation-aware pruning.

Each output row keeps the entries with the largest |W_ij| * ||X_j|| (the weight times the
norm of its input column over the calibration rows, as in Wanda). It reads calibration
statistics, and it is "frozen" under distillation: its kept values are what it chose from
the statistics, so training must not move them. Name it in a study file:

    methods: ["plugins.act_prune:ActivationPruning"]
    space: {default: {act_sparsity: [0.0, 0.5]}}
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any, ClassVar

import torch

from slimsearch.spaces.methods import LinearWork, Method
from slimsearch.spaces.methods.registry import QAT, SIZE, Scope, Stage, is_fraction


class ActivationPruning(Method):
    name = "act_sparsity"
    stage: ClassVar[Stage] = "sparsify"
    scopes: ClassVar[frozenset[Scope]] = frozenset({"linear"})
    off = 0.0
    needs = frozenset({"act_sq"})
    qat: ClassVar[QAT] = "frozen"
    colorscale = "Greens"

    def check(self, value: Any) -> Any:
        if not is_fraction(value):
            raise ValueError(f"act_sparsity={value!r} is out of range: use a fraction in [0, 1)")
        return float(value)

    def short(self, value: Any) -> str:
        return f"a{value:g}"

    def realized(self, value: Any) -> str:
        return SIZE  # a bitmask and the kept values, computed densely

    def examples(self) -> tuple[Any, ...]:
        return (0.5,)

    def sparsify(self, work: LinearWork, value: Any) -> LinearWork:
        if work.stats is None or work.stats.act_sq is None:
            raise ValueError(
                "act_sparsity needs the calibration statistics of the layer's input, which this layer "
                "has none of (a low-rank factor's up half, or a layer whose input structured pruning changed)"
            )
        score = work.weight.abs() * work.stats.norms()[None, :]
        drop = round(float(value) * work.in_features)
        keep = torch.ones_like(work.weight, dtype=torch.bool)
        if drop:
            order = torch.sort(score, dim=1, stable=True).indices[:, :drop]
            keep.scatter_(1, order, False)
        if work.keep is not None:
            keep &= work.keep
        return replace(work, weight=work.weight * keep, keep=keep, made_by=(*work.made_by, self.name))


class ClashesWithBits(ActivationPruning):
    """Takes a built-in's name: naming it in a study file must fail (tests)."""

    name = "bits"
