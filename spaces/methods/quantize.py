"""Symmetric per-row (per output channel) weight quantization and bit packing.

Stored forms are real: int8 codes, or two 4-bit codes per uint8 byte, plus one fp32 scale
per row. Nothing here keeps a float copy of the weights.
"""

from __future__ import annotations

import torch
from torch import Tensor

_BIT_WEIGHTS = torch.tensor([128, 64, 32, 16, 8, 4, 2, 1], dtype=torch.uint8)


def qmax(bits: int) -> int:
    if bits not in (8, 4):
        raise ValueError(f"integer quantization supports bits 8 or 4, not {bits!r}")
    return 2 ** (bits - 1) - 1


def quantize_rows(weight: Tensor, bits: int) -> tuple[Tensor, Tensor]:
    """Return int8 codes in [-qmax, qmax] and one fp32 scale per row (symmetric)."""
    limit = qmax(bits)
    w = weight.detach().float()
    scale = w.abs().amax(dim=1).clamp_min(1e-12) / limit
    codes = torch.round(w / scale[:, None]).clamp_(-limit, limit).to(torch.int8)
    return codes, scale


def pack_int4(codes: Tensor) -> Tensor:
    """Pack int8 codes in [-8, 7] two per byte (low nibble first); pads an odd count."""
    flat = (codes.reshape(-1).to(torch.int16) + 8).to(torch.uint8)
    if flat.numel() % 2:
        flat = torch.cat([flat, flat.new_zeros(1)])
    pairs = flat.view(-1, 2)
    return pairs[:, 0] | (pairs[:, 1] << 4)


def unpack_int4(packed: Tensor, count: int) -> Tensor:
    low = (packed & 0x0F).to(torch.int8) - 8
    high = (packed >> 4).to(torch.int8) - 8
    return torch.stack([low, high], dim=1).reshape(-1)[:count]


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


def encode_codes(codes: Tensor, bits: int) -> Tensor:
    return pack_int4(codes) if bits == 4 else codes.reshape(-1).clone()


def decode_codes(stored: Tensor, bits: int, count: int) -> Tensor:
    return unpack_int4(stored, count) if bits == 4 else stored.reshape(-1)[:count]
