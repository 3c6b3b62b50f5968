"""GPTQ, AWQ, weight-only int8, 3 bits, group sizes, Wanda, SparseGPT, n:m patterns and
whitened low-rank: each against the simpler method it improves on, on one Linear whose inputs
are correlated (as real activations are), plus their plans, spaces and sensitivity."""

from __future__ import annotations

import json

import pytest
import torch
from torch import Tensor, nn

from slimsearch.search.sensitivity import Option, Profile, allowed_options, option_cost
from slimsearch.spaces import (
    CompressionPlan,
    LayerSettings,
    SearchSpace,
    StructuredSettings,
    apply_plan,
    serialized_size,
)
from slimsearch.spaces import space_config_from_mapping as space_config
from slimsearch.spaces.apply import compress_linear
from slimsearch.spaces.methods import DroppedBlock, PackedLinear, registry
from slimsearch.spaces.methods.calibration import LayerStats
from slimsearch.spaces.methods.gptq import gptq_codes
from slimsearch.spaces.methods.quantize import (
    Grid,
    group_size_for,
    pack_codes,
    quantize_groups,
    quantize_rows,
    unpack_codes,
    whole_zeros,
)
from tiny import tiny_bert, tiny_llama


@pytest.fixture(scope="module")
def layer() -> tuple[nn.Linear, Tensor, LayerStats]:
    gen = torch.Generator().manual_seed(0)
    linear = nn.Linear(256, 48)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(48, 256, generator=gen) * 0.05)
    # Inputs on a low-dimensional subspace plus noise, with a few loud columns.
    x = torch.randn(3000, 24, generator=gen) @ torch.randn(24, 256, generator=gen)
    x = x + 0.1 * torch.randn(3000, 256, generator=gen)
    x[:, :8] *= 8.0
    return linear, x, LayerStats((x * x).sum(0), x.T @ x, x.shape[0])


def error(module: nn.Module, linear: nn.Linear, x: Tensor) -> float:
    with torch.no_grad():
        return float(((module(x) - linear(x)) ** 2).mean())


def stored(linear: nn.Linear, stats: LayerStats, **settings: object) -> nn.Module:
    return compress_linear(linear, LayerSettings(**settings), stats)


# -- grids, packing, groups -------------------------------------------------------------------
@pytest.mark.parametrize("bits", [2, 3, 4])
def test_codes_pack_and_unpack_exactly(bits: int) -> None:
    codes = torch.randint(0, 2**bits, (1001,), generator=torch.Generator().manual_seed(bits)).to(torch.uint8)
    packed = pack_codes(codes, bits)
    assert packed.numel() == -(-1001 * bits // 8)
    assert torch.equal(unpack_codes(packed, bits, 1001), codes)


def test_grid_rounding_is_the_stored_round_to_nearest() -> None:
    w = torch.randn(16, 100, generator=torch.Generator().manual_seed(1))
    for group in (32, 64, 128):
        codes, scale, offset = Grid.for_layer(4, 100, group).round(w)
        reference = quantize_groups(w, 4, None, group)
        assert torch.equal(codes.to(torch.uint8), reference[0])
        assert torch.equal(scale, reference[1].float()) and offset is not None
    codes, scale, _ = Grid.for_layer(8, 100).round(w)
    assert torch.equal(codes.to(torch.int8), quantize_rows(w)[0])


def test_group_size_trades_bytes_for_error(layer: tuple[nn.Linear, Tensor, LayerStats]) -> None:
    linear, x, stats = layer
    sizes, errors = [], []
    for group in (32, 64, 128):
        module = stored(linear, stats, bits=4, group=group)
        assert isinstance(module, PackedLinear) and module.group == group
        sizes.append(serialized_size(module, CompressionPlan()))
        errors.append(error(module, linear, x))
    assert sizes[0] > sizes[1] > sizes[2]  # one fp16 scale and offset per group, counted
    assert errors[0] < errors[2]


def test_three_bits_sit_between_two_and_four(layer: tuple[nn.Linear, Tensor, LayerStats]) -> None:
    linear, x, stats = layer
    by_bits = {b: stored(linear, stats, bits=b) for b in (2, 3, 4)}
    sizes = {b: serialized_size(m, CompressionPlan()) for b, m in by_bits.items()}
    errors = {b: error(m, linear, x) for b, m in by_bits.items()}
    assert sizes[2] < sizes[3] < sizes[4]
    assert errors[4] < errors[3] < errors[2]


def test_weight_only_int8_keeps_activations_in_float(layer: tuple[nn.Linear, Tensor, LayerStats]) -> None:
    linear, x, stats = layer
    dynamic, weight_only = stored(linear, stats, bits=8), stored(linear, stats, bits=8, weight_only=True)
    assert isinstance(weight_only, PackedLinear) and not weight_only.int8_kernel
    assert weight_only.kernel == "int8-weight-only" and weight_only.realized == "speed+size"
    assert serialized_size(weight_only, CompressionPlan()) == serialized_size(dynamic, CompressionPlan())
    assert error(weight_only, linear, x) < error(dynamic, linear, x)
    assert LayerSettings(bits=8, weight_only=True).realized() == {"bits8-weight-only": "speed+size"}


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("extra", [{}, {"sparsity": 0.5}, {"gptq": True}], ids=["rtn", "sparse", "gptq"])
def test_integer_zero_grids_store_whole_zero_points(
    layer: tuple[nn.Linear, Tensor, LayerStats], bits: int, extra: dict[str, object]
) -> None:
    linear, x, stats = layer
    plain = stored(linear, stats, bits=bits, **extra)
    whole = stored(linear, stats, bits=bits, integer_zero=True, **extra)
    assert isinstance(whole, PackedLinear) and isinstance(plain, PackedLinear)
    assert whole.integer_zero and not plain.integer_zero
    assert registry.get("bits").stored_options(whole).get("integer_zero") is True
    zero = whole_zeros(whole.offset, whole.scale, 2**bits - 1)
    assert zero is not None and int(zero.max()) <= 2**bits - 1
    # The stored offsets are exactly -zero * scale: (code - zero) * scale is the same weight.
    codes = whole._dense_stored().float()
    group = group_size_for(linear.in_features, whole.group)
    scale = whole.scale.float().repeat_interleave(group, dim=1)[:, : linear.in_features]
    zeros = zero.float().repeat_interleave(group, dim=1)[:, : linear.in_features]
    dense = (codes - zeros) * scale
    if whole.sparse:
        dense = dense * (whole.dense_weight() != 0)
    assert torch.equal(dense, whole.dense_weight())
    assert serialized_size(whole, CompressionPlan()) == serialized_size(plain, CompressionPlan())
    # A looser fit, not a different one.
    assert error(whole, linear, x) < 1.5 * error(plain, linear, x)


def test_integer_zero_keeps_groups_of_one_value() -> None:
    w = torch.randn(4, 128, generator=torch.Generator().manual_seed(4))
    w[0, :64], w[1, 64:], w[2, :64] = 0.3, -0.7, 0.0
    codes, scale, offset = quantize_groups(w, 4, None, 64, integer_zero=True)
    assert whole_zeros(offset, scale, 15) is not None
    back = codes.float() * scale.float().repeat_interleave(64, 1) + offset.float().repeat_interleave(64, 1)
    assert torch.allclose(back[0, :64], torch.tensor(0.3), rtol=1e-3)
    assert torch.allclose(back[1, 64:], torch.tensor(-0.7), rtol=1e-3)
    assert torch.equal(back[2, :64], torch.zeros(64))


def test_integer_zero_fake_quantization_is_the_stored_weight(
    layer: tuple[nn.Linear, Tensor, LayerStats],
) -> None:
    linear, _, stats = layer
    module = stored(linear, stats, bits=4, integer_zero=True)
    assert isinstance(module, PackedLinear)
    fake = registry.get("bits").fake_quantize(linear.weight, 4, None, {"integer_zero": True})  # type: ignore[attr-defined]
    assert torch.equal(fake, module.dense_weight())


# -- GPTQ and AWQ ------------------------------------------------------------------------------
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_gptq_beats_round_to_nearest_on_correlated_inputs(
    layer: tuple[nn.Linear, Tensor, LayerStats], bits: int
) -> None:
    linear, x, stats = layer
    host = {"bits": bits, "weight_only": bits == 8}  # W8A8's error is its activations'
    rtn, gptq = stored(linear, stats, **host), stored(linear, stats, **host, gptq=True)
    assert serialized_size(gptq, CompressionPlan()) == serialized_size(rtn, CompressionPlan())
    assert error(gptq, linear, x) < 0.7 * error(rtn, linear, x)
    assert isinstance(gptq, PackedLinear) and gptq.made_by == ("gptq", "bits")
    assert gptq.bits == bits and rtn.bits == bits  # type: ignore[union-attr]


def test_gptq_on_an_identity_hessian_is_round_to_nearest() -> None:
    # Uncorrelated inputs leave no error to feed forward: the codes are the rounded ones.
    w = torch.randn(8, 128, generator=torch.Generator().manual_seed(2))
    for grid in (Grid.for_layer(4, 128, 64), Grid.for_layer(8, 128)):
        codes, scale, _ = gptq_codes(w, torch.eye(128), grid, act_order=False)
        assert torch.equal(codes, grid.round(w)[0]) and torch.equal(scale, grid.round(w)[1])


def test_a_weighted_group_fit_serves_the_heavy_columns() -> None:
    gen = torch.Generator().manual_seed(3)
    w = torch.randn(16, 128, generator=gen)
    importance = torch.ones(128)  # a few outlier columns carry most of the input's energy
    importance[torch.randperm(128, generator=gen)[:8]] = 1000.0

    def weighted_error(codes: Tensor, scale: Tensor, offset: Tensor) -> float:
        q = codes.float().view(16, 2, 64) * scale.float()[..., None] + offset.float()[..., None]
        return float(((w - q.view(16, 128)) ** 2 * importance).sum())

    for bits in (2, 3, 4):
        plain = quantize_groups(w, bits, group=64)
        weighted = quantize_groups(w, bits, group=64, importance=importance)
        assert weighted_error(*weighted) < 0.8 * weighted_error(*plain), bits
    # Uniform importance is the plain fit.
    same = quantize_groups(w, 3, group=64, importance=torch.full((128,), 7.0))
    assert all(torch.equal(a, b) for a, b in zip(same, quantize_groups(w, 3, group=64), strict=True))


def test_gptq_weighted_spelling_leaves_earlier_values_alone() -> None:
    assert LayerSettings(gptq="act_order=0,damp=0.05").gptq == "act_order=0,damp=0.05"
    assert LayerSettings(gptq="weighted=0").gptq is True
    assert LayerSettings(gptq="weighted=1").gptq == "act_order=1,damp=0.01,weighted=1"
    assert LayerSettings(bits=4, gptq="weighted=1").short() == "4b+gptq[weighted=1]"
    assert LayerSettings(bits=4, gptq=True).short() == "4b+gptq"


def test_gptq_keeps_pruned_entries_at_zero(layer: tuple[nn.Linear, Tensor, LayerStats]) -> None:
    linear, x, stats = layer
    module = stored(linear, stats, sparsity=0.5, bits=4, gptq=True)
    assert isinstance(module, PackedLinear) and module.sparse
    assert float((module.dense_weight() == 0).float().mean()) >= 0.5
    assert error(module, linear, x) < error(stored(linear, stats, sparsity=0.5, bits=4), linear, x)


@pytest.mark.parametrize("value", ["act_order=0", "damp=0.1", "act_order=0,damp=0.05", "weighted=1"])
def test_gptq_settings(layer: tuple[nn.Linear, Tensor, LayerStats], value: str) -> None:
    linear, x, stats = layer
    module = stored(linear, stats, bits=3, gptq=value)
    assert error(module, linear, x) < error(stored(linear, stats, bits=3), linear, x)
    assert LayerSettings(gptq="damp=0.01,act_order=1").gptq is True  # the defaults, spelled out


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("fast", "key=value"),
        ("damp=2", "damp is a fraction"),
        ("act_order=3", "act_order is 0 or 1"),
        ("weighted=0.5", "weighted is 0 or 1"),
        (1, "use true"),
    ],
)
def test_gptq_refuses_bad_settings(value: object, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        LayerSettings(gptq=value)


def test_awq_scales_columns_and_never_does_worse(layer: tuple[nn.Linear, Tensor, LayerStats]) -> None:
    linear, x, stats = layer
    for bits in (2, 3, 4):
        awq, rtn = stored(linear, stats, bits=bits, awq=True), stored(linear, stats, bits=bits)
        assert isinstance(awq, PackedLinear) and awq.column_scale() is not None
        # One fp16 scale per input column, counted in the bytes.
        extra = serialized_size(awq, CompressionPlan()) - serialized_size(rtn, CompressionPlan())
        assert extra >= 2 * linear.in_features
        assert error(awq, linear, x) <= error(rtn, linear, x) * (1 + 1e-4)
    both = stored(linear, stats, bits=3, awq=True, gptq=True)
    assert error(both, linear, x) < error(stored(linear, stats, bits=3, awq=True), linear, x)


def test_options_alone_change_nothing(layer: tuple[nn.Linear, Tensor, LayerStats]) -> None:
    linear, _, stats = layer
    assert stored(linear, stats, gptq=True, awq=True, group=32) is linear
    assert stored(linear, stats, bits=16, gptq=True).made_by == ("bits",)  # type: ignore[union-attr]


def test_two_rounding_options_are_refused(layer: tuple[nn.Linear, Tensor, LayerStats]) -> None:
    class Other(registry.Method):
        name = "other_rounding"
        stage = "quantize"
        option_of = "quantize"
        rounds = True
        scopes = frozenset({"linear"})
        off = False

    registry.register(Other)
    try:
        linear, _, stats = layer
        with pytest.raises(ValueError, match="a layer takes one of them"):
            stored(linear, stats, bits=4, gptq=True, other_rounding=True)
    finally:
        registry.unregister("other_rounding")


# -- pruning -----------------------------------------------------------------------------------
def test_wanda_and_sparsegpt_beat_magnitude(layer: tuple[nn.Linear, Tensor, LayerStats]) -> None:
    linear, x, stats = layer
    magnitude = error(stored(linear, stats, sparsity=0.5), linear, x)
    assert error(stored(linear, stats, wanda=0.5), linear, x) < magnitude
    assert error(stored(linear, stats, sparsegpt=0.5), linear, x) < 0.5 * magnitude


@pytest.mark.parametrize("knob", ["wanda", "sparsegpt"])
def test_pruning_amounts_are_exact(layer: tuple[nn.Linear, Tensor, LayerStats], knob: str) -> None:
    linear, _, stats = layer
    half = stored(linear, stats, **{knob: 0.5})
    assert isinstance(half, PackedLinear) and half.kept_count() == half.numel // 2
    pattern = stored(linear, stats, **{knob: "2:4"})
    assert isinstance(pattern, PackedLinear)
    kept = pattern.dense_weight() != 0
    assert torch.equal(kept.view(48, -1, 4).sum(-1), torch.full((48, 64), 2))


def test_pruning_values_are_checked() -> None:
    for bad in ("2:2", "4", 1.5, True):
        with pytest.raises(ValueError, match="wanda="):
            LayerSettings(wanda=bad)
    assert LayerSettings(sparsegpt="2:4").short() == "sgpt2:4"


def test_whitened_low_rank_serves_the_outputs(layer: tuple[nn.Linear, Tensor, LayerStats]) -> None:
    linear, x, stats = layer
    plain, white = stored(linear, stats, rank=16), stored(linear, stats, rank=16, whiten=True)
    assert serialized_size(plain, CompressionPlan()) == serialized_size(white, CompressionPlan())
    assert error(white, linear, x) < 0.5 * error(plain, linear, x)


# -- plans, spaces and seeds -------------------------------------------------------------------
def test_study_file_values_for_the_new_knobs() -> None:
    config = space_config(
        {"default": {"bits": [16, 4, 3, 2], "gptq": [False, True], "group": [64, 128], "wanda": [0.0, "2:4"]}}
    )
    space = SearchSpace(tiny_llama(), config)
    knobs = {k.knob for k in space.knobs}
    assert {"gptq", "group", "wanda"} <= knobs
    seeds = space.uniform_params()
    # Each option comes with each width of its host it acts on, never alone (GPTQ chooses
    # codes on a grid, which bf16 has not; groups are of 4, 3 and 2 bits).
    layer = next(k.layer for k in space.knobs if k.knob == "gptq")
    with_gptq = [s for s in seeds if s.get(f"{layer}:gptq") is True]
    assert {s[f"{layer}:bits"] for s in with_gptq} == {4, 3, 2}
    with_group = [s for s in seeds if s.get(f"{layer}:group") == 128]
    assert {s[f"{layer}:bits"] for s in with_group} == {4, 3, 2}
    with pytest.raises(ValueError, match="group"):
        space_config({"default": {"group": [48]}})


def test_uniform_seeds_pair_options_only_with_the_widths_they_act_on() -> None:
    config = space_config({"default": {"bits": [16, 8, 4], "weight_only": [False, True], "group": [64, 128]}})
    space = SearchSpace(tiny_llama(), config)
    seeds = space.uniform_params()
    layer = next(k.layer for k in space.knobs if k.knob == "weight_only")
    assert {s[f"{layer}:bits"] for s in seeds if s.get(f"{layer}:weight_only") is True} == {8}
    assert {s[f"{layer}:bits"] for s in seeds if s.get(f"{layer}:group") == 128} == {4}
    plans = [json.dumps(s, sort_keys=True) for s in seeds]
    assert len(plans) == len(set(plans))


def test_an_option_that_does_nothing_at_the_chosen_width_leaves_the_plan_as_without_it() -> None:
    config = space_config(
        {"default": {"bits": [32, 8, 4], "weight_only": [False, True], "integer_zero": [False, True]}}
    )
    space = SearchSpace(tiny_llama(), config)
    layer = next(k.layer for k in space.knobs if k.knob == "weight_only")

    def plan(**values: object) -> str:
        params = {f"{layer}:{name}": value for name, value in values.items()}
        return space.decode(params).to_json()

    # weight_only acts at 8 bits only, integer_zero at 4: elsewhere they are the same model.
    assert plan(bits=4, weight_only=True) == plan(bits=4, weight_only=False)
    assert plan(bits=8, integer_zero=True) == plan(bits=8)
    assert plan(bits=32, weight_only=True, integer_zero=True) == plan(bits=32)
    assert plan(bits=8, weight_only=True) != plan(bits=8)
    assert plan(bits=4, integer_zero=True) != plan(bits=4)


def test_uniform_seeds_put_every_option_of_a_host_width_together() -> None:
    config = space_config(
        {"default": {"bits": [4, 3, 8], "gptq": [True], "awq": [False, True], "group": [64, 128, 32]}}
    )
    space = SearchSpace(tiny_llama(), config)
    seeds = space.uniform_params()
    layer = next(k.layer for k in space.knobs if k.knob == "awq")

    def settings(seed: dict[str, object]) -> tuple[object, ...]:
        return tuple(seed[f"{layer}:{knob}"] for knob in ("bits", "awq", "group"))

    found = [settings(s) for s in seeds]
    # AWQ and each non-default group together at each width both act on (not at 8 bits,
    # where groups do nothing), and never a seed twice.
    for bits in (4, 3):
        for group in (32, 128):
            assert (bits, True, group) in found, (bits, group)
    assert not any(bits == 8 and group != 64 for bits, _, group in found)
    assert len(found) == len(set(found))
    # One option alone: no combined seeds beyond the single-option ones.
    alone = SearchSpace(tiny_llama(), space_config({"default": {"bits": [4, 3], "awq": [False, True]}}))
    assert len(alone.uniform_params()) == 4


def test_a_plan_with_the_new_methods_round_trips_through_json() -> None:
    plan = CompressionPlan(
        layers={"re:.*": LayerSettings(sparsegpt="2:4", bits=3, group=32, awq=True, gptq="act_order=0")}
    )
    assert CompressionPlan.from_json(plan.to_json()) == plan
    model = apply_plan(
        tiny_llama(), CompressionPlan(layers={"re:.*layers.*": LayerSettings(bits=3, gptq=True)})
    )
    assert all(m.bits == 3 for m in model.modules() if isinstance(m, PackedLinear))


def test_option_cost_counts_what_an_option_repairs_at_its_host_value() -> None:
    profile = Profile(
        key="k",
        metric="nll",
        rows=1,
        baseline_loss=1.0,
        loss={
            "l:bits": [(4, 0.1), (2, 2.0)],
            "l:gptq|l:bits=4": [(True, -0.05)],
            "l:gptq|l:bits=2": [(True, -1.5)],
        },
        options={},
    )
    off = {"l:bits": 32, "l:gptq": False}
    assert option_cost(profile, Option({"l:bits": 2, "l:gptq": True}, 1), off) == pytest.approx(0.5)
    assert option_cost(profile, Option({"l:bits": 4, "l:gptq": True}, 1), off) == pytest.approx(0.05)
    assert option_cost(profile, Option({"l:bits": 2, "l:gptq": False}, 1), off) == pytest.approx(2.0)


def test_low_bit_seeds_may_use_quantize_options() -> None:
    model = tiny_llama()
    space = SearchSpace(
        model,
        space_config(
            {"layers": "re:.*layers.0.mlp.up_proj", "default": {"bits": [32, 4, 2], "gptq": [False, True]}}
        ),
    )
    unit = space.knobs[0].layer
    combos = [
        Option({f"{unit}:bits": b, f"{unit}:gptq": g}, 100 // (1 + (b < 32) * (8 - b // 4)))
        for b in (32, 4, 2)
        for g in (False, True)
    ]
    profile = Profile("k", "nll", 1, 1.0, {}, {unit: combos})
    low = allowed_options(space, profile, "low-bit")[unit]
    assert {(o.params[f"{unit}:bits"], o.params[f"{unit}:gptq"]) for o in low} == {
        (4, False),
        (4, True),
        (2, False),
        (2, True),
    }


# -- depth pruning -----------------------------------------------------------------------------
@pytest.mark.parametrize("make", [tiny_llama, tiny_bert])
def test_dropping_blocks_removes_their_weights_and_compute(make: object) -> None:
    model = make()  # type: ignore[operator]
    space = SearchSpace(
        model, space_config({"default": {"bits": [32, 4]}, "structured": {"drop": [False, True]}})
    )
    drops = [k for k in space.knobs if k.knob == "drop"]
    assert len(drops) == 2
    params = {space.param_name(drops[1]): True}
    plan = space.decode(params)
    compressed = apply_plan(make(), plan)  # type: ignore[operator]
    assert isinstance(compressed.get_submodule(drops[1].layer), DroppedBlock)
    assert serialized_size(compressed, plan) < serialized_size(model, CompressionPlan())
    ids = torch.randint(3, 96, (2, 8), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = compressed(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
    assert torch.isfinite(out).all()
    assert plan.realized()["drop"] == "speed+size"


def test_dropping_a_block_of_a_compressed_model_is_refused() -> None:
    model = apply_plan(tiny_llama(), CompressionPlan(layers={"re:.*layers.*": LayerSettings(bits=4)}))
    with pytest.raises(ValueError, match="apply one plan to the baseline"):
        apply_plan(model, CompressionPlan(structured={"model.layers.1": StructuredSettings(drop=True)}))
