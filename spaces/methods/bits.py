"""Bit-width (the ``bits`` knob): weight quantization of Linears and tables, with two options.

32 is off; 16 stores bf16 and computes in bf16; 8 stores symmetric int8 codes with one scale
per row and computes on the fbgemm int8 kernel (activations quantized per tensor, on the fly);
4, 3 and 2 store packed group-wise codes (see quantize.py) and compute on torch's int4
weight-only kernel where the layer's shape fits it and it is not sparse, else on a dense fp32
copy (realized for size only; methods/kernels.py). Codes are rounded to nearest unless a
rounding option (GPTQ) chooses them.

Options of the same layer: ``group`` (columns per scale at 4, 3 and 2 bits: 32, 64 or 128;
64 is the default), ``integer_zero`` (at 4, 3 and 2 bits: offsets kept whole multiples of
the scale, the integer zero points ONNX Runtime's fast 4-bit kernels take) and
``weight_only`` (at 8 bits: keep activations in float, on the int8 weight-only kernel,
which keeps more accuracy than quantizing activations).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from slimsearch.spaces.methods import registry
from slimsearch.spaces.methods.packed import EMBEDDING_BITS, LINEAR_BITS, PackedEmbedding, PackedLinear
from slimsearch.spaces.methods.quantize import (
    GRID_BITS,
    GROUP_SIZE,
    GROUP_SIZES,
    GROUPED_BITS,
    QUANTIZER_VERSION,
    Grid,
    dequantize_groups,
    quantize_groups,
    quantize_rows,
)
from slimsearch.spaces.methods.registry import (
    BOTH,
    QAT,
    SIZE,
    LinearWork,
    Method,
    Scope,
    Stage,
    Switch,
    calibrated_codes,
    register,
)


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
        # bf16 matmuls, fbgemm int8 and torch's int4 weight-only kernels (methods/kernels.py),
        # where the layer's shape fits them; a layer that does not fit says so itself.
        return BOTH

    def amend_realized(self, value: Any, values: Mapping[str, Any], realized: dict[str, str]) -> None:
        # The int4 kernel has no sparse form: sparse 4/3/2-bit layers compute on a dense copy.
        pruned = any(m.stage == "sparsify" for m, _ in registry.in_stage_order(values))
        if value in GROUPED_BITS and pruned:
            realized[self.realized_key(value)] = SIZE

    def realized_key(self, value: Any) -> str:
        return f"bits{value}"

    def examples(self) -> tuple[Any, ...]:
        return (4, 8, 16, 2, 3)

    def grid(self, work: LinearWork, value: Any) -> Grid | None:
        bits = int(value)
        if bits not in GRID_BITS:
            return None
        group = int(work.options.get("group", GROUP_SIZE))
        return Grid.for_layer(bits, work.in_features, group, bool(work.options.get("integer_zero", False)))

    def quantize(self, work: LinearWork, value: Any) -> nn.Module:
        bits = int(value)
        group = int(work.options.get("group", GROUP_SIZE))
        weight_only = bool(work.options.get("weight_only", False))
        calibrated = [n for n in work.options if not isinstance(registry.get(n), _BitsOption)]
        grid = self.grid(work, value)
        if grid is None or not calibrated:
            integer_zero = bool(work.options.get("integer_zero", False))
            return PackedLinear.from_work(work, bits, self.name, group, weight_only, integer_zero)
        work, codes, scale, offset = calibrated_codes(work, grid)
        return PackedLinear.from_codes(work, bits, codes, scale, offset, self.name, group, weight_only)

    def stored_options(self, module: nn.Module) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if module.bits in GROUPED_BITS and module.group != GROUP_SIZE:
            out["group"] = module.group
        if module.weight_only:
            out["weight_only"] = True
        if module.integer_zero:
            out["integer_zero"] = True
        return out

    def quantize_table(self, table: nn.Embedding, value: Any) -> nn.Module:
        return PackedEmbedding.from_embedding(table, int(value))

    def stored_value(self, module: nn.Module) -> Any:
        return module.bits

    def fake_quantize(
        self, weight: Tensor, value: Any, keep: Tensor | None, options: Mapping[str, Any] | None = None
    ) -> Tensor:
        """The same functions and masking order as ``PackedLinear.from_work`` then
        ``dense_weight``."""
        bits = int(value)
        group = int((options or {}).get("group", GROUP_SIZE))
        integer_zero = bool((options or {}).get("integer_zero", False))
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
            codes, gscale, offset = quantize_groups(w, bits, keep, group, None, integer_zero)
            q = dequantize_groups(codes, gscale, offset, group)
            return q * keep if keep is not None else q
        raise ValueError(f"bits={bits!r} has no fake-quantization grid; PackedLinear uses {LINEAR_BITS}")


class _BitsOption(Method):
    stage: ClassVar[Stage] = "quantize"
    option_of: ClassVar[Stage | None] = "quantize"
    scopes: ClassVar[frozenset[Scope]] = frozenset({"linear"})
    qat: ClassVar[QAT] = "requantize"  # re-stored with the same option (Bits.stored_options)

    def realized(self, value: Any) -> str:
        return SIZE


@register
class Group(_BitsOption):
    """Columns of a row that share one scale and offset at 4, 3 and 2 bits (the ``group``
    knob): smaller groups fit the weights closer and store more scales."""

    name = "group"
    option_base: ClassVar[Mapping[str, Any]] = {"bits": 4}
    position = 21
    off = GROUP_SIZE
    colorscale = "Greys"

    def check(self, value: Any) -> Any:
        if isinstance(value, bool) or value not in GROUP_SIZES:
            raise ValueError(f"group={value!r} is not supported: choose one of {list(GROUP_SIZES)}")
        return int(value)

    def allowed(self) -> tuple[Any, ...] | None:
        return GROUP_SIZES

    def short(self, value: Any) -> str:
        return f"g{value}"

    def acts_with(self, host: Mapping[str, Any]) -> bool:
        return host.get("bits") in GROUPED_BITS

    def examples(self) -> tuple[Any, ...]:
        return (32, 128)


@register
class IntegerZero(_BitsOption, Switch):
    """At 4, 3 and 2 bits, keep each group's offset a whole number of steps (the
    ``integer_zero`` knob): the integer zero points ONNX Runtime's fast MatMulNBits paths
    take, for a slightly looser fit. The bytes are the same."""

    name = "integer_zero"
    option_base: ClassVar[Mapping[str, Any]] = {"bits": 4}
    position = 25
    colorscale = "Greys"

    def short(self, value: Any) -> str:
        return "int-zero"

    def acts_with(self, host: Mapping[str, Any]) -> bool:
        return host.get("bits") in GROUPED_BITS

    def examples(self) -> tuple[Any, ...]:
        return (True,)


@register
class WeightOnly(_BitsOption, Switch):
    """At 8 bits, keep activations in float (the ``weight_only`` knob): per-channel int8
    weights on torch's int8 weight-only kernel with bf16 activations."""

    name = "weight_only"
    option_base: ClassVar[Mapping[str, Any]] = {"bits": 8}
    position = 22
    colorscale = "Greys"

    def short(self, value: Any) -> str:
        return "w-only"

    def acts_with(self, host: Mapping[str, Any]) -> bool:
        return host.get("bits") == 8

    def amend_realized(self, value: Any, values: Mapping[str, Any], realized: dict[str, str]) -> None:
        if value and values.get("bits") == 8:
            realized.pop("bits8", None)
            realized["bits8-weight-only"] = BOTH

    def examples(self) -> tuple[Any, ...]:
        return (True,)
