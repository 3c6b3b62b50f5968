"""Apply a CompressionPlan to a model, in place.

Within one Linear the steps run in a fixed order: factorize (rank), then sparsify (the
factors are what gets stored, so they are what is pruned), then quantize the kept values.
"""

from __future__ import annotations

from torch import nn

from slimsearch.spaces.methods import LowRankLinear, PackedEmbedding, PackedLinear, TiedHead
from slimsearch.spaces.plan import CompressionPlan, LayerSettings


def compressible_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Every Linear and Embedding of the model, by fully qualified name."""
    return {
        name: module
        for name, module in model.named_modules()
        if isinstance(module, (nn.Linear, nn.Embedding))
    }


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


def apply_plan(model: nn.Module, plan: CompressionPlan) -> nn.Module:
    """Compress ``model`` in place as ``plan`` says and return it. An all-off plan changes nothing."""
    modules = compressible_modules(model)
    active = plan.active(modules)
    unknown = [k for k in plan.layers if not k.startswith("re:") and k not in modules]
    if unknown:
        raise ValueError(
            f"plan names layers the model does not have: {unknown[:5]}; "
            f"compressible layers look like {list(modules)[:3]}"
        )
    for name, settings in active.items():
        module = modules[name]
        if isinstance(module, nn.Embedding):
            tied = _tied_output(model, name, module)
            packed = compress_embedding(module, settings)
            model.set_submodule(name, packed)
            if tied is not None and tied not in active and isinstance(packed, PackedEmbedding):
                model.set_submodule(tied, TiedHead(packed))
        elif isinstance(module, nn.Linear):
            model.set_submodule(name, compress_linear(module, settings))
    return model
