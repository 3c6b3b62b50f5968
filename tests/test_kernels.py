"""Packed layers on torch's low-bit kernels: each kernel's output against the dense reference
(the dequantized weight in fp32), the layers that no kernel takes falling back to it, and no
dense float copy kept where a kernel runs."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from slimsearch.spaces import LayerSettings
from slimsearch.spaces.apply import compress_linear
from slimsearch.spaces.methods import PackedEmbedding, PackedLinear, TiedHead
from slimsearch.spaces.methods.calibration import LayerStats
from slimsearch.spaces.methods.registry import BOTH, SIZE

# bf16 activations: about 3 significant digits.
TOLERANCE = 1e-2


def _linear(out_features: int, in_features: int) -> nn.Linear:
    gen = torch.Generator().manual_seed(out_features + in_features)
    linear = nn.Linear(in_features, out_features)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(out_features, in_features, generator=gen) * 0.05)
        linear.bias.copy_(torch.randn(out_features, generator=gen))
    return linear


def _inputs(in_features: int, *lead: int) -> Tensor:
    return torch.randn(*lead, in_features, generator=torch.Generator().manual_seed(7))


def _stats(x: Tensor) -> LayerStats:
    flat = x.reshape(-1, x.shape[-1])
    return LayerStats((flat * flat).sum(0), flat.T @ flat, flat.shape[0])


def _packed(linear: nn.Linear, x: Tensor, **settings: object) -> PackedLinear:
    module = compress_linear(linear, LayerSettings(**settings), _stats(x))
    assert isinstance(module, PackedLinear)
    return module


def _reference(module: PackedLinear, x: Tensor) -> Tensor:
    return F.linear(x, module.dense_weight(), getattr(module, "bias", None))


def _relative_error(got: Tensor, want: Tensor) -> float:
    return float((got - want).abs().max() / want.abs().max())


@pytest.mark.parametrize("group", [32, 64, 128])
@pytest.mark.parametrize("bits", [4, 3, 2])
def test_low_bits_run_on_the_int4_kernel(bits: int, group: int) -> None:
    linear, x = _linear(48, 256), _inputs(256, 2, 5)
    module = _packed(linear, x, bits=bits, group=group)
    assert module.kernel == "int4" and module.realized == BOTH and "int4" in module.compute_path
    with torch.no_grad():
        got = module(x)
    assert got.shape == (2, 5, 48) and got.dtype == torch.float32
    assert _relative_error(got, _reference(module, x)) < TOLERANCE
    assert "dense" not in module._cache, "a layer on a kernel keeps no dense float copy"


@pytest.mark.parametrize(("shape", "group"), [((48, 72), 64), ((32, 576), 128)])
def test_a_partial_last_group_is_padded_for_the_kernel(shape: tuple[int, int], group: int) -> None:
    linear, x = _linear(*shape), _inputs(shape[1], 3, 2)
    module = _packed(linear, x, bits=4, group=group)
    assert module.kernel == "int4"
    with torch.no_grad():
        assert _relative_error(module(x), _reference(module, x)) < TOLERANCE


def test_activation_scaling_is_divided_out_before_the_kernel() -> None:
    linear, x = _linear(48, 256), _inputs(256, 9)
    x[:, :8] *= 8.0
    module = _packed(linear, x, bits=4, awq=True)
    assert module.column_scale() is not None and module.kernel == "int4"
    with torch.no_grad():
        assert _relative_error(module(x), _reference(module, x)) < TOLERANCE


def test_int8_weight_only_runs_on_its_kernel() -> None:
    linear, x = _linear(48, 256), _inputs(256, 3, 4)
    module = _packed(linear, x, bits=8, weight_only=True)
    assert module.kernel == "int8-weight-only" and module.realized == BOTH
    with torch.no_grad():
        assert _relative_error(module(x), _reference(module, x)) < TOLERANCE
    assert "dense" not in module._cache


def test_bf16_computes_on_the_stored_values_without_a_copy() -> None:
    linear, x = _linear(48, 256), _inputs(256, 6)
    module = _packed(linear, x, bits=16)
    with torch.no_grad():
        assert _relative_error(module(x), _reference(module, x)) < TOLERANCE
    assert set(module._cache) == {"runtime"}  # no weight copy


@pytest.mark.parametrize(
    ("shape", "settings", "why"),
    [
        ((48, 256), {"bits": 4, "sparsity": 0.5}, "sparse"),
        ((40, 256), {"bits": 4}, "fits no kernel"),  # rows not a multiple of 16
        ((48, 40), {"bits": 4}, "fits no kernel"),  # rows of 40: one group of 40, not a kernel size
        ((48, 40), {"bits": 8, "weight_only": True}, "fits no kernel"),  # columns not a multiple of 16
    ],
)
def test_layers_no_kernel_takes_compute_dense_and_say_so(
    shape: tuple[int, int], settings: dict[str, object], why: str
) -> None:
    linear, x = _linear(*shape), _inputs(shape[1], 5)
    module = _packed(linear, x, **settings)
    assert module.kernel == "dense" and module.realized == SIZE
    assert "size only" in module.compute_path and why in module.compute_path
    with torch.no_grad():
        assert torch.equal(module(x), _reference(module, x))


def test_training_computes_on_the_dense_weight() -> None:
    linear, x = _linear(48, 256), _inputs(256, 5)
    module = _packed(linear, x, bits=4)
    x.requires_grad_(True)
    out = module(x)
    assert torch.equal(out, _reference(module, x))
    out.sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()


def test_misaligned_stored_codes_do_not_reach_the_kernel() -> None:
    # Tensors read from a file can start at any byte; the int8 kernel faults on those.
    linear, x = _linear(48, 256), _inputs(256, 5)
    module = _packed(linear, x, bits=8, weight_only=True)
    with torch.no_grad():
        want = module(x)
    codes = module.values
    shifted = torch.empty(codes.numel() + 1, dtype=torch.int8)[1:]
    shifted.copy_(codes)
    assert shifted.data_ptr() % 64 != 0
    module.values = shifted
    module.reset_cache()
    with torch.no_grad():
        assert torch.equal(module(x), want)


@pytest.mark.parametrize(
    ("bits", "kernel"), [(16, "bf16"), (8, "int8-weight-only"), (4, "int4"), (2, "int4")]
)
def test_a_tied_head_reads_the_packed_table_on_a_kernel(bits: int, kernel: str) -> None:
    emb = nn.Embedding(96, 64)
    with torch.no_grad():
        emb.weight.copy_(torch.randn(96, 64, generator=torch.Generator().manual_seed(bits)))
    table = PackedEmbedding.from_embedding(emb, bits)
    head = TiedHead(table)
    x = _inputs(64, 2, 3)
    assert head.kernel == kernel and head.realized == BOTH and kernel in head.compute_path
    with torch.no_grad():
        got = head(x)
    want = F.linear(x, table.dense_weight())
    assert got.shape == (2, 3, 96) and _relative_error(got, want) < TOLERANCE


def test_a_tied_head_keeps_no_dense_table() -> None:
    emb = nn.Embedding(96, 64)
    table = PackedEmbedding.from_embedding(emb, 4)
    with torch.no_grad():
        TiedHead(table)(_inputs(64, 4))
    assert "dense" not in table._cache


def test_plans_say_which_low_bit_layers_run_on_a_kernel() -> None:
    assert LayerSettings(bits=4).realized() == {"bits4": BOTH}
    assert LayerSettings(bits=3, group=128).realized() == {"bits3": BOTH}
    assert LayerSettings(bits=4, sparsity=0.5).realized() == {"sparsity": SIZE, "bits4": SIZE}
    assert LayerSettings(bits=8, sparsity=0.5).realized()["bits8"] == BOTH
