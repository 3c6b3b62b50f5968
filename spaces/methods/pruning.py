"""Unstructured magnitude pruning: which weights of a matrix to keep."""

from __future__ import annotations

import torch
from torch import Tensor


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
