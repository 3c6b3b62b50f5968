"""The conformance suite every compression method must pass (the pattern of Optuna's
``optuna/testing/pytest_samplers.py``).

A method is described by a ``MethodCase``: a name, a function that builds the plan that
switches the method on for a given model, and the methods it says it realizes. To test a
method, subclass ``MethodConformance`` in a test module and give it three fixtures::

    class TestMyMethod(MethodConformance):
        @pytest.fixture(params=[MY_CASE], ids=lambda c: c.name)
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
- methods run in the fixed order (structured pruning, factorize, sparsify, quantize) no
  matter how the plan is written, and structured pruning refuses already-compressed layers.
"""

from __future__ import annotations

import copy
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from torch import Tensor, nn

from slimsearch.spaces.apply import apply_plan, compressible_modules
from slimsearch.spaces.methods.realized import REALIZED
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
    skipped. ``realizes`` are the keys of REALIZED the plan must report."""

    name: str
    plan: PlanFactory
    realizes: tuple[str, ...]

    def __post_init__(self) -> None:
        unknown = [r for r in self.realizes if r not in REALIZED]
        if unknown:
            raise ValueError(
                f"MethodCase {self.name!r}: realizes {unknown} unknown; choose from {sorted(REALIZED)}"
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


def _embeddings(bits: int) -> PlanFactory:
    def plan(model: nn.Module) -> CompressionPlan | None:
        name = _table_name(model, "get_input_embeddings")
        return CompressionPlan(layers={name: LayerSettings(bits=bits)}) if name else None

    return plan


def _untied_head(bits: int) -> PlanFactory:
    def plan(model: nn.Module) -> CompressionPlan | None:
        head = _table_name(model, "get_output_embeddings")
        get_emb = getattr(model, "get_input_embeddings", None)
        emb = get_emb() if callable(get_emb) else None
        if head is None or (emb is not None and model.get_submodule(head).weight is emb.weight):
            return None
        return CompressionPlan(layers={head: LayerSettings(bits=bits)})

    return plan


def _combined(model: nn.Module) -> CompressionPlan:
    # Written in the "wrong" order on purpose: apply_plan must still prune structure first.
    return CompressionPlan(
        layers={BLOCK_LINEARS: LayerSettings(sparsity=0.5, bits=4, rank=4)},
        structured={ALL_BLOCKS: StructuredSettings(heads=0.5, neurons=0.5)},
    )


STANDARD_CASES: tuple[MethodCase, ...] = (
    MethodCase("heads", _structured(StructuredSettings(heads=0.5)), ("heads",)),
    MethodCase("neurons", _structured(StructuredSettings(neurons=0.5)), ("neurons",)),
    MethodCase("bf16", _layers(LayerSettings(bits=16)), ("bits16",)),
    MethodCase("int8", _layers(LayerSettings(bits=8)), ("bits8",)),
    MethodCase("int4", _layers(LayerSettings(bits=4)), ("bits4",)),
    MethodCase("int2", _layers(LayerSettings(bits=2)), ("bits2",)),
    MethodCase("sparsity", _layers(LayerSettings(sparsity=0.5)), ("sparsity",)),
    MethodCase("sparse-int8", _layers(LayerSettings(sparsity=0.5, bits=8)), ("sparsity", "bits8")),
    MethodCase("lowrank", _layers(LayerSettings(rank=4)), ("rank",)),
    MethodCase("embeddings-bf16", _embeddings(16), ("bits16",)),
    MethodCase("embeddings-int8", _embeddings(8), ("bits8",)),
    MethodCase("embeddings-int4", _embeddings(4), ("bits4",)),
    MethodCase("embeddings-int2", _embeddings(2), ("bits2",)),
    MethodCase("lm-head-int8", _untied_head(8), ("bits8",)),
    MethodCase("lm-head-int4", _untied_head(4), ("bits4",)),
    MethodCase("all-combined", _combined, ("heads", "neurons", "rank", "sparsity", "bits4")),
)


def off_version(plan: CompressionPlan) -> CompressionPlan:
    """The same plan, every setting switched off."""
    return CompressionPlan(
        layers={k: LayerSettings() for k in plan.layers},
        structured={k: StructuredSettings() for k in plan.structured},
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
        allowed = {*REALIZED.values(), "nothing"}
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
        in_steps = self._compress(model, CompressionPlan(structured=structured), inputs)
        apply_plan(in_steps, CompressionPlan(layers=layers))
        assert_same_state(_state(at_once), _state(in_steps))
        assert torch.equal(outputs(at_once, inputs), outputs(in_steps, inputs))

        # Within one Linear: factorize, then sparsify and quantize the factors.
        for module in at_once.modules():
            for part in (getattr(module, "down", None), getattr(module, "up", None)):
                if part is not None and any(s.bits != 32 or s.sparsity for s in layers.values()):
                    assert not isinstance(part, nn.Linear), "low-rank factors must carry the later steps"

        layers_first = self._compress(model, CompressionPlan(layers=layers), inputs)
        unit_linears = {n for u in find_units(model) for n, _ in (*u.producers, u.consumer)}
        touched = unit_linears - set(compressible_modules(layers_first))
        if touched:
            with pytest.raises(ValueError, match="structured pruning runs first"):
                apply_plan(layers_first, CompressionPlan(structured=structured), calibration=inputs)
