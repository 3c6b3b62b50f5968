"""GPTQ (the ``gptq`` knob): codes chosen column by column with Hessian error feedback.

An option of the quantize stage: with ``bits`` at 8, 4, 3 or 2 it replaces round-to-nearest
by GPTQ (Frantar et al., 2022) on the same grid and storage, so bytes do not change. Each
column is rounded in turn and its rounding error, weighted by the inverse Hessian of the
layer's input (``X^T X`` on the calibration rows), is pushed onto the columns not yet rounded.

A value is ``true`` (act-order on, damping 0.01) or settings as ``"act_order=0,damp=0.05"``:
- ``act_order``: round the columns with the largest Hessian diagonal first. The group scales
  are then fitted once on the original weights ("static groups"), so groups stay contiguous
  columns and the storage layout is the same;
- ``damp``: added to the Hessian diagonal, as a fraction of its mean;
- ``weighted``: 1 fits the group scales and offsets by least squares weighted by the Hessian
  diagonal (each column by its input's energy), in the manner of NNCF's scale estimation;
  0 (the default) fits them unweighted.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import torch
from torch import Tensor

from slimsearch.spaces.methods.quantize import GRID_BITS, Grid
from slimsearch.spaces.methods.registry import QAT, LinearWork, Method, Scope, Stage, register

DEFAULTS: dict[str, float] = {"act_order": 1.0, "damp": 0.01, "weighted": 0.0}
# Settings spelled out only when not at their default, so values from before they existed
# keep their spelling (and their stored layers).
OMITTED_AT_DEFAULT = frozenset({"weighted"})
BLOCK = 128  # columns updated together before the rest of the matrix (lazy batch updates)


def parse(value: Any) -> dict[str, float]:
    """The settings a plan value stands for (ValueError naming what is allowed)."""
    if value is True:
        return dict(DEFAULTS)
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"gptq={value!r}: use true, false or settings such as 'act_order=0,damp=0.05'")
    out = dict(DEFAULTS)
    for part in value.split(","):
        key, sep, raw = part.partition("=")
        key = key.strip()
        if not sep or key not in DEFAULTS:
            raise ValueError(
                f"gptq={value!r}: {part.strip()!r} is not key=value with a key of {list(DEFAULTS)}"
            )
        try:
            number = float(raw)
        except ValueError:
            raise ValueError(f"gptq={value!r}: {key} needs a number, got {raw.strip()!r}") from None
        if key in ("act_order", "weighted") and number not in (0.0, 1.0):
            raise ValueError(f"gptq={value!r}: {key} is 0 or 1")
        if key == "damp" and not 0.0 < number <= 1.0:
            raise ValueError(f"gptq={value!r}: damp is a fraction of the mean diagonal in (0, 1]")
        out[key] = number
    return out


def canonical(value: Any) -> Any:
    """``value`` in one spelling: True for the defaults, else sorted ``key=value`` pairs."""
    settings = parse(value)
    if settings == DEFAULTS:
        return True
    keys = [k for k in sorted(settings) if k not in OMITTED_AT_DEFAULT or settings[k] != DEFAULTS[k]]
    return ",".join(f"{k}={settings[k]:g}" for k in keys)


def gptq_codes(
    weight: Tensor,
    hessian: Tensor,
    grid: Grid,
    keep: Tensor | None = None,
    act_order: bool = True,
    damp: float = 0.01,
    weighted: bool = False,
) -> tuple[Tensor, Tensor, Tensor | None]:
    """Codes, scales and offsets of ``weight`` (rows, cols) on ``grid`` by GPTQ. Pruned
    entries (``keep`` False) are rounded to zero, their error fed forward like any other;
    ``weighted`` fits the groups weighted by the Hessian diagonal."""
    w, h = working_copies(weight, hessian)
    rows, cols = w.shape
    # From the Hessian as given: a column no row reached (zero diagonal) costs nothing.
    importance = torch.diagonal(hessian).detach().float() if weighted else None
    static = act_order or grid.group >= cols
    groups = -(-cols // grid.group)
    scale = torch.zeros(rows, groups)
    offset = None if grid.symmetric else torch.zeros(rows, groups)
    if static:
        scale, offset = grid.fit(w, keep, importance)
    perm = torch.argsort(torch.diagonal(h), descending=True, stable=True) if act_order else torch.arange(cols)
    w, h = w[:, perm], h[perm][:, perm]
    kept = keep[:, perm] if keep is not None else None
    h += damp * torch.diagonal(h).mean() * torch.eye(cols, dtype=h.dtype)
    hinv = _inverse_cholesky(h).float()
    codes = torch.zeros(rows, cols)
    # Groups fitted on the way never straddle a block when blocks are whole groups.
    block = BLOCK if static else grid.group * max(1, BLOCK // grid.group)
    for i1 in range(0, cols, block):
        i2 = min(i1 + block, cols)
        w1 = w[:, i1:i2].clone()
        err1 = torch.zeros_like(w1)
        hinv1 = hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = i1 + i
            g = int(perm[col]) // grid.group
            if not static and col % grid.group == 0:
                part = kept[:, col : col + grid.group] if kept is not None else None
                d = importance[col : col + grid.group] if importance is not None else None
                s, o = grid.fit(w1[:, i : i + grid.group], part, d)
                scale[:, g] = s[:, 0]
                if offset is not None and o is not None:
                    offset[:, g] = o[:, 0]
            o_g = offset[:, g] if offset is not None else None
            c = grid.codes(w1[:, i : i + 1], scale[:, g], o_g)
            q = grid.values(c, scale[:, g], o_g)[:, 0]
            if kept is not None:
                q = torch.where(kept[:, col], q, torch.zeros_like(q))
            codes[:, col] = c[:, 0]
            err = (w1[:, i] - q) / hinv1[i, i]
            w1[:, i:] -= err[:, None] * hinv1[i, i:][None, :]
            err1[:, i] = err
        w[:, i2:] -= err1 @ hinv[i1:i2, i2:]
    codes = codes[:, torch.argsort(perm)]
    return codes, scale, offset


def working_copies(weight: Tensor, hessian: Tensor) -> tuple[Tensor, Tensor]:
    """fp32 weight and fp64 Hessian copies, with columns no calibration row reached (zero
    diagonal) zeroed in the weight and given a unit diagonal, so the Hessian factors."""
    w = weight.detach().float().clone()
    h = hessian.detach().double().clone()
    dead = torch.diagonal(h) == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    return w, h


def _inverse_cholesky(h: Tensor) -> Tensor:
    """The upper Cholesky factor of ``h``'s inverse, adding damping until ``h`` factors."""
    extra = 0.0
    mean = float(torch.diagonal(h).mean())
    for _ in range(8):
        factor, info = torch.linalg.cholesky_ex(h + extra * torch.eye(h.shape[0], dtype=h.dtype))
        if int(info) == 0:
            inverse = torch.cholesky_inverse(factor)
            return torch.linalg.cholesky(inverse, upper=True)
        extra = mean * 0.01 if extra == 0.0 else extra * 10
    raise ValueError(
        "the layer's Hessian is not positive definite even with damping; check the calibration rows"
    )


@register
class GPTQ(Method):
    name = "gptq"
    option_base: ClassVar[Mapping[str, Any]] = {"bits": 4}

    position = 24
    stage: ClassVar[Stage] = "quantize"
    option_of: ClassVar[Stage | None] = "quantize"
    rounds = True
    scopes: ClassVar[frozenset[Scope]] = frozenset({"linear"})
    off = False
    needs = frozenset({"hessian"})
    # Re-rounding trained weights to nearest would undo the error feedback: layers keep their codes.
    qat: ClassVar[QAT] = "frozen"
    colorscale = "Greens"

    def check(self, value: Any) -> Any:
        if value is False:
            return False
        return canonical(value)

    def short(self, value: Any) -> str:
        # Settings off their defaults are named, so two GPTQ variants read apart in a summary.
        settings = parse(value)
        changed = [f"{k}={settings[k]:g}" for k in sorted(settings) if settings[k] != DEFAULTS[k]]
        return f"gptq[{','.join(changed)}]" if changed else "gptq"

    def acts_with(self, host: Mapping[str, Any]) -> bool:
        return host.get("bits") in GRID_BITS  # the widths whose codes it chooses on a grid

    def display(self, value: Any) -> str:
        return "gptq" if value is True else str(value) if value else ""

    def examples(self) -> tuple[Any, ...]:
        return (True, "act_order=0,damp=0.05", "weighted=1")

    def choose_codes(self, work: LinearWork, value: Any, grid: Any) -> tuple[Tensor, Tensor, Tensor | None]:
        hessian = getattr(work.stats, "hessian", None)
        if hessian is None:
            # A factor whose input was never observed (the up half of a low-rank pair).
            return grid.round(work.weight, work.keep)  # type: ignore[no-any-return]
        settings = parse(value)
        return gptq_codes(
            work.weight,
            hessian,
            grid,
            work.keep,
            bool(settings["act_order"]),
            settings["damp"],
            bool(settings["weighted"]),
        )
