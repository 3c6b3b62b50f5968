"""Weight quantization and bit packing. Stored forms are real; nothing keeps a float copy.

- 8 bits: symmetric int8 codes with one fp32 scale per row (output channel), the layout
  the fbgemm int8 kernel takes.
- 4 and 2 bits: asymmetric codes in [0, 2**bits) with one fp16 scale and one fp16 offset
  per group of ``GROUP_SIZE`` consecutive weights of a row, packed 8 // bits codes a byte.
  Group-wise scales keep 2-bit weights usable; they cost 32 bits per group (0.5 bit a
  weight at groups of 64), which the size objective counts like everything else.
"""

from __future__ import annotations

import torch
from torch import Tensor

GROUP_SIZE = 64
GROUPED_BITS = (4, 2)
_BIT_WEIGHTS = torch.tensor([128, 64, 32, 16, 8, 4, 2, 1], dtype=torch.uint8)


def qmax(bits: int) -> int:
    if bits != 8:
        raise ValueError(f"per-row symmetric quantization is for bits=8, not {bits!r}")
    return 127


def quantize_rows(weight: Tensor, bits: int = 8) -> tuple[Tensor, Tensor]:
    """Return int8 codes in [-127, 127] and one fp32 scale per row (symmetric)."""
    limit = qmax(bits)
    w = weight.detach().float()
    scale = w.abs().amax(dim=1).clamp_min(1e-12) / limit
    codes = torch.round(w / scale[:, None]).clamp_(-limit, limit).to(torch.int8)
    return codes, scale


def group_size_for(cols: int) -> int:
    """Groups of GROUP_SIZE, or the whole row (rounded up to 8) when rows are shorter."""
    return min(GROUP_SIZE, -(-cols // 8) * 8)


def _check_grouped(bits: int) -> None:
    if bits not in GROUPED_BITS:
        raise ValueError(f"group-wise quantization supports bits {list(GROUPED_BITS)}, not {bits!r}")


def quantize_groups(weight: Tensor, bits: int) -> tuple[Tensor, Tensor, Tensor]:
    """Asymmetric group-wise codes: (uint8 codes shaped like ``weight``, fp16 scale, fp16
    offset), the last two shaped (rows, groups); weight ~= codes * scale + offset."""
    _check_grouped(bits)
    w = weight.detach().float()
    rows, cols = w.shape
    group = group_size_for(cols)
    groups = -(-cols // group)
    # Zero padding only widens the last group's range to include 0: harmless.
    padded = torch.nn.functional.pad(w, (0, groups * group - cols)).view(rows, groups, group)
    low, high = padded.amin(dim=2), padded.amax(dim=2)
    levels = 2**bits - 1
    # Round scale and offset to their stored dtype first, so codes are chosen against
    # exactly the values a reader will use.
    scale = ((high - low) / levels).to(torch.float16)
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    offset = low.to(torch.float16)
    codes = torch.round((padded - offset.float()[..., None]) / scale.float()[..., None])
    codes = codes.clamp_(0, levels).to(torch.uint8).view(rows, groups * group)[:, :cols]
    return codes.contiguous(), scale, offset


def dequantize_groups(codes: Tensor, scale: Tensor, offset: Tensor) -> Tensor:
    """fp32 weights from (rows, cols) codes and their per-group scale and offset."""
    cols = codes.shape[-1]
    group = group_size_for(cols)
    s = scale.float().repeat_interleave(group, dim=-1)[..., :cols]
    o = offset.float().repeat_interleave(group, dim=-1)[..., :cols]
    return codes.float() * s + o


def pack_codes(codes: Tensor, bits: int) -> Tensor:
    """Pack unsigned codes in [0, 2**bits) into uint8, lowest bits first; pads the tail."""
    _check_grouped(bits)
    per_byte = 8 // bits
    flat = codes.reshape(-1).to(torch.uint8)
    pad = (-flat.numel()) % per_byte
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    chunks = flat.view(-1, per_byte)
    out = torch.zeros(chunks.shape[0], dtype=torch.uint8)
    for i in range(per_byte):
        out |= chunks[:, i] << (bits * i)
    return out


def unpack_codes(packed: Tensor, bits: int, count: int) -> Tensor:
    """The first ``count`` codes of ``pack_codes`` output, as uint8 (works on any leading shape
    when ``count`` is a multiple of the codes per byte times the last dimension)."""
    _check_grouped(bits)
    per_byte = 8 // bits
    mask = 2**bits - 1
    parts = [(packed >> (bits * i)) & mask for i in range(per_byte)]
    return torch.stack(parts, dim=-1).reshape(-1)[:count]


def pack_bits(mask: Tensor) -> Tensor:
    """Pack a bool tensor into uint8, eight flags a byte, most significant bit first."""
    flat = mask.reshape(-1).to(torch.uint8)
    pad = (-flat.numel()) % 8
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    return (flat.view(-1, 8) * _BIT_WEIGHTS).sum(dim=1, dtype=torch.int32).to(torch.uint8)


def unpack_bits(packed: Tensor, count: int) -> Tensor:
    shifts = torch.arange(7, -1, -1, dtype=torch.uint8)
    bits = (packed[:, None] >> shifts) & 1
    return bits.reshape(-1)[:count].bool()
