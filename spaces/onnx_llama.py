"""Llama-layout blocks in the form ONNX Runtime runs fastest, for export only.

Traced as transformers writes it, each attention block costs ORT about fifty shape operators
a decode step (``Shape``, ``Gather``, ``Unsqueeze``, ``Concat``: every ``view`` reads its
sizes back from a tensor) and copies its grown key/value cache once per query-head group
(``repeat_kv``). ``exportable(model)`` swaps, for the length of an export, the forward of
every ``LlamaAttention`` and ``LlamaMLP`` (SmolLM2, Llama and models of its layout) for one
that computes the same function with constant reshape targets (0 keeps a size, -1 infers
it), the rotary embedding of queries and keys as ORT's ``RotaryEmbedding`` operator on the
model's cos and sin tables (where its frequencies do not change with the length), each
key/value head serving its query heads by broadcasting (a 5-d matmul), and the Linears that
read one input (query, key and value; gate and up) as one operator where they share a format
(``onnx.fused_projections``). Other attention and MLP classes keep their own forward.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor, nn

# Classes whose forward is transformers' Llama one (checked by module and name).
LLAMA = "transformers.models.llama.modeling_llama"
SUPPORTED: frozenset[tuple[str, str]] = frozenset({(LLAMA, "LlamaAttention"), (LLAMA, "LlamaMLP")})


# The rotary cos and sin tables of the attention modules being exported, by id.
_TABLES: dict[int, tuple[Tensor, Tensor]] = {}


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


class _Rotary(torch.autograd.Function):
    """Rotary embedding of ``x`` (batch, length, heads * d) at ``positions`` from the model's
    cos and sin tables (max positions, d / 2), as transformers computes it; written as ORT's
    one ``RotaryEmbedding`` operator (com.microsoft), where traced it is six."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any, x: Tensor, positions: Tensor, cos: Tensor, sin: Tensor, heads: int
    ) -> Tensor:
        half = cos.shape[-1]
        c = torch.cat((cos, cos), dim=-1)[positions].unsqueeze(2)  # (batch, length, 1, d)
        s = torch.cat((sin, sin), dim=-1)[positions].unsqueeze(2)
        y = x.unflatten(-1, (heads, 2 * half))
        return (y * c + _rotate_half(y, half) * s).flatten(-2)

    @staticmethod
    def symbolic(g: Any, x: Any, positions: Any, cos: Any, sin: Any, heads: int) -> Any:
        y = g.op("com.microsoft::RotaryEmbedding", x, positions, cos, sin, interleaved_i=0, num_heads_i=heads)
        y.setType(x.type())
        return y


def rotary_tables(model: nn.Module) -> tuple[Tensor, Tensor] | None:
    """The cos and sin of every position ``model``'s rotary embedding covers, (positions, d / 2),
    or None where it has none or its frequencies change with the length (dynamic scaling)."""
    rotary = next((m for m in model.modules() if type(m).__name__ == "LlamaRotaryEmbedding"), None)
    config = getattr(model, "config", None)
    limit = getattr(config, "max_position_embeddings", None)
    rope_type = str(getattr(rotary, "rope_type", "default"))
    if rotary is None or not isinstance(limit, int) or "dynamic" in rope_type or rope_type == "longrope":
        return None
    positions = torch.arange(limit)[None]
    with torch.no_grad():
        cos, sin = rotary(torch.zeros(1, dtype=torch.float32), positions)
    half = cos.shape[-1] // 2
    return cos[0, :, :half].contiguous(), sin[0, :, :half].contiguous()


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
    from slimsearch.spaces.onnx import fused_projections  # it imports this module

    projections = [self.q_proj, self.k_proj, self.v_proj]
    q, k, v = fused_projections(projections, hidden_states) or [p(hidden_states) for p in projections]
    tables = _TABLES.get(id(self))
    positions = kwargs.get("position_ids")
    if tables is not None and positions is not None:
        # ORT's operator wants a row of positions per sequence; transformers may give one for
        # all. Sized from the mask, which every block shares, so ORT computes it once.
        positions = positions.expand(attention_mask.shape[0], -1)
        q = _Rotary.apply(q, positions, *tables, heads)
        k = _Rotary.apply(k, positions, *tables, kv_heads)
    q = reshape(q, (0, -1, heads, d)).transpose(1, 2)
    k = reshape(k, (0, -1, kv_heads, d)).transpose(1, 2)
    v = reshape(v, (0, -1, kv_heads, d)).transpose(1, 2)
    if tables is None or positions is None:
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


def mlp_forward(self: Any, x: Tensor) -> Tensor:  # a transformers LlamaMLP
    """``LlamaMLP.forward``, its gate and up projections through one operator where they can."""
    from slimsearch.spaces.onnx import fused_projections

    projections = [self.gate_proj, self.up_proj]
    gate, up = fused_projections(projections, x) or [p(x) for p in projections]
    out: Tensor = self.down_proj(self.act_fn(gate) * up)
    return out


def _supported(module: nn.Module) -> bool:
    cls = type(module)
    return (cls.__module__, cls.__name__) in SUPPORTED


@contextlib.contextmanager
def exportable(model: nn.Module) -> Iterator[int]:
    """Within the block, every supported attention module of ``model`` runs
    ``attention_forward`` and every MLP ``mlp_forward``; yields how many modules were swapped.
    Restored after, on error too."""
    swapped = [m for m in model.modules() if _supported(m)]
    tables = rotary_tables(model) if swapped else None
    for module in swapped:
        forward = mlp_forward if type(module).__name__ == "LlamaMLP" else attention_forward
        module.forward = forward.__get__(module)  # type: ignore[method-assign]
        if tables is not None and 2 * tables[0].shape[1] == int(getattr(module, "head_dim", -1)):
            _TABLES[id(module)] = tables  # the rotation covers the whole head (no partial rotary)
    try:
        yield len(swapped)
    finally:
        for module in swapped:
            del module.forward
            _TABLES.pop(id(module), None)
