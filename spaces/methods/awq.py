"""Activation-aware scaling (the ``awq`` knob), in the manner of AWQ (Lin et al., 2023).

An option of the quantize stage, usable with round-to-nearest or GPTQ on any grid. Input
columns that see large activations matter more, so before quantizing, column j of the weight
is multiplied by ``s_j = rms_j ** alpha`` (normalized) and the layer divides its input by
``s`` at compute time. The stored layer keeps ``s`` as one fp16 value per input column
(``in_scale``, counted in its bytes) and folds it into its dequantized weight, so nothing
outside the layer changes.

``alpha`` is searched per layer on a grid of ``GRID`` points for the lowest output error
``tr(dW H dW^T)`` on the calibration Hessian, where ``dW`` is the difference between the
weight and what is stored, divided back: the exact squared error of the layer's outputs on
the calibration rows (summed over up to ``SEARCH_ROWS`` evenly spaced output rows). Later
steps (GPTQ) see the scaled weight and the Hessian of the scaled input.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace
from typing import Any, ClassVar

import torch
from torch import Tensor

from slimsearch.spaces.methods.calibration import LayerStats
from slimsearch.spaces.methods.quantize import GRID_BITS, Grid
from slimsearch.spaces.methods.registry import QAT, LinearWork, Scope, Stage, Switch, register

GRID = 20
# The scale is one per input column, shared by every output row: its error is estimated on
# evenly spaced rows (at most this many), which keeps the search cheap on wide layers.
SEARCH_ROWS = 128


def output_error(delta: Tensor, hessian: Tensor) -> float:
    """Squared error of the outputs on the calibration rows: tr(delta H delta^T)."""
    return float(((delta @ hessian) * delta).sum())


def search_scale(weight: Tensor, hessian: Tensor, grid: Grid, keep: Tensor | None) -> Tensor:
    """The column scales (fp16-representable, in float) with the lowest output error."""
    w = weight.detach().float()
    rows = torch.linspace(0, w.shape[0] - 1, min(SEARCH_ROWS, w.shape[0])).round().long().unique()
    w = w[rows]
    keep = keep[rows] if keep is not None else None
    h = hessian.detach().float()
    rms = torch.diagonal(h).clamp_min(0).sqrt()
    live = rms > 0
    best = torch.ones(w.shape[1])
    if not bool(live.any()):
        return best
    base = rms.clamp_min(float(rms[live].min()) if bool(live.any()) else 1.0)
    best_error = _error(w, torch.ones_like(best), h, grid, keep)
    for step in range(1, GRID):
        alpha = step / GRID
        s = base.pow(alpha)
        s = s / (s.max() * s.min()).sqrt()
        s = s.to(torch.float16).float().clamp_min(float(torch.finfo(torch.float16).tiny))
        error = _error(w, s, h, grid, keep)
        if error < best_error:
            best, best_error = s, error
    return best


def _error(w: Tensor, s: Tensor, h: Tensor, grid: Grid, keep: Tensor | None) -> float:
    codes, scale, offset = grid.round(w * s, keep)
    stored = grid.dequantize(codes, scale, offset) / s
    if keep is not None:
        stored = stored * keep
    return output_error(w - stored, h)


def scaled_stats(stats: LayerStats, s: Tensor) -> LayerStats:
    """The statistics of the layer's input divided by ``s`` column-wise."""
    act = stats.act_sq / (s * s) if stats.act_sq is not None else None
    hessian = stats.hessian / (s[:, None] * s[None, :]) if stats.hessian is not None else None
    return LayerStats(act, hessian, stats.tokens)


@register
class AWQ(Switch):
    name = "awq"
    option_base: ClassVar[Mapping[str, Any]] = {"bits": 4}

    position = 23
    stage: ClassVar[Stage] = "quantize"
    option_of: ClassVar[Stage | None] = "quantize"
    scopes: ClassVar[frozenset[Scope]] = frozenset({"linear"})
    needs = frozenset({"hessian"})
    # The scales were searched for the stored codes; plain re-rounding after training would not
    # keep them optimal, so the layer keeps what was searched.
    qat: ClassVar[QAT] = "frozen"
    colorscale = "Oranges"

    def short(self, value: Any) -> str:
        return "awq"

    def acts_with(self, host: Mapping[str, Any]) -> bool:
        return host.get("bits") in GRID_BITS  # the widths whose codes it chooses on a grid

    def examples(self) -> tuple[Any, ...]:
        return (True,)

    def prepare(self, work: LinearWork, value: Any, grid: Any) -> LinearWork:
        stats = work.stats
        if not value or stats is None or stats.hessian is None:
            return work  # never observed (a low-rank up factor): nothing to weigh columns by
        s = search_scale(work.weight, stats.hessian, grid, work.keep)
        column = s if work.column_scale is None else work.column_scale * s
        return replace(work, weight=work.weight * s, column_scale=column, stats=scaled_stats(stats, s))
