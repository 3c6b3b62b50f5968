"""Layers that are Linears under another class, swapped for plain ``nn.Linear`` after
loading, so every method, the size accounting and the exports see one kind of layer:
GPT-2's ``Conv1D`` (its weight stored transposed) and Falcon's ``FalconLinear`` (the same
product written as ``input @ weight.T + bias``).

A saved baseline keeps the layout its architecture loads; the swap is made on load.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


def _linear_classes() -> tuple[tuple[type, bool], ...]:
    """(class, stores its weight transposed) for each kind this swaps."""
    found: list[tuple[type, bool]] = []
    try:
        from transformers.pytorch_utils import Conv1D

        found.append((Conv1D, True))
    except ImportError:
        pass
    try:
        from transformers.models.falcon.modeling_falcon import FalconLinear

        found.append((FalconLinear, False))
    except ImportError:
        pass
    return tuple(found)


def as_linears(model: nn.Module) -> int:
    """Replace every such layer inside ``model`` by the equal ``nn.Linear``; returns how many."""
    kinds = _linear_classes()
    swapped = 0
    for name, module in list(model.named_modules()):
        transposed = next((t for cls, t in kinds if type(module) is cls), None)
        if transposed is None:
            continue
        weight: Any = module.weight
        n_in, n_out = (weight.shape[0], weight.shape[1]) if transposed else (weight.shape[1], weight.shape[0])
        bias = getattr(module, "bias", None)
        linear = nn.Linear(n_in, n_out, bias=bias is not None, device=weight.device, dtype=weight.dtype)
        with torch.no_grad():
            linear.weight.copy_(weight.t() if transposed else weight)
            if bias is not None:
                linear.bias.copy_(bias)
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, linear)
        swapped += 1
    return swapped
