"""The search space, the plan format and each compression method's effect, on tiny models."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from torch import nn

from slimsearch.spaces import (
    CompressionPlan,
    LayerSettings,
    SearchSpace,
    StructuredSettings,
    apply_plan,
    serialized_size,
    space_config_from_mapping,
    structured_blocks,
)
from slimsearch.spaces.methods import LowRankLinear, PackedEmbedding, max_useful_rank
from slimsearch.spaces.methods.quantize import dequantize_groups, group_size_for, quantize_groups
from slimsearch.spaces.methods.structured import find_units, kept_indices, prune_structured, removed_groups
from tiny import packed_linear, tiny_bert, tiny_llama


def batch() -> dict[str, torch.Tensor]:
    ids = torch.randint(3, 96, (4, 10), generator=torch.Generator().manual_seed(0))
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def logits(model: nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        out: torch.Tensor = model.eval()(**inputs).logits
    return out


# --- space and plan format -------------------------------------------------------------

STRUCTURED_SPACE = {
    "default": {"bits": [32, 8], "rank": [1.0, 0.5]},
    "structured": {"heads": [0.0, 0.5], "neurons": [0.0, 0.25, 0.5]},
    "embeddings": [32, 2],
}


def test_space_exposes_structured_knobs_per_block() -> None:
    model = tiny_llama()
    space = SearchSpace(model, space_config_from_mapping(STRUCTURED_SPACE))
    dists = space.distributions()
    for block in ("model.layers.0", "model.layers.1"):
        assert list(dists[f"{block}:heads"].choices) == [0.0, 0.5]  # type: ignore[attr-defined]
        assert list(dists[f"{block}:neurons"].choices) == [0.0, 0.25, 0.5]  # type: ignore[attr-defined]
    assert list(dists["model.embed_tokens:bits"].choices) == [32, 2]  # type: ignore[attr-defined]


def test_decode_gives_structured_settings_and_ranks_of_pruned_shapes() -> None:
    model = tiny_bert()
    space = SearchSpace(model, space_config_from_mapping(STRUCTURED_SPACE))
    params = {name: dist.choices[-1] for name, dist in space.distributions().items()}  # type: ignore[attr-defined]
    plan = space.decode(params)
    assert plan.structured["bert.encoder.layer.0"] == StructuredSettings(heads=0.5, neurons=0.5)
    # query: 32 -> 16 outputs after half the heads go; rank limit 32*16/48 -> 10, half of it 5.
    assert plan.layers["bert.encoder.layer.0.attention.self.query"].rank == 5
    assert plan.layers["bert.encoder.layer.0.intermediate.dense"].rank == int(0.5 * max_useful_rank(32, 32))
    compressed = apply_plan(copy.deepcopy(model), plan, batch())  # every decoded rank is valid
    assert logits(compressed, batch()).shape == (4, 2)


def test_uniform_seeds_include_each_structured_value() -> None:
    space = SearchSpace(tiny_llama(), space_config_from_mapping(STRUCTURED_SPACE))
    seeds = space.uniform_params()
    assert all(v in (0.0, 32, 1.0) for v in seeds[0].values())
    assert any(all(s[f"model.layers.{i}:neurons"] == 0.25 for i in (0, 1)) for s in seeds)


def test_uniform_seeds_cross_linear_widths_with_table_widths() -> None:
    config = space_config_from_mapping({"default": {"bits": [32, 8, 4]}, "embeddings": [32, 8]})
    space = SearchSpace(tiny_bert(), config)
    seeds = space.uniform_params()
    emb = next(n for n in space.distributions() if "embeddings" in n)
    linear = [n for n in space.distributions() if n != emb]
    for bits in (32, 8, 4):
        for width in (32, 8):
            assert any(s[emb] == width and all(s[n] == bits for n in linear) for s in seeds), (bits, width)
    assert len(seeds) == 6 and seeds[0] == dict.fromkeys(seeds[0], 32)  # all off first, none twice


def test_uniform_seeds_cross_structured_pairs_with_linear_widths() -> None:
    space = SearchSpace(tiny_bert(), space_config_from_mapping(STRUCTURED_SPACE))
    seeds = space.uniform_params()
    blocks = ("bert.encoder.layer.0", "bert.encoder.layer.1")
    linear = [n for n in space.distributions() if n.endswith(":bits") and "embeddings" not in n]
    for bits in (32, 8):
        for heads in (0.0, 0.5):
            for neurons in (0.0, 0.25, 0.5):
                if not heads and not neurons:
                    continue
                assert any(
                    all(s[f"{b}:heads"] == heads and s[f"{b}:neurons"] == neurons for b in blocks)
                    and all(s[n] == bits for n in linear)
                    and all(s[n] == 1.0 for n in s if n.endswith(":rank"))
                    for s in seeds
                ), (bits, heads, neurons)
    assert len({json.dumps(s, sort_keys=True) for s in seeds}) == len(seeds)


def test_space_without_structured_section_keeps_its_knobs() -> None:
    space = SearchSpace(tiny_bert(), space_config_from_mapping({"default": {"bits": [32, 8]}}))
    assert not any(k.knob in ("heads", "neurons") for k in space.knobs)


@pytest.mark.parametrize(
    ("section", "words"),
    [
        ({"structured": {"heads": [0.0, 1.0]}}, ["space.structured.heads", "1.0", "[0, 1)"]),
        ({"structured": {"heads": [0.0, 0.0]}}, ["space.structured.heads", "repeat"]),
        ({"structured": {"layers": "x"}}, ["space.structured", "layers", "blocks"]),
        ({"structured": {"blocks": "re:("}}, ["space.structured.blocks", "re:("]),
        ({"default": {"heads": [0.5]}}, ["space.default", "heads", "space.structured"]),
        ({"embeddings": [32, 3]}, ["space.embeddings", "3", "2"]),
        ({"default": {"bits": [32, 1]}}, ["space.default.bits", "1", "2"]),
    ],
)
def test_space_config_errors_name_field_value_and_choices(
    section: dict[str, object], words: list[str]
) -> None:
    with pytest.raises(ValueError) as info:
        space_config_from_mapping(section)
    for word in words:
        assert word in str(info.value)


def test_structured_blocks_pattern_matching_nothing_is_an_error() -> None:
    config = space_config_from_mapping({"structured": {"heads": [0.0, 0.5], "blocks": "re:nothing"}})
    with pytest.raises(ValueError, match="match no block"):
        SearchSpace(tiny_bert(), config)


def test_plan_json_round_trip_and_version_1_without_structured() -> None:
    plan = CompressionPlan(
        layers={"re:.*query": LayerSettings(bits=2, sparsity=0.25, rank=3)},
        structured={"bert.encoder.layer.1": StructuredSettings(heads=0.25, neurons=0.5)},
    )
    assert CompressionPlan.from_json(plan.to_json()) == plan
    legacy = json.dumps(
        {"version": 1, "layers": {"a.b": {"sparsity": 0.0, "bits": 8, "rank": None}}, "distill": None}
    )
    old = CompressionPlan.from_json(legacy)
    assert old.structured == {} and old.layers["a.b"].bits == 8
    assert "structured" not in json.loads(old.to_json())  # plans without it stay readable by old code


def test_plan_reports_what_it_realizes() -> None:
    plan = CompressionPlan(
        layers={"x": LayerSettings(bits=4, sparsity=0.5), "y": LayerSettings(bits=8)},
        structured={"b": StructuredSettings(heads=0.5)},
    )
    assert plan.realized() == {
        "bits4": "size",
        "bits8": "speed+size",
        "heads": "speed+size",
        "sparsity": "size",
    }


@pytest.mark.parametrize("bad", [{"heads": 1.0}, {"neurons": -0.1}, {"heads": True}])
def test_structured_settings_validate(bad: dict[str, float]) -> None:
    with pytest.raises(ValueError, match="structured"):
        StructuredSettings(**bad)


def test_all_off_plan_is_identity_on_both_models() -> None:
    for make in (tiny_bert, tiny_llama):
        model = make()
        plan = CompressionPlan(layers={"re:.*": LayerSettings()}, structured={"re:.*": StructuredSettings()})
        before = {k: v.clone() for k, v in model.state_dict().items()}
        apply_plan(model, plan, batch())
        after = model.state_dict()
        assert before.keys() == after.keys()
        assert all(torch.equal(before[k], after[k]) for k in before)


# --- structured pruning -------------------------------------------------------------------


def test_structured_pruning_shrinks_shapes_and_head_counts() -> None:
    bert = apply_plan(
        tiny_bert(), CompressionPlan(structured={"re:.*": StructuredSettings(0.5, 0.5)}), batch()
    )
    attn = bert.bert.encoder.layer[0].attention
    assert attn.self.query.out_features == 16 and attn.output.dense.in_features == 16
    assert attn.self.num_attention_heads == 2 and attn.self.all_head_size == 16
    assert bert.bert.encoder.layer[0].intermediate.dense.out_features == 32

    llama = apply_plan(
        tiny_llama(), CompressionPlan(structured={"re:.*": StructuredSettings(0.5, 0.5)}), batch()
    )
    attn = llama.model.layers[0].self_attn
    # 4 query heads over 2 key/value heads: one whole group (2 query + 1 kv head) goes.
    assert (attn.q_proj.out_features, attn.k_proj.out_features, attn.v_proj.out_features) == (16, 8, 8)
    assert attn.o_proj.in_features == 16 and attn.num_key_value_groups == 2
    assert llama.model.layers[0].mlp.down_proj.in_features == 32
    assert logits(llama, batch()).shape == (4, 10, 96)


@pytest.mark.parametrize("make", [tiny_bert, tiny_llama])
def test_pruned_model_equals_original_with_removed_groups_zeroed(make: type[nn.Module]) -> None:
    """Removing a group computes exactly what the original does with that group's consumer
    columns zeroed: the Linears were shrunk consistently, heads stayed aligned."""
    model = make()
    reference = copy.deepcopy(model)
    units = find_units(model)
    fractions = {(u.block, u.kind): 0.5 for u in units}
    kept = prune_structured(model, fractions, batch())
    for unit in units:
        name, cols = unit.consumer
        weight = reference.get_submodule(name).weight
        drop = sorted(set(range(unit.groups)) - set(kept_indices(kept[f"{unit.owner}:{unit.kind}"])))
        with torch.no_grad():
            for g in drop:
                weight[:, g * cols : (g + 1) * cols] = 0
    torch.testing.assert_close(logits(model, batch()), logits(reference, batch()), atol=1e-5, rtol=1e-5)


def test_calibration_importance_uses_activations_not_only_weights() -> None:
    """Neurons whose gate rows are zero never fire (silu(0) = 0): with a calibration batch
    they are the ones removed, however large their other weights; weights alone keep them."""
    model = tiny_llama()
    unit = next(u for u in find_units(model) if u.kind == "neurons")
    dead = list(range(0, unit.groups, 2))
    mlp = model.get_submodule(unit.owner)
    with torch.no_grad():
        mlp.gate_proj.weight[dead] = 0.0
        mlp.up_proj.weight[dead] *= 10.0
        mlp.down_proj.weight[:, dead] *= 10.0
    fractions = {(unit.block, "neurons"): 0.5}
    calibrated = kept_indices(
        prune_structured(copy.deepcopy(model), fractions, batch())[f"{unit.owner}:neurons"]
    )
    magnitude = kept_indices(prune_structured(copy.deepcopy(model), fractions, None)[f"{unit.owner}:neurons"])
    assert set(calibrated).isdisjoint(dead)
    assert set(magnitude) == set(dead)


def test_removed_groups_rounds_and_never_removes_all() -> None:
    assert [removed_groups(f, 4) for f in (0.0, 0.1, 0.125, 0.5, 0.99)] == [0, 0, 1, 2, 3]
    assert removed_groups(0.9, 1) == 0


def test_structured_names_must_exist_and_run_first() -> None:
    with pytest.raises(ValueError, match="blocks the model does not have"):
        apply_plan(tiny_bert(), CompressionPlan(structured={"bert.encoder.layer.9": StructuredSettings(0.5)}))
    model = apply_plan(tiny_llama(), CompressionPlan(layers={"re:.*q_proj": LayerSettings(bits=8)}))
    with pytest.raises(ValueError, match=r"structured pruning runs first.*q_proj"):
        apply_plan(model, CompressionPlan(structured={"re:.*": StructuredSettings(heads=0.5)}))
    assert structured_blocks(tiny_bert()) == ["bert.encoder.layer.0", "bert.encoder.layer.1"]


# --- quantization, sparsity, low rank ----------------------------------------------------


def _min_max_error(weight: torch.Tensor, bits: int) -> float:
    """Squared error of plain min-max rounding over groups of 64 (the refinement's start)."""
    groups = torch.nn.functional.pad(weight, (0, (-weight.shape[1]) % 64)).view(weight.shape[0], -1, 64)
    real = torch.nn.functional.pad(torch.ones_like(weight), (0, (-weight.shape[1]) % 64)).view_as(groups) > 0
    low = torch.where(real, groups, torch.inf).amin(2, keepdim=True)
    high = torch.where(real, groups, -torch.inf).amax(2, keepdim=True)
    step = (high - low) / (2**bits - 1)
    rounded = torch.round((groups - low) / step) * step + low
    return float(((rounded - groups) ** 2)[real].sum())


@pytest.mark.parametrize("bits", [4, 2])
def test_groupwise_codes_fit_better_than_min_max_and_pack_densely(bits: int) -> None:
    weight = torch.randn(8, 100, generator=torch.Generator().manual_seed(0))
    codes, scale, offset = quantize_groups(weight, bits)
    assert group_size_for(100) == 64 and scale.shape == offset.shape == (8, 2)
    assert int(codes.max()) <= 2**bits - 1
    restored = dequantize_groups(codes, scale, offset)
    error = float(((restored - weight) ** 2).sum())
    # Least squares beats min-max clearly at 2 bits (it gives up outliers for the bulk).
    assert error < (0.95 if bits == 4 else 0.8) * _min_max_error(weight, bits)
    # Inside the grid's range every weight is on its nearest level.
    step = scale.float().repeat_interleave(64, dim=1)[:, :100]
    low = offset.float().repeat_interleave(64, dim=1)[:, :100]
    inside = (weight >= low) & (weight <= low + step * (2**bits - 1))
    assert bool(((restored - weight).abs() <= step / 2 + 1e-3)[inside].all())
    packed = packed_linear(nn.Linear(100, 8), bits)
    assert packed.values.numel() == 800 * bits // 8
    assert packed.values.dtype == torch.uint8


def test_groupwise_fit_ignores_pruned_entries_and_keeps_constant_groups_exact() -> None:
    weight = torch.randn(4, 64, generator=torch.Generator().manual_seed(1))
    keep = torch.ones_like(weight, dtype=torch.bool)
    keep[:, :8] = False
    spiked = weight.clone()
    spiked[:, :8] = 100.0  # pruned: must not stretch the grid
    with_keep = quantize_groups(spiked, 2, keep)
    reference = quantize_groups(weight[:, 8:], 2)
    assert torch.equal(with_keep[1], reference[1]) and torch.equal(with_keep[2], reference[2])
    assert torch.equal(with_keep[0][:, 8:], reference[0])
    constant = torch.full((2, 64), 0.25)
    codes, scale, offset = quantize_groups(constant, 2)
    assert torch.equal(dequantize_groups(codes, scale, offset), constant)


def test_bits_order_error_on_the_same_layer() -> None:
    torch.manual_seed(0)
    linear = nn.Linear(128, 64)
    errors = {
        b: (packed_linear(linear, b).dense_weight() - linear.weight).abs().mean().item()
        for b in (16, 8, 4, 2)
    }
    assert errors[16] < errors[8] < errors[4] < errors[2]


def test_int8_layer_runs_on_the_int8_kernel_and_matches_its_weights() -> None:
    torch.manual_seed(0)
    linear = nn.Linear(64, 32)
    packed = packed_linear(linear, 8)
    x = torch.randn(5, 64)
    with torch.no_grad():
        y = packed(x)
    assert "int8" in packed._cache
    torch.testing.assert_close(y, x @ packed.dense_weight().T + linear.bias, atol=0.05, rtol=0.05)


def test_sparsity_stores_bitmask_and_kept_values_only() -> None:
    linear = nn.Linear(40, 10)
    packed = packed_linear(linear, 32, 0.75)
    assert packed.mask.numel() == 400 // 8  # the index overhead: one bit a weight
    assert packed.values.numel() == 100
    weight = packed.dense_weight()
    assert int((weight == 0).sum()) == 300
    kept = weight != 0
    assert torch.equal(weight[kept], linear.weight.detach()[kept])


def test_sparse_groupwise_keeps_pruned_weights_exactly_zero() -> None:
    linear = nn.Linear(64, 16)
    weight = packed_linear(linear, 2, 0.5).dense_weight()
    assert int((weight == 0).sum()) >= 512


def test_lowrank_is_never_larger_than_the_layer() -> None:
    linear = nn.Linear(32, 64)
    limit = max_useful_rank(32, 64)
    with pytest.raises(ValueError, match="would not make it smaller"):
        LowRankLinear.from_linear(linear, limit + 1)
    low = LowRankLinear.from_linear(linear, limit)
    assert sum(p.numel() for p in low.parameters()) < sum(p.numel() for p in linear.parameters())


@pytest.mark.parametrize("bits", [16, 8, 4, 2])
def test_packed_embedding_rows_match_the_dense_table(bits: int) -> None:
    emb = nn.Embedding(20, 36)
    packed = PackedEmbedding.from_embedding(emb, bits)
    ids = torch.tensor([[0, 5, 19], [3, 3, 7]])
    torch.testing.assert_close(packed(ids), packed.dense_weight()[ids])
    tolerance = {16: 0.02, 8: 0.02, 4: 0.3, 2: 1.2}[bits]
    assert (packed.dense_weight() - emb.weight).abs().max().item() < tolerance


def test_each_method_shrinks_the_serialized_model() -> None:
    model = tiny_llama()
    base = serialized_size(model, CompressionPlan())
    sizes = {}
    for name, plan in {
        "bits8": CompressionPlan(layers={"re:.*layers.*": LayerSettings(bits=8)}),
        "bits4": CompressionPlan(layers={"re:.*layers.*": LayerSettings(bits=4)}),
        "bits2": CompressionPlan(layers={"re:.*layers.*": LayerSettings(bits=2)}),
        "emb2": CompressionPlan(layers={"model.embed_tokens": LayerSettings(bits=2)}),
        "structured": CompressionPlan(structured={"re:.*": StructuredSettings(0.5, 0.5)}),
    }.items():
        sizes[name] = serialized_size(apply_plan(copy.deepcopy(model), plan, batch()), plan)
    assert base > sizes["bits8"] > sizes["bits4"] > sizes["bits2"]
    assert sizes["emb2"] < base and sizes["structured"] < base


def test_settings_and_choices_copy_pickle_and_compare_by_value() -> None:
    import pickle

    from slimsearch.spaces import Choices, StructuredChoices

    for value in (
        LayerSettings(bits=8, sparsity=0.5),
        StructuredSettings(heads=0.5),
        Choices(bits=(32, 8)),
        StructuredChoices(heads=(0.0, 0.5), blocks=("re:.*layer\\.1",)),
    ):
        assert copy.deepcopy(value) == value == pickle.loads(pickle.dumps(value))
        assert hash(copy.deepcopy(value)) == hash(value)
    assert LayerSettings(bits=32, sparsity=0.0) == LayerSettings()  # off values are not stored
    assert Choices(bits=(32,)) == Choices()
    with pytest.raises(AttributeError, match="immutable"):
        LayerSettings(bits=8).bits = 4  # type: ignore[misc]
    assert LayerSettings(0.5, 8) == LayerSettings(sparsity=0.5, bits=8)  # the old positional order
