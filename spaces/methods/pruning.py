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


def pattern(value: Any) -> tuple[int, int] | None:
    """(n, m) for an "n:m" value (n of every m consecutive weights of a row are zeroed, as in
    "2:4"); None for a fraction."""
    if not isinstance(value, str):
        return None
    n, sep, m = value.partition(":")
    if not (sep and n.isdigit() and m.isdigit() and 0 < int(n) < int(m) <= 16):
        raise ValueError(f"{value!r} is not an n:m pattern such as '2:4' (n of every m weights zeroed)")
    return int(n), int(m)


def check_amount(name: str, value: Any) -> Any:
    """A fraction in [0, 1) or an "n:m" pattern, for the pruning knobs that take both."""
    if isinstance(value, str):
        try:
            pattern(value)
        except ValueError as exc:
            raise ValueError(f"{name}={exc}") from None
        return value
    if not is_fraction(value):
        raise ValueError(
            f"{name}={value!r} is out of range: use a fraction in [0, 1), e.g. 0.5 to zero half "
            "of the weights, or a pattern such as '2:4'"
        )
    return float(value)


def short_amount(prefix: str, value: Any) -> str:
    return f"{prefix}{value}" if isinstance(value, str) else f"{prefix}{value:g}"


def pattern_mask(score: Tensor, n: int, m: int) -> Tensor:
    """Zero the ``n`` lowest-scoring of every ``m`` consecutive entries of each row (a row's
    tail shorter than ``m`` is kept)."""
    rows, cols = score.shape
    whole = cols - cols % m
    keep = torch.ones_like(score, dtype=torch.bool)
    if whole:
        chunks = score[:, :whole].reshape(rows, -1, m)
        low = torch.topk(chunks, n, dim=2, largest=False).indices
        mask = torch.ones_like(chunks, dtype=torch.bool).scatter_(2, low, False)
        keep[:, :whole] = mask.reshape(rows, whole)
    return keep


def row_mask(score: Tensor, sparsity: float) -> Tensor:
    """Zero the lowest-scoring ``sparsity`` fraction of each row (ties by position)."""
    cols = score.shape[1]
    n_drop = round(sparsity * cols)
    keep = torch.ones_like(score, dtype=torch.bool)
    if n_drop:
        order = torch.sort(score, dim=1, stable=True).indices
        keep.scatter_(1, order[:, :n_drop], False)
    return keep


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
