"""Apply a CompressionPlan to a model, in place.

The methods always run in one order, whatever order the plan lists things in:
1. structured pruning (whole heads and FFN neurons; shrinks Linear shapes),
2. factorization (rank),
3. unstructured sparsity (the factors are what gets stored, so they are what is pruned),
4. quantization of the kept values.
Later steps see the shapes earlier steps left. Structured pruning refuses a model whose
Linears were already replaced, so a plan cannot be applied on top of another one.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace

from torch import Tensor, nn

from slimsearch.spaces.methods import LowRankLinear, PackedEmbedding, PackedLinear, TiedHead
from slimsearch.spaces.methods.structured import Kind, find_units, prune_structured
from slimsearch.spaces.plan import CompressionPlan, LayerSettings


def compressible_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Every Linear and Embedding of the model, by fully qualified name."""
    return {
        name: module
        for name, module in model.named_modules()
        if isinstance(module, (nn.Linear, nn.Embedding))
    }


def structured_blocks(model: nn.Module) -> list[str]:
    """Names of the blocks that structured pruning can address (each holds attention and/or MLP)."""
    return list(dict.fromkeys(u.block for u in find_units(model)))


def compress_linear(linear: nn.Linear, settings: LayerSettings) -> nn.Module:
    if settings.rank is not None:
        low = LowRankLinear.from_linear(linear, settings.rank)
        if settings.sparsity or settings.bits != 32:
            low.down = PackedLinear.from_linear(low.down, settings.bits, settings.sparsity)  # type: ignore[arg-type]
            low.up = PackedLinear.from_linear(low.up, settings.bits, settings.sparsity)  # type: ignore[arg-type]
        return low
    return PackedLinear.from_linear(linear, settings.bits, settings.sparsity)


def compress_embedding(emb: nn.Embedding, settings: LayerSettings) -> nn.Module:
    if settings.sparsity or settings.rank is not None:
        raise ValueError(
            f"embeddings take only 'bits'; got sparsity={settings.sparsity}, rank={settings.rank}"
        )
    return PackedEmbedding.from_embedding(emb, settings.bits)


def _tied_output(model: nn.Module, emb_name: str, emb: nn.Embedding) -> str | None:
    """Name of the output layer that shares ``emb``'s weight tensor, if any."""
    for name, module in model.named_modules():
        if name != emb_name and isinstance(module, nn.Linear) and module.weight is emb.weight:
            return name
    return None


def structured_fractions(model: nn.Module, plan: CompressionPlan) -> dict[tuple[str, Kind], float]:
    """The plan's structured settings resolved per (block, "heads" | "neurons")."""
    blocks = structured_blocks(model)
    unknown = [k for k in plan.structured if not k.startswith("re:") and k not in blocks]
    if unknown:
        raise ValueError(
            f"plan.structured names blocks the model does not have: {unknown[:5]}; "
            f"its blocks look like {blocks[:3]}"
        )
    out: dict[tuple[str, Kind], float] = {}
    for block in blocks:
        settings = plan.structured_for(block)
        if settings is not None and not settings.is_off:
            out[(block, "heads")] = settings.heads
            out[(block, "neurons")] = settings.neurons
    return out


def apply_plan(
    model: nn.Module, plan: CompressionPlan, calibration: Mapping[str, Tensor] | None = None
) -> nn.Module:
    """Compress ``model`` in place as ``plan`` says and return it (see ``compress``)."""
    compress(model, plan, calibration)
    return model


def compress(
    model: nn.Module, plan: CompressionPlan, calibration: Mapping[str, Tensor] | None = None
) -> CompressionPlan:
    """Compress ``model`` in place as ``plan`` says; returns the plan as applied, with the
    heads and neurons structured pruning kept in its ``selection``, so that applying the
    returned plan to the same baseline rebuilds this model exactly, with no calibration.
    An all-off plan changes nothing.

    ``calibration`` is a small batch of model inputs (keyword arguments of ``model(...)``,
    e.g. ``input_ids`` and ``attention_mask``) used only to choose which heads and neurons
    structured pruning removes, by weight times activation norm, for units the plan's
    selection does not name. When it is None, structured pruning falls back to weight
    magnitude alone. Other methods ignore it.
    """
    unknown = [k for k in plan.layers if not k.startswith("re:") and k not in compressible_modules(model)]
    if unknown:
        raise ValueError(
            f"plan names layers the model does not have: {unknown[:5]}; "
            f"compressible layers look like {list(compressible_modules(model))[:3]}"
        )
    fractions = structured_fractions(model, plan)
    selection = prune_structured(model, fractions, calibration, plan.selection) if fractions else {}
    modules = compressible_modules(model)  # after pruning: shapes (and objects) changed
    for name, settings in plan.active(modules).items():
        module = modules[name]
        if isinstance(module, nn.Embedding):
            tied = _tied_output(model, name, module)
            packed = compress_embedding(module, settings)
            model.set_submodule(name, packed)
            if tied is not None and not plan.active([tied]) and isinstance(packed, PackedEmbedding):
                model.set_submodule(tied, TiedHead(packed))
        elif isinstance(module, nn.Linear):
            model.set_submodule(name, compress_linear(module, settings))
    return replace(plan, selection=selection)
