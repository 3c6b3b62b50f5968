"""Depth pruning (the ``drop`` knob): whole Transformer blocks removed.

A dropped block is replaced by a module that hands its input on unchanged, so its weights
are not stored and its compute is gone: realized for size and speed. Which blocks to drop
is a per-block choice of the search; distillation (``distill:``) is its recovery. A plan
that drops a block ignores the settings of that block's Linears (they no longer exist).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

from torch import Tensor, nn

from slimsearch.spaces.methods.registry import BOTH, QAT, Scope, Stage, Switch, register
from slimsearch.spaces.methods.structured import find_units


class DroppedBlock(nn.Module):
    """A removed Transformer block: returns the hidden states it is given."""

    @property
    def realized(self) -> str:
        return BOTH

    @property
    def compute_path(self) -> str:
        return "block removed (identity)"

    def forward(self, hidden_states: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        return hidden_states


@register
class Drop(Switch):
    name = "drop"
    position = 45
    stage: ClassVar[Stage] = "depth"
    scopes: ClassVar[frozenset[Scope]] = frozenset({"block"})
    qat: ClassVar[QAT] = "train"
    colorscale = "Greys"
    block_part = "Transformer block"
    true_means = " (remove the block)"

    def short(self, value: Any) -> str:
        return "drop"

    def realized(self, value: Any) -> str:
        return BOTH

    def examples(self) -> tuple[Any, ...]:
        return (True,)

    def layout(self, model: nn.Module) -> list[str]:
        # The blocks structured pruning knows: numbered layers with attention or an MLP.
        return list(dict.fromkeys(u.block for u in find_units(model)))

    def blocks(self, layout: Any) -> list[str]:
        return list(layout)

    def shrunk(
        self, layout: Any, values: Mapping[str, Any], shapes: Mapping[str, tuple[int, int]]
    ) -> dict[str, tuple[int, int]]:
        return dict(shapes)

    def apply_blocks(
        self, model: nn.Module, values: Mapping[str, Any], stats: Any, selection: Mapping[str, str]
    ) -> dict[str, str]:
        for block, value in values.items():
            compressed = [
                type(m).__name__ for m in model.get_submodule(block).modules() if hasattr(m, "realized")
            ]
            if compressed:
                # As for structured pruning: a plan applies to the baseline, never on top of another.
                raise ValueError(
                    f"structured pruning runs first, on plain nn.Linear layers, but {block} holds a "
                    f"{compressed[0]}: apply one plan to the baseline"
                )
            if value:
                model.set_submodule(block, DroppedBlock())
        return {}
