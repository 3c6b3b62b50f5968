"""The conformance suite every compression method must pass (the pattern of Optuna's
``optuna/testing/pytest_samplers.py``), generated from the method registry.

A method is checked through ``MethodCase``s: a name, a function that builds the plan that
switches the method on for a given model, and the keys it says it realizes. ``cases_for``
builds them from a registered method's declarations (its scopes and ``examples()``), and
``registry_cases()`` does so for every registered method plus pairs of methods of different
stages. To test a method, subclass ``MethodConformance`` in a test module::

    class TestMyMethod(MethodConformance):
        @pytest.fixture(params=cases_for(registry.get("mine")), ids=lambda c: c.name)
        def case(self, request): return request.param

        @pytest.fixture(params=[tiny_bert, tiny_llama])
        def make_model(self, request): return request.param     # seed -> fresh model

        @pytest.fixture
        def inputs(self): return {"input_ids": ..., "attention_mask": ...}

Every test then runs for every (case, model) pair. The contract:
- "off" is the identity: the same plan with every setting off changes no tensor or output;
- on, the method changes the model and makes its serialized form smaller;
- the same plan (and calibration batch) gives the same model, bit for bit;
- the size objective (``serialized_size``) equals the bytes ``save_compressed`` writes;
- save/load round-trips: a skeleton built from the config, given the saved plan's shapes
  and the saved tensors, computes identical outputs and has the same size;
- the plan survives JSON; every compressed module and the plan say what they realize;
- methods run in stage order (structured, depth, factorize, sparsify, quantize) no matter
  how the plan is written, and structured pruning refuses already-compressed layers;
- distillation keeps the compression: the same modules, bytes, masks and stored values,
  and a layer made by a "frozen" method keeps exactly its stored tensors.
"""

from __future__ import annotations

import copy
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import Tensor, nn

from slimsearch.spaces.apply import apply_plan, compressible_modules
from slimsearch.spaces.methods import registry
from slimsearch.spaces.methods.distill import DistillRecipe, TeacherCache, distill
from slimsearch.spaces.methods.packed import PackedLinear
from slimsearch.spaces.methods.realized import realized_table
from slimsearch.spaces.methods.registry import Method
from slimsearch.spaces.methods.structured import find_units
from slimsearch.spaces.plan import CompressionPlan, LayerSettings, StructuredSettings
from slimsearch.spaces.serialize import load_compressed, save_compressed, serialized_size

# Every Linear inside a numbered Transformer block (BERT and Llama naming).
BLOCK_LINEARS = r"re:.*\b(layer|layers)\.\d+\..*"
ALL_BLOCKS = "re:.*"

PlanFactory = Callable[[nn.Module], CompressionPlan | None]


@dataclass(frozen=True)
class MethodCase:
    """One compression method at one setting. ``plan`` returns None for a model the method
    does not apply to (e.g. an untied LM head on a model whose head is tied): that pair is
    skipped. ``realizes`` are the keys of ``realized_table()`` the plan must report."""

    name: str
    plan: PlanFactory
    realizes: tuple[str, ...]

    def __post_init__(self) -> None:
        table = realized_table()
        unknown = [r for r in self.realizes if r not in table]
        if unknown:
            raise ValueError(
                f"MethodCase {self.name!r}: realizes {unknown} unknown; choose from {sorted(table)}"
            )


def _layers(settings: LayerSettings) -> PlanFactory:
    return lambda model: CompressionPlan(layers={BLOCK_LINEARS: settings})


def _structured(settings: StructuredSettings) -> PlanFactory:
    return lambda model: CompressionPlan(structured={ALL_BLOCKS: settings})


def _table_name(model: nn.Module, which: str) -> str | None:
    get = getattr(model, which, None)
    table = get() if callable(get) else None
    names = {id(m): n for n, m in model.named_modules()}
    return names.get(id(table)) if table is not None else None


def _table(name: str, value: Any) -> PlanFactory:
    def plan(model: nn.Module) -> CompressionPlan | None:
        table = _table_name(model, "get_input_embeddings")
        return CompressionPlan(layers={table: LayerSettings(**{name: value})}) if table else None

    return plan


def _untied_head(name: str, value: Any) -> PlanFactory:
    def plan(model: nn.Module) -> CompressionPlan | None:
        head = _table_name(model, "get_output_embeddings")
        get_emb = getattr(model, "get_input_embeddings", None)
        emb = get_emb() if callable(get_emb) else None
        if head is None or (emb is not None and model.get_submodule(head).weight is emb.weight):
            return None
        return CompressionPlan(layers={head: LayerSettings(**{name: value})})

    return plan


def cases_for(method: Method) -> tuple[MethodCase, ...]:
    """The cases of one registered method: each of its examples on each of its scopes (block
    methods on every block; Linear methods on every Linear of the blocks; table methods on the
    input embeddings and an untied output head)."""
    out = []
    for value in method.examples():
        label = f"{method.name}={value}"
        realizes = (method.realized_key(value),)
        if method.option_of is not None:
            settings = LayerSettings(**{**method.option_base, method.name: value})
            base = "+".join(f"{k}={v}" for k, v in method.option_base.items())
            out.append(MethodCase(f"{label}+{base}", _layers(settings), tuple(settings.realized())))
            continue
        if "block" in method.scopes:
            out.append(MethodCase(label, _structured(StructuredSettings(**{method.name: value})), realizes))
        if "linear" in method.scopes:
            out.append(MethodCase(label, _layers(LayerSettings(**{method.name: value})), realizes))
        if "table" in method.scopes and value in (method.table_allowed() or method.allowed() or (value,)):
            out.append(MethodCase(f"{label}@embeddings", _table(method.name, value), realizes))
            out.append(MethodCase(f"{label}@lm_head", _untied_head(method.name, value), realizes))
    return tuple(out)


def combined_cases() -> tuple[MethodCase, ...]:
    """Methods of different stages on the same layers: each pair of Linear methods, and the
    first method of every stage at once, written in reverse stage order on purpose (apply
    must still run them in stage order)."""
    every = registry.methods("linear")
    linear = [m for m in every if m.option_of is None]
    out = []
    for i, first in enumerate(linear):
        for second in linear[i + 1 :]:
            if first.stage == second.stage:
                continue
            values = {first.name: first.examples()[0], second.name: second.examples()[0]}
            realizes = tuple(LayerSettings(**values).realized())
            out.append(
                MethodCase(
                    "+".join(f"{n}={v}" for n, v in values.items()),
                    _layers(LayerSettings(**values)),
                    realizes,
                )
            )
    first_per_stage: dict[str, Method] = {}
    for method in linear:
        if method.option_of is None:
            first_per_stage.setdefault(method.stage, method)
    # Depth methods would remove every block the others change: they are combined apart.
    shaping = [m for m in registry.methods("block") if m.stage != "depth"]
    chosen = list(reversed([*shaping, *first_per_stage.values()]))
    layer_values = {m.name: m.examples()[0] for m in chosen if "linear" in m.scopes}
    block_values = {m.name: m.examples()[0] for m in chosen if "block" in m.scopes}
    realizes = tuple(m.realized_key(m.examples()[0]) for m in chosen)

    def every_stage(model: nn.Module) -> CompressionPlan:
        return CompressionPlan(
            layers={BLOCK_LINEARS: LayerSettings(**layer_values)},
            structured={ALL_BLOCKS: StructuredSettings(**block_values)},
        )

    out.append(MethodCase("all-combined", every_stage, realizes))
    for method in registry.methods("block"):
        if method.stage == "depth" and "bits" in registry.names("linear"):
            value = method.examples()[0]
            settings = LayerSettings(bits=4)

            def last_block(
                model: nn.Module,
                method: Method = method,
                value: Any = value,
                settings: LayerSettings = settings,
            ) -> CompressionPlan:
                blocks = method.blocks(method.layout(model))
                return CompressionPlan(
                    layers={BLOCK_LINEARS: settings},
                    structured={blocks[-1]: StructuredSettings(**{method.name: value})},
                )

            realized = (method.realized_key(value), *settings.realized())
            out.append(MethodCase(f"{method.name}={value}@last-block+bits=4", last_block, realized))
    # Every option whose method agrees with the ones before it, at once, after a sparsify method.
    options: dict[str, Any] = {m.name: m.examples()[0] for m in linear if m.stage == "sparsify"}
    options = dict(list(options.items())[-1:])
    for method in every:
        base = method.option_base
        if method.option_of is not None and all(options.get(k, v) == v for k, v in base.items()):
            options.update({**base, method.name: method.examples()[0]})
    together = LayerSettings(**options)
    out.append(MethodCase("options-combined", _layers(together), tuple(together.realized())))
    return tuple(out)


def registry_cases() -> tuple[MethodCase, ...]:
    """Every registered method's cases, then the combined ones."""
    return tuple(c for m in registry.methods() for c in cases_for(m)) + combined_cases()


def off_version(plan: CompressionPlan) -> CompressionPlan:
    """The same plan, every setting switched off (the methods' off values given explicitly)."""
    return CompressionPlan(
        layers={
            k: LayerSettings(**{n: registry.get(n).off for n in v.values}) for k, v in plan.layers.items()
        },
        structured={
            k: StructuredSettings(**{n: registry.get(n).off for n in v.values})
            for k, v in plan.structured.items()
        },
    )


def _state(model: nn.Module) -> dict[str, Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_same_state(a: Mapping[str, Tensor], b: Mapping[str, Tensor]) -> None:
    assert list(a) == list(b), f"state keys differ: {sorted(set(a) ^ set(b))[:5]}"
    for key in a:
        assert a[key].dtype == b[key].dtype and a[key].shape == b[key].shape, key
        assert torch.equal(a[key], b[key]), f"tensor {key} differs"


def outputs(model: nn.Module, inputs: Mapping[str, Tensor]) -> Tensor:
    with torch.no_grad():
        logits: Tensor = model.eval()(**inputs).logits
    return logits


class MethodConformance:
    """The suite. Subclasses provide the ``case``, ``make_model`` and ``inputs`` fixtures."""

    @pytest.fixture
    def case(self) -> MethodCase:
        raise NotImplementedError("give a `case` fixture returning a MethodCase")

    @pytest.fixture
    def make_model(self) -> Callable[[int], nn.Module]:
        raise NotImplementedError("give a `make_model` fixture: seed -> a fresh model in eval mode")

    @pytest.fixture
    def inputs(self) -> dict[str, Tensor]:
        raise NotImplementedError("give an `inputs` fixture: keyword inputs of the model, a small batch")

    @staticmethod
    def _plan(case: MethodCase, model: nn.Module) -> CompressionPlan:
        plan = case.plan(model)
        if plan is None:
            pytest.skip(f"{case.name} does not apply to {type(model).__name__}")
        return plan

    @staticmethod
    def _compress(model: nn.Module, plan: CompressionPlan, inputs: Mapping[str, Tensor]) -> nn.Module:
        return apply_plan(copy.deepcopy(model), plan, calibration=inputs).eval()

    def test_off_is_identity(
        self, case: MethodCase, make_model: Callable[[int], nn.Module], inputs: dict[str, Tensor]
    ) -> None:
        model = make_model(0)
        off = off_version(self._plan(case, model))
        assert off.is_off
        compressed = self._compress(model, off, inputs)
        assert_same_state(_state(model), _state(compressed))
        assert [type(m) for m in model.modules()] == [type(m) for m in compressed.modules()]
        assert torch.equal(outputs(model, inputs), outputs(compressed, inputs))

    def test_on_changes_model_and_shrinks_it(
        self, case: MethodCase, make_model: Callable[[int], nn.Module], inputs: dict[str, Tensor]
    ) -> None:
        model = make_model(0)
        plan = self._plan(case, model)
        compressed = self._compress(model, plan, inputs)
        assert serialized_size(compressed, plan) < serialized_size(model, plan)
        assert not torch.equal(outputs(model, inputs), outputs(compressed, inputs))

    def test_same_plan_same_model(
        self, case: MethodCase, make_model: Callable[[int], nn.Module], inputs: dict[str, Tensor]
    ) -> None:
        model = make_model(0)
        plan = self._plan(case, model)
        first = self._compress(model, plan, inputs)
        second = self._compress(model, CompressionPlan.from_json(plan.to_json()), inputs)
        assert_same_state(_state(first), _state(second))
        assert torch.equal(outputs(first, inputs), outputs(second, inputs))

    def test_size_is_serialized_bytes_and_round_trips(
        self, case: MethodCase, make_model: Callable[[int], nn.Module], inputs: dict[str, Tensor]
    ) -> None:
        model = make_model(0)
        plan = self._plan(case, model)
        compressed = self._compress(model, plan, inputs)
        reported = serialized_size(compressed, plan)
        with tempfile.TemporaryDirectory() as folder:
            path = Path(folder) / "model.safetensors"
            written = save_compressed(compressed, plan, path)
            on_disk = path.stat().st_size
            # The skeleton comes from the config alone: other weights, full shapes.
            skeleton = type(model)(copy.deepcopy(model.config))
            loaded, loaded_plan = load_compressed(path, skeleton)
        assert written == on_disk
        assert abs(reported - on_disk) <= 0.01 * on_disk
        assert loaded_plan == plan
        assert_same_state(_state(compressed), _state(loaded))
        assert torch.equal(outputs(compressed, inputs), outputs(loaded, inputs))
        assert serialized_size(loaded, loaded_plan) == reported

    def test_reports_what_it_realizes(
        self, case: MethodCase, make_model: Callable[[int], nn.Module], inputs: dict[str, Tensor]
    ) -> None:
        model = make_model(0)
        plan = self._plan(case, model)
        assert sorted(plan.realized()) == sorted(case.realizes)
        compressed = self._compress(model, plan, inputs)
        allowed = {*realized_table().values(), "nothing"}
        packed = [m for m in compressed.modules() if hasattr(m, "realized")]
        for module in packed:
            assert module.realized in allowed, f"{type(module).__name__}.realized={module.realized!r}"
        structured_only = not plan.layers
        assert structured_only or packed, "a layer method must leave modules that say what they realize"

    def test_methods_run_in_fixed_order(
        self, case: MethodCase, make_model: Callable[[int], nn.Module], inputs: dict[str, Tensor]
    ) -> None:
        """One plan = structured pruning first, then the layer methods, however it is written;
        and structured pruning on top of already-compressed unit layers is refused."""
        model = make_model(0)
        plan = self._plan(case, model)
        structured = dict(plan.structured) or {ALL_BLOCKS: StructuredSettings(heads=0.5, neurons=0.5)}
        layers = dict(plan.layers)
        combined = CompressionPlan(layers=layers, structured=structured)
        at_once = self._compress(model, combined, inputs)
        reads_stats = any(m.needs for s in layers.values() for m, _ in s.steps())
        if not reads_stats:  # a method reading statistics needs the baseline's, not a pruned model's
            in_steps = self._compress(model, CompressionPlan(structured=structured), inputs)
            apply_plan(in_steps, CompressionPlan(layers=layers))
            assert_same_state(_state(at_once), _state(in_steps))
            assert torch.equal(outputs(at_once, inputs), outputs(in_steps, inputs))

        # Within one Linear: factorize, then sparsify and quantize the factors.
        for module in at_once.modules():
            for part in (getattr(module, "down", None), getattr(module, "up", None)):
                later = ("sparsify", "quantize")
                if part is not None and any(m.stage in later for s in layers.values() for m, _ in s.steps()):
                    assert not isinstance(part, nn.Linear), "low-rank factors must carry the later steps"

        layers_first = self._compress(model, CompressionPlan(layers=layers), inputs)
        unit_linears = {n for u in find_units(model) for n in u.linears()}
        touched = unit_linears - set(compressible_modules(layers_first))
        if touched:
            with pytest.raises(ValueError, match="structured pruning runs first"):
                apply_plan(layers_first, CompressionPlan(structured=structured), calibration=inputs)

    def test_distillation_keeps_the_compression(
        self, case: MethodCase, make_model: Callable[[int], nn.Module], inputs: dict[str, Tensor]
    ) -> None:
        """A short distillation changes no module type, size or mask; a layer any "frozen"
        method made keeps its stored tensors bit for bit; the others stay stored by the same
        methods at the same values."""
        teacher = make_model(0)
        plan = self._plan(case, teacher)
        student = self._compress(teacher, plan, inputs)
        before = {n: (type(m), _state(m), getattr(m, "made_by", None)) for n, m in student.named_modules()}
        size = serialized_size(student, plan)
        kind = "classification" if "SequenceClassification" in type(teacher).__name__ else "causal-lm"
        batch = dict(inputs)
        if kind == "classification":
            batch["labels"] = torch.arange(batch["input_ids"].shape[0]) % 2
        rows = int(batch["input_ids"].shape[0])
        recipe = DistillRecipe(kind="logits", steps=2, batch_size=rows, learning_rate=1e-2)
        cache = TeacherCache.compute(teacher, [batch], recipe.kind, kind)
        distill(student, cache, [batch], recipe, kind)
        assert serialized_size(student, plan) == size
        for name, module in student.named_modules():
            kind_before, state_before, made_by = before[name]
            assert type(module) is kind_before, f"{name} became a {type(module).__name__}"
            if not isinstance(module, PackedLinear):
                continue
            assert module.made_by == made_by, f"{name}: made by {module.made_by}, was {made_by}"
            state = _state(module)
            if "mask" in state:
                assert torch.equal(state["mask"], state_before["mask"]), f"{name}: the sparsity mask changed"
            if any(registry.get(m).qat == "frozen" for m in module.made_by):
                assert_same_state(state_before, state)
