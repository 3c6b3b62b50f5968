"""Bit-width (the ``bits`` knob): round-to-nearest weight quantization of Linears and tables.

32 is off; 16 stores bf16 and computes in bf16; 8 stores symmetric int8 codes with one scale
per row and computes on the fbgemm int8 kernel; 4 and 2 store packed group-wise codes (see
quantize.py) and compute on a dense fp32 copy, so they are realized for size only.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from slimsearch.spaces.methods.packed import EMBEDDING_BITS, LINEAR_BITS, PackedEmbedding, PackedLinear
from slimsearch.spaces.methods.quantize import (
    GROUPED_BITS,
    QUANTIZER_VERSION,
    dequantize_groups,
    quantize_groups,
    quantize_rows,
)
from slimsearch.spaces.methods.registry import BOTH, QAT, SIZE, LinearWork, Method, Scope, Stage, register


@register
class Bits(Method):
    name = "bits"
    position = 20
    stage: ClassVar[Stage] = "quantize"
    scopes: ClassVar[frozenset[Scope]] = frozenset({"linear", "table"})
    off = 32
    qat: ClassVar[QAT] = "requantize"
    version = QUANTIZER_VERSION
    colorscale = "Viridis"
    always_listed = True

    def check(self, value: Any) -> Any:
        if isinstance(value, bool) or value not in LINEAR_BITS:
            raise ValueError(f"bits={value!r} is not supported: choose one of {LINEAR_BITS}")
        return int(value)

    def check_choice(self, value: Any) -> Any:
        if isinstance(value, bool) or value not in LINEAR_BITS:
            raise ValueError(f"bits: {value!r} is not allowed; choose from {list(LINEAR_BITS)}")
        return value

    def allowed(self) -> tuple[Any, ...] | None:
        return LINEAR_BITS

    def table_allowed(self) -> tuple[Any, ...] | None:
        return (32, *EMBEDDING_BITS)

    def short(self, value: Any) -> str:
        return f"{value}b"

    def realized(self, value: Any) -> str:
        # bf16 matmuls (this CPU has avx512_bf16) and fbgemm int8 kernels; 4 and 2 bits are
        # dequantized to a dense fp32 copy to compute.
        return BOTH if value in (16, 8) else SIZE

    def realized_key(self, value: Any) -> str:
        return f"bits{value}"

    def examples(self) -> tuple[Any, ...]:
        return (4, 8, 16, 2)

    def quantize(self, work: LinearWork, value: Any) -> nn.Module:
        return PackedLinear.from_work(work, int(value), self.name)

    def quantize_table(self, table: nn.Embedding, value: Any) -> nn.Module:
        return PackedEmbedding.from_embedding(table, int(value))

    def stored_value(self, module: nn.Module) -> Any:
        return module.bits

    def fake_quantize(self, weight: Tensor, value: Any, keep: Tensor | None) -> Tensor:
        """The same functions and masking order as ``PackedLinear.from_work`` then
        ``dense_weight``."""
        bits = int(value)
        w = weight.detach()
        if keep is not None:
            w = w * keep
        if bits == 32:
            return w
        if bits == 16:
            return w.to(torch.bfloat16).float()
        if bits == 8:
            codes, scale = quantize_rows(w, 8)
            return codes.float() * scale[:, None]
        if bits in GROUPED_BITS:
            codes, gscale, offset = quantize_groups(w, bits, keep)
            q = dequantize_groups(codes, gscale, offset)
            return q * keep if keep is not None else q
        raise ValueError(f"bits={bits!r} has no fake-quantization grid; PackedLinear uses {LINEAR_BITS}")
