"""Weight quantization and bit packing. Stored forms are real; nothing keeps a float copy.

- 8 bits: symmetric int8 codes with one fp32 scale per row (output channel), the layout
  the fbgemm int8 kernel takes.
- 4, 3 and 2 bits: asymmetric codes in [0, 2**bits) with one fp16 scale and one fp16 offset
  per group of consecutive weights of a row (``GROUP_SIZE`` unless a plan says 32 or 128),
  packed lowest bits first into a stream of bytes. Group-wise scales keep 2-bit weights
  usable; they cost 32 bits per group (0.5 bit a weight at groups of 64), which the size
  objective counts like everything else. Each group's scale and offset are fitted to its
  weights by least squares, not min-max (with ``integer_zero``, offsets stay whole
  multiples of the scale: integer zero points).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

GROUP_SIZE = 64
GROUPED_BITS = (4, 3, 2)
GRID_BITS = (8, *GROUPED_BITS)  # the widths whose codes are chosen on a grid (options act there)
GROUP_SIZES = (32, 64, 128)
# Least-squares refinements of each group's scale and offset (see quantize_groups); 8 is
# within 1% of converged at 2 bits on MiniLM.
REFINE_STEPS = 8
# Bumped whenever stored codes for the same weight change, so caches of measured results
# (sensitivity profiles, the search benchmark's evaluations) are not reused across it.
QUANTIZER_VERSION = 2
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


def group_size_for(cols: int, group: int = GROUP_SIZE) -> int:
    """Groups of ``group`` columns, or the whole row (rounded up to 8) when rows are shorter."""
    return min(group, -(-cols // 8) * 8)


def _check_grouped(bits: int) -> None:
    if bits not in GROUPED_BITS:
        raise ValueError(f"group-wise quantization supports bits {list(GROUPED_BITS)}, not {bits!r}")


def quantize_groups(
    weight: Tensor,
    bits: int,
    keep: Tensor | None = None,
    group: int = GROUP_SIZE,
    importance: Tensor | None = None,
    integer_zero: bool = False,
) -> tuple[Tensor, Tensor, Tensor]:
    """Asymmetric group-wise codes: (uint8 codes shaped like ``weight``, fp16 scale, fp16
    offset), the last two shaped (rows, groups); weight ~= codes * scale + offset.

    Scale and offset start at each group's min-max and are then refined for the squared
    error by alternating least squares (codes given the grid, then the grid given the
    codes), ``REFINE_STEPS`` times. Min-max spends its levels on the group's outliers; at
    2 bits the refinement halves MiniLM's weight error. ``keep`` (a bool mask like
    ``weight``) fits only the entries a sparse layer stores. ``importance`` (one non-negative
    weight per column, such as the Hessian's diagonal) weighs the fit, so the grid serves
    the columns whose errors cost the layer's output most. ``integer_zero`` keeps every
    offset a whole number of steps below zero (``offset == -z * scale``, z a code), the
    grid ONNX Runtime's fast 4-bit kernels take: after each fit, z is rounded and the scale
    fitted again for it."""
    _check_grouped(bits)
    w = weight.detach().float()
    rows, cols = w.shape
    group = group_size_for(cols, group)
    groups = -(-cols // group)
    pad = groups * group - cols
    padded = torch.nn.functional.pad(w, (0, pad)).view(rows, groups, group)
    # Which entries the fit must serve: not the padding, not pruned weights.
    real = torch.ones_like(w, dtype=torch.bool) if keep is None else keep.bool()
    used = torch.nn.functional.pad(real, (0, pad)).view(rows, groups, group)
    big = torch.finfo(torch.float32).max
    low = torch.where(used, padded, big).amin(dim=2)
    high = torch.where(used, padded, -big).amax(dim=2)
    empty = ~used.any(dim=2)
    low, high = torch.where(empty, 0.0, low), torch.where(empty, 0.0, high)
    levels = 2**bits - 1
    scale, offset = (high - low) / levels, low
    # Fitting sums over the used entries only; without padding or pruning that is all of them.
    mask = None if bool(used.all()) else used.float()
    if importance is not None:
        # Normalized to mean 1, so the collapse threshold below keeps its meaning.
        d = importance.detach().float().clamp_min(0.0)
        d = d / d.mean().clamp_min(1e-20)
        d = torch.nn.functional.pad(d, (0, pad)).view(1, groups, group)
        mask = used.float() * d
    fit = padded if mask is None else padded * mask
    if importance is None:
        count = used.sum(dim=2).clamp_min(1).float()
    else:
        assert mask is not None
        count = mask.sum(dim=2).clamp_min(1e-20)
    sum_w = fit.sum(dim=2)
    for _ in range(REFINE_STEPS):
        codes = _codes(padded, scale, offset, levels)
        weighted = codes if mask is None else codes * mask
        # Least squares of weight ~= codes * scale + offset per group, in closed form, each
        # entry weighted by its mask (used or not, times its column's importance).
        sum_c = weighted.sum(dim=2)
        var = (weighted * codes).sum(dim=2) - sum_c * sum_c / count
        cov = (codes * fit).sum(dim=2) - sum_c * sum_w / count
        fitted = cov / var.clamp_min(1e-20)
        # A group whose codes collapse to one level keeps its grid (no slope to fit).
        ok = (var > 1e-6) & (fitted > 0)
        scale = torch.where(ok, fitted, scale)
        offset = torch.where(ok, (sum_w - scale * sum_c) / count, offset)
        if integer_zero:
            scale, offset = _whole_zero(scale, offset, codes, fit, mask, levels)
    # Round scale and offset to their stored dtype first, so codes are chosen against
    # exactly the values a reader will use.
    if integer_zero:
        scale, zero = _constant_groups(scale, offset, low, high, levels)
        scale16 = _exact_product_scale(scale, zero)
        offset16 = (-zero * scale16.float()).to(torch.float16)
    else:
        scale16 = scale.to(torch.float16)
        scale16 = torch.where(scale16 > 0, scale16, torch.ones_like(scale16))
        offset16 = offset.to(torch.float16)
    codes = _codes(padded, scale16.float(), offset16.float(), levels).to(torch.uint8)
    codes = codes.view(rows, groups * group)[:, :cols]
    return codes.contiguous(), scale16, offset16


def _zero_codes(scale: Tensor, offset: Tensor, levels: int) -> Tensor:
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    return (-offset / safe).round().clamp_(0, levels)


def _whole_zero(
    scale: Tensor, offset: Tensor, codes: Tensor, fit: Tensor, mask: Tensor | None, levels: int
) -> tuple[Tensor, Tensor]:
    """The fit's offset rounded to a whole zero code z, and the scale refitted by least
    squares for weight ~= (codes - z) * scale."""
    zero = _zero_codes(scale, offset, levels)
    shifted = codes - zero[..., None]
    weighted = shifted if mask is None else shifted * mask
    num = (shifted * fit).sum(dim=2)
    den = (weighted * shifted).sum(dim=2)
    refit = num / den.clamp_min(1e-20)
    scale = torch.where((den > 1e-6) & (refit > 0), refit, scale)
    return scale, -zero * scale


def _exact_product_scale(scale: Tensor, zero: Tensor) -> Tensor:
    """The fp16 scale nearest ``scale`` whose product with the zero code is exact in fp16,
    so the stored offset is exactly ``-zero * scale`` and a reader computing
    ``(code - zero) * scale`` (ORT's uint8 zero points) gets the same weights. A significand
    that is a multiple of 16 always qualifies (zero < 16), so 8 fp16 steps either way suffice."""
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    nearest = scale.to(torch.float16).clamp_min(torch.finfo(torch.float16).tiny)
    steps = torch.arange(-8, 9, dtype=torch.int16)
    candidates = (nearest.view(torch.int16)[..., None] + steps).view(torch.float16).float()
    product = zero[..., None] * candidates
    exact = (product.to(torch.float16).float() == product) & (candidates > 0) & torch.isfinite(product)
    distance = torch.where(exact, (candidates - scale[..., None]).abs(), torch.inf)
    return candidates.gather(-1, distance.argmin(-1, keepdim=True)).squeeze(-1).to(torch.float16)


def _constant_groups(
    scale: Tensor, offset: Tensor, low: Tensor, high: Tensor, levels: int
) -> tuple[Tensor, Tensor]:
    """(scale, zero code) per group; a group of one value v (no slope to fit) stores
    scale |v| with zero 0 and code 1 (v > 0) or zero 1 and code 0 (v < 0): v to fp16's
    rounding, with no product for the scale to fit."""
    zero = _zero_codes(scale, offset, levels)
    flat = high == low
    scale = torch.where(flat, torch.where(low == 0, 1.0, low.abs()), scale)
    zero = torch.where(flat, (low < 0).to(zero.dtype), zero)
    return scale, zero


def whole_zeros(offset: Tensor, scale: Tensor, levels: int) -> Tensor | None:
    """The zero codes ``-offset / scale`` as uint8 when every one is exactly a whole code in
    [0, levels] (as ``integer_zero`` grids store them), else None: a float-offset grid."""
    zero = -offset.float() / scale.float()
    nearest = zero.round()
    if zero.numel() and not bool(torch.isfinite(zero).all()):
        return None
    if zero.numel() and not bool((zero == nearest).all()):
        return None
    if zero.numel() and (float(nearest.min()) < 0 or float(nearest.max()) > levels):
        return None
    return nearest.to(torch.uint8)


def _codes(padded: Tensor, scale: Tensor, offset: Tensor, levels: int) -> Tensor:
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    return torch.round((padded - offset[..., None]) / safe[..., None]).clamp_(0, levels)


def dequantize_groups(codes: Tensor, scale: Tensor, offset: Tensor, group: int = GROUP_SIZE) -> Tensor:
    """fp32 weights from (rows, cols) codes and their per-group scale and offset."""
    cols = codes.shape[-1]
    group = group_size_for(cols, group)
    s = scale.float().repeat_interleave(group, dim=-1)[..., :cols]
    o = offset.float().repeat_interleave(group, dim=-1)[..., :cols]
    return codes.float() * s + o


def pack_codes(codes: Tensor, bits: int) -> Tensor:
    """Pack unsigned codes in [0, 2**bits) into uint8, lowest bits first; pads the tail.
    4 and 2 bits fill whole bytes (8 // bits codes a byte); 3 bits run on across bytes
    (eight codes in three bytes)."""
    _check_grouped(bits)
    if 8 % bits:
        return _pack_stream(codes, bits)
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
    """The first ``count`` codes of ``pack_codes`` output, as uint8 (for 4 and 2 bits this
    works on any leading shape when ``count`` is a multiple of the codes per byte times the
    last dimension)."""
    _check_grouped(bits)
    if 8 % bits:
        return _unpack_stream(packed, bits, count)
    per_byte = 8 // bits
    mask = 2**bits - 1
    parts = [(packed >> (bits * i)) & mask for i in range(per_byte)]
    return torch.stack(parts, dim=-1).reshape(-1)[:count]


_SHIFTS = torch.arange(8, dtype=torch.uint8)


def _pack_stream(codes: Tensor, bits: int) -> Tensor:
    flat = codes.reshape(-1).to(torch.uint8)
    shifts = _SHIFTS.to(flat.device)
    stream = ((flat[:, None] >> shifts[:bits]) & 1).reshape(-1)
    pad = (-stream.numel()) % 8
    if pad:
        stream = torch.cat([stream, stream.new_zeros(pad)])
    return (stream.view(-1, 8) << shifts).sum(dim=1, dtype=torch.int32).to(torch.uint8)


def _unpack_stream(packed: Tensor, bits: int, count: int) -> Tensor:
    shifts = _SHIFTS.to(packed.device)
    stream = ((packed.reshape(-1)[:, None] >> shifts) & 1).reshape(-1)[: count * bits]
    return (stream.view(count, bits) << shifts[:bits]).sum(dim=1, dtype=torch.int32).to(torch.uint8)


def pack_bits(mask: Tensor) -> Tensor:
    """Pack a bool tensor into uint8, eight flags a byte, most significant bit first."""
    flat = mask.reshape(-1).to(torch.uint8)
    pad = (-flat.numel()) % 8
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    return (flat.view(-1, 8) * _BIT_WEIGHTS.to(flat.device)).sum(dim=1, dtype=torch.int32).to(torch.uint8)


def unpack_bits(packed: Tensor, count: int) -> Tensor:
    shifts = torch.arange(7, -1, -1, dtype=torch.uint8, device=packed.device)
    bits = (packed[:, None] >> shifts) & 1
    return bits.reshape(-1)[:count].bool()


@dataclass(frozen=True)
class Grid:
    """The codes a quantize method stores a Linear's weight with, for methods that choose the
    codes themselves (GPTQ's error feedback, AWQ's scale search): ``bits``, and ``group``
    consecutive columns of a row sharing one scale (and one offset unless ``symmetric``).

    Scales and offsets are shaped (rows, groups); symmetric per-row 8 bits has one group."""

    bits: int
    group: int
    symmetric: bool
    integer_zero: bool = False

    @classmethod
    def for_layer(cls, bits: int, cols: int, group: int = GROUP_SIZE, integer_zero: bool = False) -> Grid:
        if bits == 8:
            return cls(8, cols, True)
        _check_grouped(bits)
        return cls(bits, group_size_for(cols, group), False, integer_zero)

    def fit(
        self, w: Tensor, keep: Tensor | None = None, importance: Tensor | None = None
    ) -> tuple[Tensor, Tensor | None]:
        """Scale and offset (rows, groups) for ``w``, whose columns are whole groups (the last
        may be short); ``importance`` weighs the columns in the asymmetric fit."""
        if self.symmetric:
            limit = qmax(self.bits)
            chunks = w.detach().float().split(self.group, dim=1)
            return torch.stack([c.abs().amax(dim=1) for c in chunks], 1).clamp_min(1e-12) / limit, None
        _, scale, offset = quantize_groups(w, self.bits, keep, self.group, importance, self.integer_zero)
        return scale.float(), offset.float()

    def codes(self, w: Tensor, scale: Tensor, offset: Tensor | None) -> Tensor:
        """Codes of ``w`` (rows, k) on one group's ``scale`` and ``offset`` (rows,)."""
        if self.symmetric:
            limit = qmax(self.bits)
            return torch.round(w / scale[:, None]).clamp_(-limit, limit)
        assert offset is not None
        return _codes(w, scale, offset, 2**self.bits - 1)

    def values(self, codes: Tensor, scale: Tensor, offset: Tensor | None) -> Tensor:
        """The weights ``codes`` (rows, k) of one group stand for."""
        out = codes * scale[:, None]
        return out if offset is None else out + offset[:, None]

    def round(self, w: Tensor, keep: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor | None]:
        """Round-to-nearest codes of the whole matrix with fitted scales (and offsets)."""
        if not self.symmetric:
            codes, scale16, offset16 = quantize_groups(
                w, self.bits, keep, self.group, integer_zero=self.integer_zero
            )
            return codes.float(), scale16.float(), offset16.float()
        scale, offset = self.fit(w, keep)
        return self.codes_all(w, scale, offset), scale, offset

    def codes_all(self, w: Tensor, scale: Tensor, offset: Tensor | None) -> Tensor:
        parts = w.detach().float().split(self.group, dim=1)
        return torch.cat(
            [
                self.codes(p, scale[:, g], None if offset is None else offset[:, g])
                for g, p in enumerate(parts)
            ],
            dim=1,
        )

    def dequantize(self, codes: Tensor, scale: Tensor, offset: Tensor | None) -> Tensor:
        if offset is not None:
            return dequantize_groups(codes, scale, offset, self.group)
        parts = codes.float().split(self.group, dim=1)
        return torch.cat(
            [
                self.values(p, scale[:, g], None if offset is None else offset[:, g])
                for g, p in enumerate(parts)
            ],
            dim=1,
        )
