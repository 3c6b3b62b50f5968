"""Llama-layout attention in the form ONNX Runtime runs fastest, for export only.

Traced as transformers writes it, each attention block costs ORT about fifty shape operators
a decode step (``Shape``, ``Gather``, ``Unsqueeze``, ``Concat``: every ``view`` reads its
sizes back from a tensor) and copies its grown key/value cache once per query-head group
(``repeat_kv``). ``exportable(model)`` swaps, for the length of an export, the forward of
every ``LlamaAttention`` (SmolLM2, Llama and models of its layout) for one that computes the
same function with constant reshape targets (0 keeps a size, -1 infers it) and lets each
key/value head serve its query heads by broadcasting (a 5-d matmul), so ORT runs no shape
arithmetic and no copy of the cache there. Other attention classes keep their own forward.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor, nn

# Attention classes whose forward is transformers' Llama one (checked by name and module).
SUPPORTED: frozenset[tuple[str, str]] = frozenset(
    {("transformers.models.llama.modeling_llama", "LlamaAttention")}
)


class _Reshape(torch.autograd.Function):
    """``x`` reshaped to ``shape`` (0: the input's size there, -1: inferred), written as one
    ``Reshape`` with a constant target, where a traced ``view`` computes it from ``Shape``."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, shape: tuple[int, ...]) -> Tensor:  # type: ignore[override]
        sizes = [x.shape[i] if s == 0 else s for i, s in enumerate(shape)]
        return x.reshape(sizes)

    @staticmethod
    def symbolic(g: Any, x: Any, shape: tuple[int, ...]) -> Any:
        return g.op("Reshape", x, g.op("Constant", value_t=torch.tensor(shape, dtype=torch.int64)))


def reshape(x: Tensor, shape: tuple[int, ...]) -> Tensor:
    out: Tensor = _Reshape.apply(x, shape)
    return out


def _rotate_half(x: Tensor, half: int) -> Tensor:
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def attention_forward(
    self: Any,  # a transformers LlamaAttention
    hidden_states: Tensor,
    position_embeddings: tuple[Tensor, Tensor],
    attention_mask: Tensor | None = None,
    past_key_values: Any = None,
    **kwargs: Any,
) -> tuple[Tensor, None]:
    """``LlamaAttention.forward`` (batch, length, hidden) -> (batch, length, hidden), in
    eval mode, with a materialized mask (boolean: True attends; or additive float)."""
    if attention_mask is None:  # transformers' causal skip: only its own forward knows the mask
        original = type(self).forward
        return original(self, hidden_states, position_embeddings, None, past_key_values, **kwargs)  # type: ignore[no-any-return]
    d = int(self.head_dim)
    kv_heads = int(self.config.num_key_value_heads)
    heads = int(self.config.num_attention_heads)
    groups = heads // kv_heads
    q = reshape(self.q_proj(hidden_states), (0, -1, heads, d)).transpose(1, 2)
    k = reshape(self.k_proj(hidden_states), (0, -1, kv_heads, d)).transpose(1, 2)
    v = reshape(self.v_proj(hidden_states), (0, -1, kv_heads, d)).transpose(1, 2)
    cos, sin = (t.unsqueeze(1) for t in position_embeddings)
    q = q * cos + _rotate_half(q, d // 2) * sin
    k = k * cos + _rotate_half(k, d // 2) * sin
    if past_key_values is not None:
        k, v = past_key_values.update(k, v, self.layer_idx)
    # Query heads grouped by the key/value head they share: (batch, kv_heads, groups, length, d).
    q = reshape(q, (0, kv_heads, groups, -1, d))
    scores = torch.matmul(q, k.unsqueeze(2).transpose(-1, -2)) * float(self.scaling)
    mask = attention_mask.unsqueeze(1)
    if mask.dtype == torch.bool:
        # As torch's scaled_dot_product_attention: a row that may attend nowhere (padding) is 0.
        probs = torch.softmax(scores.masked_fill(~mask, float("-inf")), dim=-1)
        probs = torch.where(torch.isnan(probs), torch.zeros((), dtype=probs.dtype), probs)
    else:
        probs = torch.softmax(scores + mask, dim=-1)
    out = torch.matmul(probs, v.unsqueeze(2))
    out = reshape(out, (0, heads, -1, d)).transpose(1, 2)
    return self.o_proj(reshape(out, (0, -1, heads * d))), None


def _supported(module: nn.Module) -> bool:
    cls = type(module)
    return (cls.__module__, cls.__name__) in SUPPORTED


@contextlib.contextmanager
def exportable(model: nn.Module) -> Iterator[int]:
    """Within the block, every supported attention module of ``model`` runs
    ``attention_forward``; yields how many were swapped. Restored after, on error too."""
    swapped = [m for m in model.modules() if _supported(m)]
    for module in swapped:
        module.forward = attention_forward.__get__(module)  # type: ignore[method-assign]
    try:
        yield len(swapped)
    finally:
        for module in swapped:
            del module.forward
