"""SparseGPT pruning (the ``sparsegpt`` knob; Frantar and Alistarh, 2023).

Unstructured pruning with Hessian error feedback: columns are visited in blocks; in each
block the weights with the lowest ``w^2 / [H^-1]_jj^2`` are pruned (that fraction of the
block, or ``n`` of every ``m`` consecutive weights of a row for ``"n:m"`` such as ``"2:4"``),
and each pruned weight's error is pushed onto the columns not yet visited, weighted by the
inverse Hessian of the layer's input. Kept weights change, so a quantizer after it stores
the updated values. Stored like magnitude sparsity (bitmask plus kept values): realized for
size only.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any, ClassVar

import torch
from torch import Tensor

from slimsearch.spaces.methods.gptq import _inverse_cholesky, working_copies
from slimsearch.spaces.methods.pruning import check_amount, pattern, short_amount
from slimsearch.spaces.methods.registry import QAT, SIZE, LinearWork, Method, Scope, Stage, register

BLOCK = 128
DAMP = 0.01


def sparsegpt(
    weight: Tensor, hessian: Tensor, value: Any, keep: Tensor | None = None, damp: float = DAMP
) -> tuple[Tensor, Tensor]:
    """The pruned and updated weight, and the mask of what it keeps. Entries ``keep`` already
    pruned stay pruned (and count toward the fraction)."""
    w, h = working_copies(weight, hessian)
    rows, cols = w.shape
    h += damp * torch.diagonal(h).mean() * torch.eye(cols, dtype=h.dtype)
    hinv = _inverse_cholesky(h).float()
    nm = pattern(value)
    pruned = torch.zeros(rows, cols, dtype=torch.bool)
    for i1 in range(0, cols, BLOCK):
        i2 = min(i1 + BLOCK, cols)
        w1 = w[:, i1:i2].clone()
        err1 = torch.zeros_like(w1)
        hinv1 = hinv[i1:i2, i1:i2]
        diag = torch.diagonal(hinv1)
        before = ~keep[:, i1:i2] if keep is not None else torch.zeros_like(w1, dtype=torch.bool)
        mask1 = before.clone()
        if nm is None:
            score = w1**2 / diag[None, :] ** 2
            score = torch.where(before, torch.full_like(score, -1.0), score)
            n_drop = round(float(value) * score.numel())
            if n_drop:
                order = torch.sort(score.reshape(-1), stable=True).indices[:n_drop]
                mask1.view(-1)[order] = True
        for i in range(i2 - i1):
            if nm is not None and i % nm[1] == 0:
                width = min(nm[1], i2 - i1 - i)
                if width == nm[1]:
                    score = w1[:, i : i + width] ** 2 / diag[None, i : i + width] ** 2
                    score = torch.where(before[:, i : i + width], torch.full_like(score, -1.0), score)
                    low = torch.topk(score, nm[0], dim=1, largest=False).indices
                    mask1[:, i : i + width].scatter_(1, low, True)
            col = w1[:, i]
            q = torch.where(mask1[:, i], torch.zeros_like(col), col)
            err = (col - q) / hinv1[i, i]
            w1[:, i:] -= err[:, None] * hinv1[i, i:][None, :]
            w1[:, i] = q
            err1[:, i] = err
        w[:, i1:i2] = w1
        pruned[:, i1:i2] = mask1
        w[:, i2:] -= err1 @ hinv[i1:i2, i2:]
    kept = ~pruned
    return w * kept, kept


@register
class SparseGPT(Method):
    name = "sparsegpt"
    position = 12
    stage: ClassVar[Stage] = "sparsify"
    scopes: ClassVar[frozenset[Scope]] = frozenset({"linear"})
    off = 0.0
    needs = frozenset({"hessian"})
    qat: ClassVar[QAT] = "requantize"  # the mask stays; kept weights may train on
    colorscale = "Reds"

    def check(self, value: Any) -> Any:
        return check_amount(self.name, value)

    def short(self, value: Any) -> str:
        return short_amount("sgpt", value)

    def realized(self, value: Any) -> str:
        return SIZE

    def examples(self) -> tuple[Any, ...]:
        return (0.5, "2:4")

    def sparsify(self, work: LinearWork, value: Any) -> LinearWork:
        hessian = getattr(work.stats, "hessian", None)
        if hessian is None:
            hessian = torch.eye(work.in_features)  # never observed: magnitude pruning per block
        weight, keep = sparsegpt(work.weight, hessian, value, work.keep)
        if work.keep is not None:
            keep = keep & work.keep
        return replace(work, weight=weight * keep, keep=keep, made_by=(*work.made_by, self.name))
