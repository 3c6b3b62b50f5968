"""Distillation: recipes, the teacher cache, QAT that keeps the compressed layout, and that
training actually lowers the distillation loss on tiny BERT and Llama models."""

from __future__ import annotations

import copy
import math
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from slimsearch.spaces import CompressionPlan, LayerSettings, StructuredSettings, apply_plan
from slimsearch.spaces.methods import LowRankLinear, PackedLinear, registry
from slimsearch.spaces.methods.distill import (
    DistillRecipe,
    FakeQuantLinear,
    TeacherCache,
    distill,
    evaluate_loss,
    layer_map,
    teacher_layer_for,
)
from slimsearch.spaces.methods.quantize import group_size_for, quantize_rows, unpack_bits
from slimsearch.spaces.serialize import serialized_size
from tiny import LM_TEXT, packed_linear, sentiment_rows, tiny_bert, tiny_llama

Batch = dict[str, Tensor]
BLOCKS = r"re:.*layers?\.\d+\..*"


def word_ids(text: str, vocab: dict[str, int]) -> list[int]:
    """A word-level stand-in for a tokenizer: id 0 pads, 1 starts a row (like [CLS])."""
    return [vocab.setdefault(w, 2 + len(vocab) % 90) for w in text.split()]


def sentiment_batches(batch_size: int = 8) -> list[Batch]:
    rows = sentiment_rows(48)
    vocab: dict[str, int] = {}
    batches = []
    for start in range(0, len(rows), batch_size):
        chunk = rows[start : start + batch_size]
        ids = [[1, *word_ids(text, vocab)] for text, _ in chunk]
        width = max(len(i) for i in ids)
        input_ids = torch.zeros(len(ids), width, dtype=torch.long)
        mask = torch.zeros_like(input_ids)
        for r, row in enumerate(ids):
            input_ids[r, : len(row)] = torch.tensor(row)
            mask[r, : len(row)] = 1
        labels = torch.tensor([label for _, label in chunk])
        batches.append({"input_ids": input_ids, "attention_mask": mask, "labels": labels})
    return batches


def lm_batches(block: int = 16, batch_size: int = 4) -> list[Batch]:
    ids = torch.tensor(word_ids(LM_TEXT, {})[: 4 * block * batch_size]).view(-1, block)
    return [{"input_ids": ids[i : i + batch_size]} for i in range(0, len(ids), batch_size)]


def _train_teacher(model: nn.Module, batches: list[Batch], task: str, steps: int) -> nn.Module:
    """A few steps of plain training, so the teacher's outputs carry signal worth distilling."""
    torch.manual_seed(0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for step in range(steps):
        batch = batches[step % len(batches)]
        out = model(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask"))
        if task == "classification":
            loss = F.cross_entropy(out.logits, batch["labels"])
        else:
            logits = out.logits[:, :-1].reshape(-1, out.logits.shape[-1])
            loss = F.cross_entropy(logits, batch["input_ids"][:, 1:].reshape(-1))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval()


@pytest.fixture(scope="module")
def bert_setup() -> tuple[nn.Module, list[Batch]]:
    torch.set_num_threads(1)
    batches = sentiment_batches()
    model = tiny_bert()
    # At the default init (std 0.02) the tiny BERT's blocks barely change its output and a
    # trained teacher is saturated, so compression would cost nothing to recover. Wider
    # weights make the blocks, and their compression, matter.
    torch.manual_seed(1)
    for module in model.modules():
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, std=0.2)
    return _train_teacher(model, batches, "classification", 30), batches


@pytest.fixture(scope="module")
def llama_setup() -> tuple[nn.Module, list[Batch]]:
    torch.set_num_threads(1)
    batches = lm_batches()
    return _train_teacher(tiny_llama(), batches, "causal-lm", 60), batches


def compressed(teacher: nn.Module, plan: CompressionPlan) -> nn.Module:
    return apply_plan(copy.deepcopy(teacher), plan).eval()


SPARSE_INT8 = CompressionPlan(layers={BLOCKS: LayerSettings(sparsity=0.5, bits=8)})
SPARSE_4BIT = CompressionPlan(layers={BLOCKS: LayerSettings(sparsity=0.5, bits=4)})
# Half the heads go: the student's attention maps have fewer heads than the teacher's.
STRUCT_INT8 = CompressionPlan(
    layers={BLOCKS: LayerSettings(bits=8)}, structured={"re:.*": StructuredSettings(heads=0.5, neurons=0.5)}
)


# ---- recipe ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"kind": "logits+attention"}, "kind='logits+attention' is not known"),
        ({"steps": -1}, "steps=-1 must be a non-negative integer"),
        ({"steps": 2.5}, "steps=2.5"),
        ({"steps": True}, "steps=True"),
        ({"learning_rate": 0.0}, "learning_rate=0.0 must be a positive number"),
        ({"learning_rate": float("nan")}, "learning_rate=nan"),
        ({"temperature": -1.0}, "temperature=-1.0"),
        ({"alpha": 1.5}, "alpha=1.5 must be in [0, 1]"),
        ({"hidden_weight": -0.1}, "hidden_weight=-0.1 must be a number >= 0"),
        ({"attention_weight": "1"}, "attention_weight='1'"),
        ({"batch_size": 0}, "batch_size=0 must be a positive integer"),
    ],
)
def test_recipe_validation_names_field_and_value(changes: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("+", r"\+")):
        DistillRecipe(**changes)


def test_recipe_round_trips_as_plain_json_in_a_plan() -> None:
    recipe = DistillRecipe(kind="logits+hidden", steps=7, alpha=0.25, temperature=3.0)
    plan = CompressionPlan(layers={}, distill=recipe.to_dict())
    back = CompressionPlan.from_json(plan.to_json())
    assert back.distill is not None
    assert DistillRecipe.from_dict(back.distill) == recipe
    with pytest.raises(ValueError, match=r"unknown keys \['epochs'\]"):
        DistillRecipe.from_dict({**recipe.to_dict(), "epochs": 3})


def test_recipe_flags() -> None:
    assert DistillRecipe(kind="off").is_off and DistillRecipe(steps=0).is_off
    full = DistillRecipe(kind="logits+hidden+attention")
    assert full.uses_hidden and full.uses_attention and not full.is_off
    assert not DistillRecipe(kind="logits").uses_hidden


# ---- layer mapping -----------------------------------------------------------------------


def test_layer_map_is_uniform() -> None:
    assert layer_map(6, 6) == [0, 1, 2, 3, 4, 5]
    assert layer_map(3, 6) == [1, 3, 5]
    assert layer_map(4, 6) == [1, 2, 4, 5]  # 1.5 -> 2, 4.5 -> 5: halves round up
    assert layer_map(4, 2) == [0, 0, 1, 1]
    assert layer_map(6, 2) == [0, 0, 0, 0, 1, 1]  # 1/3 rounds to 0: clamped to block 0
    with pytest.raises(ValueError, match="student_layer=3 is out of range"):
        teacher_layer_for(3, 3, 6)
    with pytest.raises(ValueError, match="layer counts must be positive"):
        layer_map(0, 6)


# ---- fake quantization and re-packing ----------------------------------------------------


@pytest.mark.parametrize("bits", [32, 16, 8, 4, 2])
@pytest.mark.parametrize("sparsity", [0.0, 0.5])
def test_fake_quant_matches_packed_layer_and_repacks_the_same_mask(bits: int, sparsity: float) -> None:
    torch.manual_seed(0)
    linear = nn.Linear(40, 12)
    packed = packed_linear(linear, bits, sparsity)
    fake = FakeQuantLinear.from_packed(packed)
    x = torch.randn(5, 40)
    # Before training, the stand-in computes what the packed layer stores (dense fp32 path).
    expected = F.linear(x, packed.dense_weight(), getattr(packed, "bias", None))
    assert torch.allclose(fake(x), expected, atol=1e-5)
    with torch.no_grad():
        fake.weight.add_(0.05 * torch.randn_like(fake.weight))  # as if it had trained
    repacked = fake.to_packed()
    assert (repacked.bits, repacked.sparse) == (packed.bits, packed.sparse)
    assert {k: v.shape for k, v in repacked.state_dict().items()} == {
        k: v.shape for k, v in packed.state_dict().items()
    }
    if sparsity:
        assert torch.equal(repacked.mask, packed.mask)
    # Training saw the deployed layer: the stand-in computes what its re-packed form computes.
    assert torch.allclose(
        repacked.dense_weight(), registry.get("bits").fake_quantize(fake.weight, bits, fake.keep), atol=1e-6
    )
    with torch.no_grad():
        deployed = F.linear(x, repacked.dense_weight(), getattr(repacked, "bias", None))
        assert torch.allclose(fake(x), deployed, atol=1e-5)


def test_straight_through_gradient_is_masked() -> None:
    torch.manual_seed(0)
    packed = packed_linear(nn.Linear(16, 8), 4, 0.5)
    fake = FakeQuantLinear.from_packed(packed)
    fake(torch.randn(3, 16)).sum().backward()
    assert fake.keep is not None and fake.weight.grad is not None
    assert torch.all(fake.weight.grad[~fake.keep] == 0)
    assert fake.weight.grad[fake.keep].abs().sum() > 0  # rounding did not block the gradient


def test_repacking_keeps_a_mask_whose_kept_weights_quantized_to_zero() -> None:
    # int8 codes of tiny weights are 0: kept entries that equal pruned ones in value must not
    # let the magnitude mask move to other positions.
    weight = torch.zeros(4, 16)
    weight[:, :4] = 1.0
    weight[:, 4:10] = 1e-6  # kept (larger than the zeros), but code 0 at int8
    linear = nn.Linear(16, 4, bias=False)
    with torch.no_grad():
        linear.weight.copy_(weight)
    packed = packed_linear(linear, 8, 6 / 16)
    fake = FakeQuantLinear.from_packed(packed)
    assert fake.keep is not None and int((fake.weight[fake.keep] == 0).sum()) == 24
    assert torch.equal(fake.to_packed().mask, packed.mask)


# ---- teacher cache -----------------------------------------------------------------------


def _count_calls(model: nn.Module) -> list[int]:
    calls = [0]

    def hook(*_: Any) -> None:
        calls[0] += 1

    model.register_forward_hook(hook)
    return calls


def test_teacher_cache_computes_once_and_round_trips(tmp_path: Path, bert_setup: Any) -> None:
    original, batches = bert_setup
    teacher = copy.deepcopy(original)  # students copy the original: they must not carry the hook
    calls = _count_calls(teacher)
    cache = TeacherCache.compute(teacher, batches, "logits+hidden+attention", "classification")
    assert calls[0] == len(batches)
    assert teacher.config._attn_implementation == "sdpa"  # switched to eager only while computing
    first = cache.outputs[0]
    layers = teacher.config.num_hidden_layers
    assert len(first.hidden) == layers + 1 and len(first.attentions) == layers
    assert first.attentions[0].shape[1] == teacher.config.num_attention_heads

    recipe = DistillRecipe(kind="logits+hidden+attention", steps=3, batch_size=8)
    student = compressed(original, SPARSE_INT8)
    distill(student, cache, batches, recipe, "classification")
    distill(student, cache, batches, DistillRecipe(kind="logits", steps=2, batch_size=8), "classification")
    assert calls[0] == len(batches)  # distillation never runs the teacher again

    path = tmp_path / "teacher.safetensors"
    cache.save(path)
    loaded = TeacherCache.load(path)
    assert (loaded.kind, loaded.task_kind, len(loaded)) == (cache.kind, cache.task_kind, len(cache))
    for a, b in zip(cache.outputs, loaded.outputs, strict=True):
        assert a.fingerprint == b.fingerprint
        for x, y in zip(
            (a.logits, *a.hidden, *a.attentions), (b.logits, *b.hidden, *b.attentions), strict=True
        ):
            assert x.dtype == y.dtype and torch.equal(x, y)
    # A loaded cache trains a student exactly as the original does.
    one, two = compressed(original, SPARSE_INT8), compressed(original, SPARSE_INT8)
    distill(one, cache, batches, recipe, "classification")
    distill(two, loaded, batches, recipe, "classification")
    assert all(
        torch.equal(x, y) for x, y in zip(one.state_dict().values(), two.state_dict().values(), strict=True)
    )


def test_logits_cache_holds_only_logits_and_refuses_richer_recipes(bert_setup: Any) -> None:
    teacher, batches = bert_setup
    cache = TeacherCache.compute(teacher, batches, "logits", "classification")
    assert cache.outputs[0].hidden == () and cache.outputs[0].attentions == ()
    student = compressed(teacher, SPARSE_INT8)
    with pytest.raises(ValueError, match="needs teacher outputs the cache"):
        distill(student, cache, batches, DistillRecipe(kind="logits+hidden", batch_size=8), "classification")


def test_cache_refuses_other_batches_and_tasks(bert_setup: Any) -> None:
    teacher, batches = bert_setup
    cache = TeacherCache.compute(teacher, batches, "logits", "classification")
    student = compressed(teacher, SPARSE_INT8)
    recipe = DistillRecipe(steps=1, batch_size=8)
    with pytest.raises(ValueError, match="batch 1 differs"):
        distill(student, cache, [batches[0], batches[2], *batches[2:]], recipe, "classification")
    with pytest.raises(ValueError, match="holds 6 batches but distill got 5"):
        distill(student, cache, batches[:5], recipe, "classification")
    with pytest.raises(ValueError, match="cache is for task_kind='classification', not 'causal-lm'"):
        distill(student, cache, batches, recipe, "causal-lm")
    with pytest.raises(ValueError, match="task_kind='regression' is not known"):
        distill(student, cache, batches, recipe, "regression")
    with pytest.raises(ValueError, match="more rows than the recipe's batch_size=4"):
        distill(student, cache, batches, DistillRecipe(steps=1, batch_size=4), "classification")


# ---- training ----------------------------------------------------------------------------


def _layout(model: nn.Module) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    return {k: (tuple(v.shape), v.dtype) for k, v in model.state_dict().items()}


def _check_on_grid(layer: PackedLinear) -> None:
    weight = layer.dense_weight()
    if layer.bits == 8:
        codes, scale = quantize_rows(weight, 8)
        assert torch.allclose(codes.float() * scale[:, None], weight, atol=1e-6)
    elif layer.bits in (4, 2):
        # Every kept weight sits on one of its group's 2**bits levels.
        group = group_size_for(layer.in_features)
        scale = layer.scale.float().repeat_interleave(group, dim=1)[:, : layer.in_features]
        offset = layer.offset.float().repeat_interleave(group, dim=1)[:, : layer.in_features]
        level = (weight - offset) / scale
        kept = unpack_bits(layer.mask, layer.numel).view_as(weight) if layer.sparse else weight == weight
        assert torch.allclose(level[kept], level[kept].round(), atol=1e-3)
        assert float(level[kept].min()) > -1e-3 and float(level[kept].max()) < 2**layer.bits - 1 + 1e-3


@pytest.mark.parametrize(
    ("setup", "task", "plan", "kind"),
    [
        ("bert_setup", "classification", SPARSE_4BIT, "logits"),
        ("bert_setup", "classification", SPARSE_INT8, "logits+hidden"),
        ("bert_setup", "classification", SPARSE_4BIT, "logits+hidden+attention"),
        ("bert_setup", "classification", STRUCT_INT8, "logits+hidden+attention"),
        ("llama_setup", "causal-lm", SPARSE_4BIT, "logits"),
        ("llama_setup", "causal-lm", SPARSE_INT8, "logits+hidden+attention"),
    ],
)
def test_distillation_lowers_the_loss_and_keeps_the_compression(
    setup: str, task: str, plan: CompressionPlan, kind: str, request: pytest.FixtureRequest
) -> None:
    teacher, batches = request.getfixturevalue(setup)
    size = batches[0]["input_ids"].shape[0]
    cache = TeacherCache.compute(teacher, batches, kind, task)
    student = compressed(teacher, plan)
    before_layout, before_size = _layout(student), serialized_size(student, plan)
    packed = [n for n, m in student.named_modules() if isinstance(m, PackedLinear)]
    masks = {
        n: m.mask.clone() for n, m in student.named_modules() if isinstance(m, PackedLinear) and m.sparse
    }
    recipe = DistillRecipe(kind=kind, steps=40, learning_rate=3e-3, batch_size=size)
    loss_before = evaluate_loss(student, cache, batches, recipe, task)

    stats = distill(student, cache, batches, recipe, task)

    loss_after = evaluate_loss(student, cache, batches, recipe, task)
    assert loss_after < 0.8 * loss_before, (loss_before, loss_after)
    assert stats["steps"] == 40 and stats["loss_end"] < stats["loss_start"]
    assert stats["qat_layers"] == len(packed) > 0
    assert not student.training
    assert student.config._attn_implementation == "sdpa"
    assert _layout(student) == before_layout  # keys, shapes and dtypes (int codes stay int)
    assert abs(serialized_size(student, plan) - before_size) <= 0.01 * before_size
    for name, module in student.named_modules():
        if isinstance(module, PackedLinear):
            assert module.sparse == (name in masks)
            if module.sparse:
                assert torch.equal(module.mask, masks[name])
            _check_on_grid(module)
    # Embeddings stayed frozen; they were not left frozen for later users.
    emb = student.get_input_embeddings()
    assert torch.equal(emb.weight, teacher.get_input_embeddings().weight) and emb.weight.requires_grad


def test_low_rank_factors_train_packed_or_not(bert_setup: Any) -> None:
    teacher, batches = bert_setup
    plan = CompressionPlan(
        layers={
            r"re:.*intermediate\.dense": LayerSettings(rank=8, bits=8),
            r"re:.*output\.dense": LayerSettings(rank=8),
        }
    )
    cache = TeacherCache.compute(teacher, batches, "logits", "classification")
    student = compressed(teacher, plan)
    before = {k: v.clone() for k, v in student.state_dict().items()}
    layout = _layout(student)
    recipe = DistillRecipe(steps=10, learning_rate=3e-3, batch_size=8)
    stats = distill(student, cache, batches, recipe, "classification")
    assert stats["qat_layers"] == 2 * teacher.config.num_hidden_layers  # packed down and up factors
    lows = {n for n, m in student.named_modules() if isinstance(m, LowRankLinear)}
    assert len(lows) == 3 * teacher.config.num_hidden_layers
    changed = {k for k, v in student.state_dict().items() if not torch.equal(v, before[k])}
    for name in lows:
        assert f"{name}.down.weight" in changed or f"{name}.down.values" in changed
    assert _layout(student) == layout


def test_distillation_is_deterministic_and_leaves_global_rng_alone(bert_setup: Any) -> None:
    teacher, batches = bert_setup
    cache = TeacherCache.compute(teacher, batches, "logits+hidden", "classification")
    recipe = DistillRecipe(kind="logits+hidden", steps=6, batch_size=8, seed=3)
    torch.manual_seed(123)
    expected_next = torch.rand(1)
    torch.manual_seed(123)
    one = compressed(teacher, SPARSE_4BIT)
    distill(one, cache, batches, recipe, "classification")
    assert torch.equal(torch.rand(1), expected_next)
    two = compressed(teacher, SPARSE_4BIT)
    distill(two, cache, batches, recipe, "classification")
    assert all(
        torch.equal(a, b) for a, b in zip(one.state_dict().values(), two.state_dict().values(), strict=True)
    )
    other = compressed(teacher, SPARSE_4BIT)
    distill(
        other,
        cache,
        batches,
        DistillRecipe(kind="logits+hidden", steps=6, batch_size=8, seed=4),
        "classification",
    )
    assert any(
        not torch.equal(a, b)
        for a, b in zip(one.state_dict().values(), other.state_dict().values(), strict=True)
    )


def test_off_recipe_changes_nothing(bert_setup: Any) -> None:
    teacher, batches = bert_setup
    cache = TeacherCache.compute(teacher, batches, "logits", "classification")
    student = compressed(teacher, SPARSE_INT8)
    before = {k: v.clone() for k, v in student.state_dict().items()}
    stats = distill(student, cache, batches, DistillRecipe(kind="off"), "classification")
    assert stats["steps"] == 0 and not math.isnan(stats["seconds"])
    assert all(torch.equal(v, before[k]) for k, v in student.state_dict().items())
