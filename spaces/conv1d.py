"""GPT-2's ``Conv1D`` (a Linear with its weight stored transposed) as a plain ``nn.Linear``,
so every method, the size accounting and the exports see one kind of layer.

The swap is exact (the same products, summed in the same order by one matmul) and is made
after loading: a saved baseline keeps the layout its architecture loads.
"""

from __future__ import annotations

import torch
from torch import nn


def as_linears(model: nn.Module) -> int:
    """Replace every transformers ``Conv1D`` inside ``model`` by the equal ``nn.Linear``;
    returns how many were replaced."""
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # a transformers without it has none to replace
        return 0
    swapped = 0
    for name, module in list(model.named_modules()):
        if not isinstance(module, Conv1D):
            continue
        weight = module.weight  # (in_features, out_features)
        linear = nn.Linear(
            weight.shape[0],
            weight.shape[1],
            bias=module.bias is not None,
            device=weight.device,
            dtype=weight.dtype,
        )
        with torch.no_grad():
            linear.weight.copy_(weight.t())
            if module.bias is not None:
                linear.bias.copy_(module.bias)
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, linear)
        swapped += 1
    return swapped
