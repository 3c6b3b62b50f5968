"""Low-rank factorization of a Linear layer by truncated SVD."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar, cast

import torch
from torch import Tensor, nn

from slimsearch.spaces.methods.registry import BOTH, QAT, LinearWork, Method, Scope, Stage, Switch, register


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
        bias = linear.bias.detach() if linear.bias is not None else None
        return cls.from_weight(linear.weight.detach(), bias, rank)

    @classmethod
    def from_weight(
        cls, weight: Tensor, bias: Tensor | None, rank: int, hessian: Tensor | None = None
    ) -> LowRankLinear:
        """Truncated SVD of ``weight``; with the input's ``hessian`` (X^T X), of the weight
        whitened by its Cholesky factor (SVD-LLM), which minimizes the output error on the
        calibration rows instead of the weight error."""
        n_out, n_in = weight.shape
        limit = max_useful_rank(n_in, n_out)
        if not 1 <= rank <= limit:
            raise ValueError(
                f"rank={rank} for a {n_out}x{n_in} Linear would not make it smaller: "
                f"use a rank from 1 to {limit} (in*out/(in+out))"
            )
        w = weight.detach().double()
        factor = _whitening(hessian) if hessian is not None else None
        u, s, vh = torch.linalg.svd(w if factor is None else w @ factor, full_matrices=False)
        root = s[:rank].sqrt()
        v = vh[:rank]
        if factor is not None:
            # (W L) ~ U S V^T, so W ~ U S (V^T L^-1): solve instead of inverting L.
            v = torch.linalg.solve_triangular(factor, v, upper=False, left=False)
        down = nn.Linear(n_in, rank, bias=False)
        up = nn.Linear(rank, n_out, bias=bias is not None)
        with torch.no_grad():
            down.weight.copy_((root[:, None] * v).float())
            up.weight.copy_((u[:, :rank] * root[None, :]).float())
            if bias is not None:
                up.bias.copy_(bias)
        return cls(down, up, n_in, n_out, rank)

    @property
    def realized(self) -> str:
        """Within the rank limit, fewer weights and fewer multiply-adds."""
        return BOTH

    @property
    def compute_path(self) -> str:
        return f"low-rank pair (rank {self.rank}): fewer FLOPs"

    def forward(self, x: Tensor) -> Tensor:
        out: Tensor = self.up(self.down(x))
        return out

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}"


@register
class Rank(Method):
    """Low-rank factorization (the ``rank`` knob). A study file lists the fraction of the
    layer's weights kept (1.0 = off); a plan stores the absolute rank (None = full rank)."""

    name = "rank"
    position = 30
    stage: ClassVar[Stage] = "factorize"
    scopes: ClassVar[frozenset[Scope]] = frozenset({"linear"})
    off = None
    choice_off = 1.0
    qat: ClassVar[QAT] = "train"
    colorscale = "Blues_r"
    always_listed = True

    def check(self, value: Any) -> Any:
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ValueError(f"rank={value!r} must be a positive integer, or None for full rank")
        return value

    def check_choice(self, value: Any) -> Any:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 < value <= 1.0:
            raise ValueError(
                f"rank: {value!r} is not allowed; use the fraction of weights kept, in (0, 1], "
                "with 1.0 meaning full rank (off)"
            )
        return value

    def setting(self, choice: Any, shape: tuple[int, int] | None) -> Any:
        if float(choice) >= 1.0:
            return None
        if shape is None:
            raise ValueError("rank applies to Linear layers only")
        return max(1, int(float(choice) * max_useful_rank(*shape)))

    def is_off(self, value: Any) -> bool:
        return value is None

    def short(self, value: Any) -> str:
        return f"r{value}"

    def display(self, value: Any) -> str:
        return "full" if value is None else f"{value:g}"

    def realized(self, value: Any) -> str:
        return BOTH

    def examples(self) -> tuple[Any, ...]:
        return (4,)

    def factorize(self, work: LinearWork, value: Any) -> tuple[nn.Module, dict[str, LinearWork]]:
        hessian = getattr(work.stats, "hessian", None) if work.options.get("whiten") else None
        low = LowRankLinear.from_weight(work.weight, work.bias, int(value), hessian)
        made_by = (*work.made_by, self.name)
        # The down factor sees the layer's input; what the up factor sees was never observed.
        down, up = cast(nn.Linear, low.down), cast(nn.Linear, low.up)  # from_weight builds Linears
        parts = {
            "down": LinearWork(down.weight.detach(), None, stats=work.stats, made_by=made_by),
            "up": LinearWork(up.weight.detach(), _bias(up), made_by=made_by),
        }
        return low, parts


def _whitening(hessian: Tensor) -> Tensor:
    """Lower Cholesky factor L of the (damped) Hessian, H = L L^T."""
    h = hessian.detach().double()
    mean = float(torch.diagonal(h).mean()) or 1.0
    eye = torch.eye(h.shape[0], dtype=h.dtype)
    for damp in (1e-6, 1e-4, 1e-2, 1e-1):
        factor, info = torch.linalg.cholesky_ex(h + damp * mean * eye)
        if int(info) == 0:
            return factor
    raise ValueError(
        "the layer's Hessian is not positive definite even with damping; check the calibration rows"
    )


@register
class Whiten(Switch):
    """Activation-aware low-rank (the ``whiten`` knob): with ``rank``, factorize the weight
    whitened by the Cholesky factor of its input's Hessian (SVD-LLM), so the rank kept serves
    the outputs on real inputs rather than the weight entries."""

    name = "whiten"
    option_base: ClassVar[Mapping[str, Any]] = {"rank": 4}
    position = 31
    stage: ClassVar[Stage] = "factorize"
    option_of: ClassVar[Stage | None] = "factorize"
    scopes: ClassVar[frozenset[Scope]] = frozenset({"linear"})
    needs = frozenset({"hessian"})
    qat: ClassVar[QAT] = "train"
    colorscale = "Blues"

    def short(self, value: Any) -> str:
        return "wh"

    def realized(self, value: Any) -> str:
        return BOTH

    def examples(self) -> tuple[Any, ...]:
        return (True,)


def _bias(linear: nn.Linear) -> Tensor | None:
    return linear.bias.detach() if linear.bias is not None else None
