"""Modules whose state dict holds the compressed form of a weight, not a float copy.

``PackedLinear`` stores a Linear's weight as fp32, bf16, int8 codes with one fp32 scale per
row, or packed 4- or 2-bit codes with group-wise fp16 scales and offsets (see
quantize.py), optionally sparse (a packed bitmask, one bit per weight, plus the kept values
only: the index overhead is part of the stored bytes). ``PackedEmbedding`` does the same
for an embedding table, row by row.

Compute forms are derived lazily and never saved (``PackedLinear.kernel`` says which one a
layer runs): 8-bit Linears run on the fbgemm/x86 int8 kernel (real int8 matmuls, dynamic
per-tensor activation quantization), int8 weight-only and 4-, 3- and 2-bit ones on torch's
weight-only kernels (methods/kernels.py), 16-bit on bf16 matmuls. Only layers no kernel can
take (sparse 4/3/2 bits, shapes the kernels cannot tile, fp32 sparsity) compute on a dense
fp32 copy: realized for size only (methods/realized.py). Training (grad enabled) always uses
the dense copy. The latency evaluator measures whatever the model really does.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from slimsearch.spaces.methods import kernels
from slimsearch.spaces.methods.quantize import (
    GROUP_SIZE,
    GROUPED_BITS,
    dequantize_groups,
    pack_bits,
    pack_codes,
    quantize_groups,
    quantize_rows,
    unpack_bits,
    unpack_codes,
    whole_zeros,
)
from slimsearch.spaces.methods.registry import BOTH, NOTHING, SIZE, LinearWork

LINEAR_BITS = (32, 16, 8, 4, 3, 2)
EMBEDDING_BITS = (16, 8, 4, 2)


def _encode(
    weight: Tensor, bits: int, keep: Tensor | None, group: int = GROUP_SIZE, integer_zero: bool = False
) -> dict[str, Tensor]:
    """The buffers that store ``weight`` at ``bits``: "values" (only the kept entries when
    ``keep`` is a mask) plus scales, and offsets for group-wise bits."""
    w = weight.detach().float()
    pick = (lambda t: t[keep]) if keep is not None else (lambda t: t.reshape(-1))
    if bits == 32:
        return {"values": pick(w).clone()}
    if bits == 16:
        return {"values": pick(w.to(torch.bfloat16)).clone()}
    if bits == 8:
        codes, scale = quantize_rows(w, 8)
        return {"values": pick(codes).clone(), "scale": scale}
    codes, gscale, offset = quantize_groups(w, bits, keep, group, None, integer_zero)
    return {"values": pack_codes(pick(codes), bits), "scale": gscale, "offset": offset}


class PackedLinear(nn.Module):
    """A Linear layer whose weight is stored compressed; see the module docstring."""

    # Buffers (registered in from_work; "scale", "offset" and "mask" only where used).
    values: Tensor
    scale: Tensor
    offset: Tensor
    mask: Tensor

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bits: int,
        sparse: bool,
        made_by: tuple[str, ...] = (),
        group: int = GROUP_SIZE,
        weight_only: bool = False,
    ) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.bits = bits
        self.sparse = sparse
        # Columns per scale group (4, 3 and 2 bits).
        self.group = group
        # 8 bits only: keep activations in float (dequantized weight) instead of int8 kernels.
        self.weight_only = weight_only
        # The registered methods that made this layer (distillation asks them how to train it).
        self.made_by = made_by
        self._cache: dict[str, Any] = {}

    @classmethod
    def from_work(
        cls,
        work: LinearWork,
        bits: int = 32,
        method: str | None = None,
        group: int = GROUP_SIZE,
        weight_only: bool = False,
        integer_zero: bool = False,
    ) -> PackedLinear:
        """Store ``work`` (its weight already zero where ``work.keep`` is False) at ``bits``."""
        if bits not in LINEAR_BITS:
            raise ValueError(f"bits={bits!r} is not supported for a Linear; choose from {list(LINEAR_BITS)}")
        buffers = _encode(work.weight.detach().float(), bits, work.keep, group, integer_zero)
        return cls._assemble(work, bits, buffers, method, group, weight_only)

    @classmethod
    def from_codes(
        cls,
        work: LinearWork,
        bits: int,
        codes: Tensor,
        scale: Tensor,
        offset: Tensor | None = None,
        method: str | None = None,
        group: int = GROUP_SIZE,
        weight_only: bool = False,
    ) -> PackedLinear:
        """Store codes a method chose itself (e.g. by error feedback, not plain rounding), in
        this module's layout: int8 codes (out, in) with fp32 row scales for 8 bits; uint8
        codes in [0, 2**bits) with fp16 group scales and offsets (rows, groups of ``group``
        columns) for 4, 3 and 2 bits."""
        if bits not in (8, *GROUPED_BITS):
            raise ValueError(f"from_codes stores 8, 4 or 2 bits, not {bits!r}")
        shape = (work.out_features, work.in_features)
        if tuple(codes.shape) != shape:
            raise ValueError(f"codes have shape {tuple(codes.shape)}, the layer {shape}")
        keep = work.keep
        kept = codes[keep] if keep is not None else codes.reshape(-1)
        if bits == 8:
            buffers = {"values": kept.to(torch.int8).clone(), "scale": scale.float().reshape(-1).clone()}
        elif offset is None:
            raise ValueError(f"{bits}-bit codes need their group offsets")
        else:
            buffers = {
                "values": pack_codes(kept.to(torch.uint8), bits),
                "scale": scale.to(torch.float16).clone(),
                "offset": offset.to(torch.float16).clone(),
            }
        return cls._assemble(work, bits, buffers, method, group, weight_only)

    @classmethod
    def _assemble(
        cls,
        work: LinearWork,
        bits: int,
        buffers: dict[str, Tensor],
        method: str | None,
        group: int = GROUP_SIZE,
        weight_only: bool = False,
    ) -> PackedLinear:
        """The module holding ``buffers`` (values, scales), plus the mask, the input column
        scales and the bias of ``work``."""
        made_by = work.made_by + ((method,) if method else ())
        out = cls(
            work.in_features,
            work.out_features,
            bits,
            sparse=work.keep is not None,
            made_by=made_by,
            group=group,
            weight_only=weight_only and bits == 8,
        )
        if work.keep is not None:
            out.register_buffer("mask", pack_bits(work.keep))
        for name, tensor in buffers.items():
            out.register_buffer(name, tensor)
        if work.column_scale is not None:
            out.register_buffer("in_scale", work.column_scale.to(torch.float16).clone())
        if work.bias is not None:
            out.register_buffer("bias", work.bias.detach().float().clone())
        return out

    @property
    def numel(self) -> int:
        return self.in_features * self.out_features

    def kept_count(self) -> int:
        if not self.sparse:
            return self.numel
        return int(unpack_bits(self.mask, self.numel).sum())

    def _dense_stored(self) -> Tensor:
        """The weight matrix in its stored value domain (codes for integer bits), with zeros
        where entries were pruned."""
        count = self.kept_count()
        if self.bits in GROUPED_BITS:
            flat = unpack_codes(self.values, self.bits, count)
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
        if self.bits == 8:
            weight = stored.float() * self.scale[:, None]
        elif self.bits in GROUPED_BITS:
            weight = dequantize_groups(stored, self.scale, self.offset, self.group)
            if self.sparse:
                weight = weight * unpack_bits(self.mask, self.numel).view_as(weight)
        else:
            weight = stored.float()
        in_scale = self.column_scale()
        return weight if in_scale is None else weight / in_scale[None, :]

    def column_scale(self) -> Tensor | None:
        """The per-input-column scale the stored weight was multiplied by (activation-aware
        scaling), which the layer divides back out; None when there is none."""
        scale = getattr(self, "in_scale", None)
        return None if scale is None else scale.float()

    @property
    def integer_zero(self) -> bool:
        """Whether every group's offset is a whole zero code (``integer_zero`` grids)."""
        if self.bits not in GROUPED_BITS:
            return False
        return whole_zeros(self.offset, self.scale, 2**self.bits - 1) is not None

    @property
    def realized(self) -> str:
        """What this layer's storage buys: see methods/realized.py."""
        if self.bits == 32:
            return SIZE if self.sparse else NOTHING
        return SIZE if self.kernel == "dense" else BOTH

    @property
    def kernel(self) -> str:
        """What the layer computes on at inference: "int8" (activations quantized too),
        "int8-weight-only", "int4" (4, 3 and 2 bits), "bf16", or "dense" (fp32). The low-bit
        kernels are torch's CPU ones: on another device those layers compute dense."""
        kernel = kernels.kernel_for(
            self.bits, self.out_features, self.in_features, self.group, self.sparse, self.weight_only
        )
        return kernel if self.values.device.type == "cpu" or kernel == "bf16" else "dense"

    @property
    def int8_kernel(self) -> bool:
        """Whether the layer computes on the int8 kernel (8 bits, activations quantized too)."""
        return self.kernel == "int8"

    @property
    def compute_path(self) -> str:
        kernel = self.kernel
        if kernel == "int8":
            return "int8 kernel (real int8 matmul)"
        if kernel == "int8-weight-only":
            return "int8 weight-only kernel (bf16 activations)"
        if kernel == "bf16":
            return "bf16 matmul"
        if kernel == "int4":
            widened = "" if self.bits == 4 else f" ({self.bits}-bit codes widened to 4 in memory)"
            return f"int4 weight-only kernel (bf16 activations){widened}"
        if self.bits == 32:
            return "fp32 sparse stored, computed dense fp32 (size only)"
        device = self.values.device.type
        if device != "cpu" and not self.sparse:
            return f"{self.bits}-bit stored, computed dense fp32 (size only: no {device} kernel here)"
        why = "sparse" if self.sparse else f"shape {self.out_features}x{self.in_features} fits no kernel"
        return f"{self.bits}-bit stored, computed dense fp32 (size only: {why})"

    def reset_cache(self) -> None:
        self._cache.clear()

    def _apply(self, fn: Any, recurse: bool = True) -> PackedLinear:
        # Moving or casting the buffers (``.to``, ``.cuda``) leaves derived kernel forms behind
        # on the old device: drop them, to be derived again where the buffers now are.
        self.reset_cache()
        super()._apply(fn, recurse)
        return self

    def _int8_kernel(self) -> Any:
        if "int8" not in self._cache:
            codes = self._dense_stored()
            zero = torch.zeros(self.out_features, dtype=torch.long)
            with warnings.catch_warnings():
                # The quantized-tensor constructors warn that they are deprecated; they
                # are still the fastest int8 CPU path in torch 2.13 (see DESIGN.md).
                warnings.simplefilter("ignore")
                qweight = torch._make_per_channel_quantized_tensor(codes, self.scale.double(), zero, 0)
                bias = getattr(self, "bias", None)
                self._cache["int8"] = torch.ops.quantized.linear_prepack(qweight, bias)
        return self._cache["int8"]

    def _int4_kernel(self) -> tuple[Tensor, Tensor]:
        if "int4" not in self._cache:
            self._cache["int4"] = kernels.int4_pack(
                self._dense_stored(), self.scale, self.offset, self.group, self.bits
            )
        packed: tuple[Tensor, Tensor] = self._cache["int4"]
        return packed

    def _int8_weight_only(self) -> tuple[Tensor, Tensor]:
        if "int8wo" not in self._cache:
            codes = kernels.aligned(self._dense_stored().contiguous())
            self._cache["int8wo"] = (codes, self.scale.to(torch.bfloat16))
        kernel: tuple[Tensor, Tensor] = self._cache["int8wo"]
        return kernel

    def _bf16_weight(self) -> Tensor:
        if self.column_scale() is None and not self.sparse:
            return self.values.view(self.out_features, self.in_features)  # stored as bf16 already
        if "bf16" not in self._cache:
            self._cache["bf16"] = self.dense_weight().to(torch.bfloat16)
        weight: Tensor = self._cache["bf16"]
        return weight

    def _runtime(self) -> tuple[str, Tensor | None]:
        """The kernel and the fp32 input column scale, worked out once (decoding calls small
        layers thousands of times, where the Python around a kernel is a visible cost)."""
        if "runtime" not in self._cache:
            self._cache["runtime"] = (self.kernel, self.column_scale())
        runtime: tuple[str, Tensor | None] = self._cache["runtime"]
        return runtime

    def forward(self, x: Tensor) -> Tensor:
        bias = getattr(self, "bias", None)
        kernel, in_scale = self._runtime()
        if kernel in ("int8", "int8-weight-only", "int4") and not torch.is_grad_enabled():
            if in_scale is not None:
                x = x / in_scale
            if kernel == "int4":
                return kernels.int4_linear(x, *self._int4_kernel(), self.group, bias)
            if kernel == "int8-weight-only":
                return kernels.int8_linear(x, *self._int8_weight_only(), bias)
            shape = x.shape
            y = torch.ops.quantized.linear_dynamic(
                x.reshape(-1, shape[-1]).float().contiguous(), self._int8_kernel(), True
            )
            return y.view(*shape[:-1], self.out_features).to(x.dtype)
        if kernel == "bf16":
            b16 = bias.to(torch.bfloat16) if bias is not None else None
            return F.linear(x.to(torch.bfloat16), self._bf16_weight(), b16).to(x.dtype)
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
            + (f", group={self.group}" if self.bits in GROUPED_BITS and self.group != GROUP_SIZE else "")
            + (", weight_only=True" if self.weight_only else "")
        )


def lookup_scale(emb: nn.Embedding) -> float:
    """What ``emb``'s forward multiplies a looked-up row by: 1.0 for a plain nn.Embedding,
    ``embed_scale`` for transformers' ``*ScaledWordEmbedding`` (Gemma's is sqrt(hidden));
    ValueError for any other subclass, whose forward a packed table could not reproduce."""
    if type(emb) is nn.Embedding:
        return 1.0
    scale = getattr(emb, "embed_scale", None)
    name = type(emb).__name__
    if isinstance(scale, Tensor) and scale.numel() == 1:
        scale = float(scale)
    if name.endswith("ScaledWordEmbedding") and isinstance(scale, (int, float)):
        # Checked, not assumed: the module must compute exactly lookup x scale.
        ids = torch.arange(min(emb.num_embeddings, 8))
        with torch.no_grad():
            expected = F.embedding(ids, emb.weight, emb.padding_idx) * float(scale)
            if torch.allclose(emb(ids).float(), expected.float(), rtol=1e-5, atol=1e-6):
                return float(scale)
    raise ValueError(
        f"the embedding table is a {name}, whose forward is more than a row lookup; slimsearch cannot "
        "pack it without changing what it computes: keep it at 32 bits (space.embeddings: [32])"
    )


class PackedEmbedding(nn.Module):
    """An embedding table stored in 16, 8, 4 or 2 bits; rows are dequantized as they are looked
    up, then multiplied by ``lookup_scale`` (1.0 but for scaled word embeddings such as Gemma's,
    whose table is stored unscaled: a tied output layer reads it as it is)."""

    values: Tensor
    scale: Tensor
    offset: Tensor

    def __init__(
        self,
        num_embeddings: int,
        embedding_dim: int,
        bits: int,
        padding_idx: int | None,
        lookup_scale: float = 1.0,
    ) -> None:
        super().__init__()
        self.num_embeddings = num_embeddings
        self.embedding_dim = embedding_dim
        self.bits = bits
        self.padding_idx = padding_idx
        self.lookup_scale = lookup_scale
        self._cache: dict[str, Any] = {}

    @classmethod
    def from_embedding(cls, emb: nn.Embedding, bits: int) -> PackedEmbedding:
        if bits not in EMBEDDING_BITS:
            raise ValueError(f"embeddings take bits {list(EMBEDDING_BITS)} (32 is off), not {bits!r}")
        out = cls(emb.num_embeddings, emb.embedding_dim, bits, emb.padding_idx, lookup_scale(emb))
        weight = emb.weight.detach().float()
        if bits in GROUPED_BITS:
            codes, scale, offset = quantize_groups(weight, bits)
            # Pad each row's codes to whole bytes so a looked-up row unpacks on its own.
            codes = F.pad(codes, (0, out._row_bytes() * (8 // bits) - emb.embedding_dim))
            buffers = {"values": pack_codes(codes, bits), "scale": scale, "offset": offset}
        else:
            buffers = _encode(weight, bits, None)
        for name, tensor in buffers.items():
            out.register_buffer(name, tensor)
        return out

    def _row_bytes(self) -> int:
        per_byte = 8 // self.bits
        return -(-self.embedding_dim // per_byte)

    @property
    def realized(self) -> str:
        # A lookup does no matmul: every embedding width is realized for size only.
        return SIZE

    @property
    def compute_path(self) -> str:
        return f"{self.bits}-bit embedding table (dequantized on lookup)"

    def forward(self, ids: Tensor) -> Tensor:
        rows = self._rows(ids)
        return rows * self.lookup_scale if self.lookup_scale != 1.0 else rows

    def _rows(self, ids: Tensor) -> Tensor:
        """The stored (unscaled) rows of ``ids``, dequantized."""
        if self.bits == 16:
            return F.embedding(ids, self.values.view(self.num_embeddings, -1)).float()
        if self.bits == 8:
            table = self.values.view(self.num_embeddings, self.embedding_dim)
            return F.embedding(ids, table).float() * F.embedding(ids, self.scale[:, None])
        rows = F.embedding(ids, self.values.view(self.num_embeddings, self._row_bytes()))
        codes = unpack_codes(rows, self.bits, rows.numel() * (8 // self.bits))
        codes = codes.view(*ids.shape, -1)[..., : self.embedding_dim]
        return dequantize_groups(codes, F.embedding(ids, self.scale), F.embedding(ids, self.offset))

    def stored_codes(self) -> Tensor:
        """The (rows, embedding_dim) unsigned codes of a 4- or 2-bit table."""
        rows = self.values.view(self.num_embeddings, self._row_bytes())
        codes = unpack_codes(rows, self.bits, rows.numel() * (8 // self.bits))
        return codes.view(self.num_embeddings, -1)[:, : self.embedding_dim]

    def dense_weight(self) -> Tensor:
        if "dense" not in self._cache:
            all_ids = torch.arange(self.num_embeddings, device=self.values.device)
            self._cache["dense"] = self._rows(all_ids)
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

    def _apply(self, fn: Any, recurse: bool = True) -> PackedEmbedding:
        self._cache.clear()  # the dequantized table stays on the old device otherwise
        super()._apply(fn, recurse)
        return self

    def extra_repr(self) -> str:
        scaled = f", lookup_scale={self.lookup_scale:g}" if self.lookup_scale != 1.0 else ""
        return f"{self.num_embeddings}, {self.embedding_dim}, bits={self.bits}{scaled}"


class TiedHead(nn.Module):
    """An output layer tied to a PackedEmbedding: shares its storage, holds no state of its own."""

    def __init__(self, embedding: PackedEmbedding) -> None:
        super().__init__()
        self._embedding = [embedding]  # a list, so the table is not registered (saved) twice

    @property
    def table(self) -> PackedEmbedding:
        """The embedding table this layer reads."""
        return self._embedding[0]

    @property
    def kernel(self) -> str:
        """What the output matmul runs on: the table's own width where a kernel takes it
        ("bf16", "int8-weight-only", "int4"), else "dense" (the dequantized fp32 table)."""
        emb = self._embedding[0]
        return kernels.kernel_for(
            emb.bits, emb.num_embeddings, emb.embedding_dim, GROUP_SIZE, sparse=False, weight_only=True
        )

    @property
    def realized(self) -> str:
        # The saving is the embedding's bytes; speed too where a kernel reads the table.
        return SIZE if self.kernel == "dense" else BOTH

    @property
    def compute_path(self) -> str:
        kernel = self.kernel
        if kernel == "dense":
            return "tied output layer on the dequantized fp32 table (size only)"
        return f"tied output layer on the {kernel} kernel (bf16 activations)"

    def forward(self, x: Tensor) -> Tensor:
        emb = self._embedding[0]
        kernel = self.kernel
        if kernel == "bf16":
            table = emb.values.view(emb.num_embeddings, emb.embedding_dim)
            return F.linear(x.to(torch.bfloat16), table).to(x.dtype)
        if kernel != "dense" and not torch.is_grad_enabled():
            cache = emb._cache
            if kernel == "int4":
                if "int4" not in cache:
                    cache["int4"] = kernels.int4_pack(
                        emb.stored_codes(), emb.scale, emb.offset, GROUP_SIZE, emb.bits
                    )
                return kernels.int4_linear(x, *cache["int4"], GROUP_SIZE, None)
            if "int8wo" not in cache:
                codes = kernels.aligned(emb.values.view(emb.num_embeddings, emb.embedding_dim))
                cache["int8wo"] = (codes, emb.scale.to(torch.bfloat16))
            return kernels.int8_linear(x, *cache["int8wo"], None)
        return F.linear(x, emb.dense_weight())
