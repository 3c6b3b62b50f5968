"""The low-bit CPU matmul kernels that packed layers run on at inference.

torch 2.13 ships two weight-only kernels that take bf16 activations:

- ``aten._weight_int4pack_mm_for_cpu``: 4-bit codes in a tiled layout, one bf16 (scale,
  zero) pair per group of input columns, computing ``(code - 8) * scale + zero``. Our
  asymmetric ``code * scale + offset`` is that with ``zero = offset + 8 * scale``; 3- and
  2-bit codes run on it too, widened to 4 bits in memory (``int4_pack``).
- ``aten._weight_int8pack_mm``: int8 codes with one scale per output row.

Both need shapes they can tile (``int4_fits``, ``int8_fits``); the fp32-activation forms of
the same kernels are over ten times slower than a dense fp32 matmul here, so activations are
cast to bf16 (see benchmarks/kernels.py for the measured ratios).
"""

from __future__ import annotations

import torch
from torch import Tensor

from slimsearch.spaces.methods.quantize import group_size_for

INT4_GROUPS = (32, 64, 128, 256)
# Tiles of 16 input columns per inner block: any value the kernel accepts gives the same
# numbers; 2 is what torchao uses on CPU.
_INNER_K_TILES = 2


def int4_fits(out_features: int, in_features: int, group: int) -> bool:
    """Whether the int4 kernel can hold a (out, in) weight with groups of ``group`` columns
    (a last, partial group is padded to whole: ``int4_pack``)."""
    return out_features % 16 == 0 and group_size_for(in_features, group) in INT4_GROUPS


def int8_fits(in_features: int) -> bool:
    """Whether the int8 weight-only kernel takes rows of ``in_features`` (it faults on others)."""
    return in_features % 16 == 0


def kernel_for(
    bits: int, out_features: int, in_features: int, group: int, sparse: bool, weight_only: bool
) -> str:
    """The kernel a weight stored at ``bits`` runs on: "int8" (activations quantized too),
    "int8-weight-only", "int4" (4, 3 and 2 bits, not sparse), "bf16", or "dense" (fp32)."""
    if bits == 8:
        if not weight_only:
            return "int8"
        return "int8-weight-only" if int8_fits(in_features) else "dense"
    if bits == 16:
        return "bf16"
    low = bits in (4, 3, 2) and not sparse
    return "int4" if low and int4_fits(out_features, in_features, group) else "dense"


def int4_pack(
    codes: Tensor, scale: Tensor, offset: Tensor, group: int, bits: int = 4
) -> tuple[Tensor, Tensor]:
    """The int4 kernel's weight and its (groups, out, 2) bf16 scales and zeros, from unsigned
    ``bits``-bit codes (out, in) and fp16 (out, groups) scales and offsets. A partial last
    group is padded with columns that ``int4_linear`` meets with zero inputs."""
    # Codes of fewer bits move to the middle of the 4-bit range, so the zero lands mid-range
    # too: bf16 rounds a zero far outside the weights' range to visibly wrong weights.
    shift = 8 - 2 ** (bits - 1)
    padded = scale.shape[-1] * group_size_for(codes.shape[-1], group)
    shifted = torch.nn.functional.pad(codes.to(torch.int32) + shift, (0, padded - codes.shape[-1]))
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(shifted.contiguous(), _INNER_K_TILES)
    s = scale.float()
    zeros = offset.float() + (8 - shift) * s
    scales_and_zeros = torch.stack([s.t(), zeros.t()], dim=-1).to(torch.bfloat16).contiguous()
    return packed, scales_and_zeros


def int4_linear(
    x: Tensor, packed: Tensor, scales_and_zeros: Tensor, group: int, bias: Tensor | None
) -> Tensor:
    """``x @ W.T + bias`` on the int4 kernel; ``x`` of any leading shape, returned in its dtype."""
    shape = x.shape
    flat = x.reshape(-1, shape[-1]).to(torch.bfloat16)
    group = group_size_for(shape[-1], group)
    padding = scales_and_zeros.shape[0] * group - shape[-1]
    if padding:
        flat = torch.nn.functional.pad(flat, (0, padding))
    y = torch.ops.aten._weight_int4pack_mm_for_cpu(
        aligned(flat.contiguous()), packed, group, scales_and_zeros
    )
    return _finish(y, shape, x.dtype, bias)


def int8_linear(x: Tensor, codes: Tensor, scale: Tensor, bias: Tensor | None) -> Tensor:
    """``x @ W.T + bias`` on the int8 weight-only kernel: int8 ``codes`` (out, in, contiguous
    and ``aligned``), a bf16 scale per output row."""
    shape = x.shape
    flat = x.reshape(-1, shape[-1]).to(torch.bfloat16).contiguous()
    y = torch.ops.aten._weight_int8pack_mm(aligned(flat), codes, scale)
    return _finish(y, shape, x.dtype, bias)


def aligned(tensor: Tensor) -> Tensor:
    """``tensor``, copied where its data is not 64-byte aligned: the kernels fault on
    misaligned weights (e.g. ones read from a file at an odd offset)."""
    return tensor if tensor.data_ptr() % 64 == 0 else tensor.clone()


def _finish(y: Tensor, shape: torch.Size, dtype: torch.dtype, bias: Tensor | None) -> Tensor:
    out = y.to(dtype)
    if bias is not None:
        out = out + bias.to(dtype)
    return out.view(*shape[:-1], y.shape[-1])
