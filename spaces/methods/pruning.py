"""Unstructured magnitude pruning: which weights of a matrix to keep."""

from __future__ import annotations

from dataclasses import replace
from typing import Any, ClassVar

import torch
from torch import Tensor

from slimsearch.spaces.methods.registry import (
    QAT,
    SIZE,
    LinearWork,
    Method,
    Scope,
    Stage,
    is_fraction,
    register,
)


def magnitude_mask(weight: Tensor, sparsity: float) -> Tensor:
    """Keep the largest-magnitude ``1 - sparsity`` fraction of the entries (ties by position).

    Deterministic: the same weight and sparsity always give the same mask.
    """
    if not 0.0 <= sparsity < 1.0:
        raise ValueError(f"sparsity={sparsity!r} must be in [0, 1)")
    flat = weight.detach().abs().reshape(-1)
    n_drop = round(sparsity * flat.numel())
    mask = torch.ones(flat.numel(), dtype=torch.bool)
    if n_drop:
        # A stable sort makes ties resolve by position, so masks are reproducible.
        order = torch.sort(flat, stable=True).indices
        mask[order[:n_drop]] = False
    return mask.view_as(weight)


@register
class Sparsity(Method):
    """Unstructured magnitude pruning (the ``sparsity`` knob): the fraction of a matrix's
    entries set to zero. Stored as a bitmask plus the kept values, computed densely, so it is
    realized for size only."""

    name = "sparsity"
    position = 10
    stage: ClassVar[Stage] = "sparsify"
    scopes: ClassVar[frozenset[Scope]] = frozenset({"linear"})
    off = 0.0
    qat: ClassVar[QAT] = "requantize"  # pruned entries stay zero while the kept ones train
    colorscale = "Reds"
    always_listed = True

    def check(self, value: Any) -> Any:
        if not is_fraction(value):
            raise ValueError(
                f"sparsity={value!r} is out of range: use a fraction in [0, 1), "
                "e.g. 0.5 to zero half of the weights"
            )
        return float(value)

    def check_choice(self, value: Any) -> Any:
        if not is_fraction(value):
            raise ValueError(f"sparsity: {value!r} is not allowed; use fractions in [0, 1) such as 0.5")
        return value

    def short(self, value: Any) -> str:
        return f"s{value:g}"

    def realized(self, value: Any) -> str:
        return SIZE

    def examples(self) -> tuple[Any, ...]:
        return (0.5,)

    def sparsify(self, work: LinearWork, value: Any) -> LinearWork:
        keep = magnitude_mask(work.weight, float(value))
        if work.keep is not None:
            keep = keep & work.keep
        return replace(work, weight=work.weight * keep, keep=keep, made_by=(*work.made_by, self.name))
