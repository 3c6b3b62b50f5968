"""Low-rank factorization of a Linear layer by truncated SVD."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from slimsearch.spaces.methods.realized import REALIZED


def max_useful_rank(in_features: int, out_features: int) -> int:
    """Largest rank r whose two factors, r * (in + out) weights, are smaller than in * out."""
    limit = (in_features * out_features) / (in_features + out_features)
    return max(int(limit - 1e-9), 0)


class LowRankLinear(nn.Module):
    """``up(down(x))``: a Linear of shape (out, in) replaced by (r, in) and (out, r) factors."""

    def __init__(
        self, down: nn.Module, up: nn.Module, in_features: int, out_features: int, rank: int
    ) -> None:
        super().__init__()
        self.down = down
        self.up = up
        self.in_features = in_features
        self.out_features = out_features
        self.rank = rank

    @classmethod
    def from_linear(cls, linear: nn.Linear, rank: int) -> LowRankLinear:
        n_in, n_out = linear.in_features, linear.out_features
        limit = max_useful_rank(n_in, n_out)
        if not 1 <= rank <= limit:
            raise ValueError(
                f"rank={rank} for a {n_out}x{n_in} Linear would not make it smaller: "
                f"use a rank from 1 to {limit} (in*out/(in+out))"
            )
        u, s, vh = torch.linalg.svd(linear.weight.detach().double(), full_matrices=False)
        root = s[:rank].sqrt()
        down = nn.Linear(n_in, rank, bias=False)
        up = nn.Linear(rank, n_out, bias=linear.bias is not None)
        with torch.no_grad():
            down.weight.copy_((root[:, None] * vh[:rank]).float())
            up.weight.copy_((u[:, :rank] * root[None, :]).float())
            if linear.bias is not None:
                up.bias.copy_(linear.bias.detach())
        return cls(down, up, n_in, n_out, rank)

    @property
    def realized(self) -> str:
        """Within the rank limit, fewer weights and fewer multiply-adds (methods/realized.py)."""
        return REALIZED["rank"]

    def forward(self, x: Tensor) -> Tensor:
        out: Tensor = self.up(self.down(x))
        return out

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}"
