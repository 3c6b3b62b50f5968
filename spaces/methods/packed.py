"""Modules whose state dict holds the compressed form of a weight, not a float copy.

``PackedLinear`` stores a Linear's weight as fp32, bf16, int8 codes or packed 4-bit codes
(with one fp32 scale per output row), optionally sparse (a packed bitmask plus the kept
values only). ``PackedEmbedding`` does the same for an embedding table, one scale per row.

Compute forms are derived lazily and never saved: 8-bit Linears run on the fbgemm/x86
int8 kernel (real int8 matmuls, dynamic per-tensor activation quantization), 16-bit on bf16
matmuls, everything else on a dense fp32 copy. So size on disk is always real, while
speed comes only from 8 and 16 bits; 4-bit and sparsity are realized for size only, and
the latency evaluator measures whatever the model really does.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from slimsearch.spaces.methods.pruning import magnitude_mask
from slimsearch.spaces.methods.quantize import (
    decode_codes,
    encode_codes,
    pack_bits,
    quantize_rows,
    unpack_bits,
)


def _store_values(weight: Tensor, bits: int) -> tuple[Tensor, Tensor | None]:
    """Full-matrix values in their stored dtype, plus per-row scales for integer bits."""
    if bits == 32:
        return weight.detach().float().clone(), None
    if bits == 16:
        return weight.detach().to(torch.bfloat16).clone(), None
    codes, scale = quantize_rows(weight, bits)
    return codes, scale


class PackedLinear(nn.Module):
    """A Linear layer whose weight is stored compressed; see the module docstring."""

    def __init__(self, in_features: int, out_features: int, bits: int, sparse: bool) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.bits = bits
        self.sparse = sparse
        self._cache: dict[str, Any] = {}

    @classmethod
    def from_linear(cls, linear: nn.Linear, bits: int = 32, sparsity: float = 0.0) -> PackedLinear:
        weight = linear.weight.detach().float()
        out = cls(linear.in_features, linear.out_features, bits, sparse=sparsity > 0)
        full, scale = _store_values(weight, bits)
        if sparsity > 0:
            mask = magnitude_mask(weight, sparsity)
            out.register_buffer("mask", pack_bits(mask))
            full = full[mask]
        if bits in (8, 4):
            out.register_buffer("values", encode_codes(full, bits))
            out.register_buffer("scale", scale)
        else:
            out.register_buffer("values", full.reshape(-1))
        if linear.bias is not None:
            out.register_buffer("bias", linear.bias.detach().float().clone())
        return out

    @property
    def numel(self) -> int:
        return self.in_features * self.out_features

    def kept_count(self) -> int:
        if not self.sparse:
            return self.numel
        return int(unpack_bits(self.mask, self.numel).sum())

    def _dense_stored(self) -> Tensor:
        """The weight matrix in its stored value domain (codes for int bits), zeros filled in."""
        count = self.kept_count()
        if self.bits in (8, 4):
            flat = decode_codes(self.values, self.bits, count)
        else:
            flat = self.values[:count]
        if self.sparse:
            dense = flat.new_zeros(self.numel)
            dense[unpack_bits(self.mask, self.numel)] = flat
            flat = dense
        return flat.view(self.out_features, self.in_features)

    def dense_weight(self) -> Tensor:
        """Dequantized fp32 weight (what the layer computes with, up to kernel rounding)."""
        stored = self._dense_stored()
        if self.bits in (8, 4):
            return stored.float() * self.scale[:, None]
        return stored.float()

    def reset_cache(self) -> None:
        self._cache.clear()

    def _int8_kernel(self) -> Any:
        if "int8" not in self._cache:
            codes = self._dense_stored()
            zero = torch.zeros(self.out_features, dtype=torch.long)
            with warnings.catch_warnings():
                # The quantized-tensor constructors warn that they are deprecated; they
                # are still the fastest int8 CPU path in torch 2.13 (see DESIGN.md).
                warnings.simplefilter("ignore")
                qweight = torch._make_per_channel_quantized_tensor(
                    codes, self.scale.double(), zero, 0
                )
                bias = getattr(self, "bias", None)
                self._cache["int8"] = torch.ops.quantized.linear_prepack(qweight, bias)
        return self._cache["int8"]

    def forward(self, x: Tensor) -> Tensor:
        bias = getattr(self, "bias", None)
        if self.bits == 8 and not torch.is_grad_enabled():
            shape = x.shape
            y = torch.ops.quantized.linear_dynamic(
                x.reshape(-1, shape[-1]).float().contiguous(), self._int8_kernel(), True
            )
            return y.view(*shape[:-1], self.out_features).to(x.dtype)
        if self.bits == 16:
            if "bf16" not in self._cache:
                self._cache["bf16"] = self.dense_weight().to(torch.bfloat16)
            b16 = bias.to(torch.bfloat16) if bias is not None else None
            return F.linear(x.to(torch.bfloat16), self._cache["bf16"], b16).to(x.dtype)
        if "dense" not in self._cache:
            self._cache["dense"] = self.dense_weight()
        return F.linear(x, self._cache["dense"], bias)

    def _load_from_state_dict(self, *args: Any, **kwargs: Any) -> None:
        self.reset_cache()
        super()._load_from_state_dict(*args, **kwargs)

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_cache"] = {}  # packed int8 kernels cannot be copied or pickled
        return state

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bits={self.bits}, sparse={self.sparse}"
        )


class PackedEmbedding(nn.Module):
    """An embedding table stored in 16, 8 or 4 bits; rows are dequantized as they are looked up."""

    def __init__(self, num_embeddings: int, embedding_dim: int, bits: int, padding_idx: int | None) -> None:
        super().__init__()
        self.num_embeddings = num_embeddings
        self.embedding_dim = embedding_dim
        self.bits = bits
        self.padding_idx = padding_idx
        self._cache: dict[str, Any] = {}

    @classmethod
    def from_embedding(cls, emb: nn.Embedding, bits: int) -> PackedEmbedding:
        if bits not in (16, 8, 4):
            raise ValueError(f"embeddings take bits 16, 8 or 4 (32 is off), not {bits!r}")
        out = cls(emb.num_embeddings, emb.embedding_dim, bits, emb.padding_idx)
        values, scale = _store_values(emb.weight, bits)
        if bits == 4 and emb.embedding_dim % 2:
            values = F.pad(values, (0, 1))  # keep each row's codes in whole bytes
        out.register_buffer("values", encode_codes(values, bits) if scale is not None else values)
        if scale is not None:
            out.register_buffer("scale", scale)
        return out

    def _row_width(self) -> int:
        return (self.embedding_dim + 1) // 2 if self.bits == 4 else self.embedding_dim

    def forward(self, ids: Tensor) -> Tensor:
        table = self.values.view(self.num_embeddings, self._row_width())
        if self.bits == 16:
            return F.embedding(ids, table).float()
        if self.bits == 8:
            return F.embedding(ids, table).float() * F.embedding(ids, self.scale[:, None])
        rows = F.embedding(ids, table)
        codes = decode_codes(rows.reshape(-1), 4, rows.numel() * 2).view(*ids.shape, -1)
        codes = codes[..., : self.embedding_dim]
        return codes.float() * F.embedding(ids, self.scale[:, None])

    def dense_weight(self) -> Tensor:
        if "dense" not in self._cache:
            all_ids = torch.arange(self.num_embeddings)
            self._cache["dense"] = self.forward(all_ids)
        weight: Tensor = self._cache["dense"]
        return weight

    @property
    def weight(self) -> Tensor:
        # transformers reads .weight of input embeddings (e.g. for dtype/device); give it
        # the dequantized table rather than failing.
        return self.dense_weight()

    def _load_from_state_dict(self, *args: Any, **kwargs: Any) -> None:
        self._cache.clear()
        super()._load_from_state_dict(*args, **kwargs)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, bits={self.bits}"


class TiedHead(nn.Module):
    """An output layer tied to a PackedEmbedding: shares its storage, holds no state of its own."""

    def __init__(self, embedding: PackedEmbedding) -> None:
        super().__init__()
        self._embedding = [embedding]  # a list, so the table is not registered (saved) twice

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self._embedding[0].dense_weight())
