"""Apply a CompressionPlan to a model, in place.

The registered methods always run in stage order (registry.STAGES), whatever order the plan
lists things in: block methods first (structured pruning shrinks Linear shapes), then, within
each Linear, factorization (whose factors are what gets stored), sparsity (which entries are
kept) and quantization (how the kept values are stored). Later stages see the shapes earlier
ones left. Structured pruning refuses a model whose Linears were already replaced, so a plan
cannot be applied on top of another one.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import replace
from functools import partial
from typing import Any

from torch import Tensor, nn

from slimsearch.spaces.methods import registry
from slimsearch.spaces.methods.calibration import CalibrationStats, LayerStats, NeutralStats, capture
from slimsearch.spaces.methods.packed import PackedEmbedding, PackedLinear, TiedHead
from slimsearch.spaces.methods.registry import LinearWork, Method
from slimsearch.spaces.plan import CompressionPlan, Settings


def compressible_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Every Linear and Embedding of the model, by fully qualified name."""
    return {
        name: module
        for name, module in model.named_modules()
        if isinstance(module, (nn.Linear, nn.Embedding))
    }


def block_layouts(model: nn.Module) -> dict[str, Any]:
    """What each block method knows of the model's blocks (``Method.layout``)."""
    return {m.name: m.layout(model) for m in registry.methods("block")}


def block_names(layouts: Mapping[str, Any]) -> list[str]:
    """The blocks some block method can change, in model order, from ``block_layouts``."""
    names = [b for name, layout in layouts.items() for b in registry.get(name).blocks(layout)]
    return list(dict.fromkeys(names))


def structured_blocks(model: nn.Module) -> list[str]:
    """Names of the blocks that some block method (structured pruning) can address."""
    return block_names(block_layouts(model))


def needs(plan: CompressionPlan) -> frozenset[str]:
    """The calibration statistics the methods the plan switches on read."""
    out: set[str] = set()
    for settings in [*plan.layers.values(), *plan.structured.values()]:
        for method, _ in settings.steps():
            out |= method.needs
    return frozenset(out)


def _single(steps: Sequence[tuple[Method, Any]], stage: str, where: str) -> tuple[Method, Any] | None:
    chosen = [s for s in steps if s[0].stage == stage and s[0].option_of is None]
    if len(chosen) > 1:
        raise ValueError(
            f"{where}: methods {[m.name for m, _ in chosen]} are all {stage} methods; a layer takes one"
        )
    return chosen[0] if chosen else None


def _store(work: LinearWork, steps: Sequence[tuple[Method, Any]], where: str) -> nn.Module:
    for method, value in steps:
        if method.stage == "sparsify" and method.option_of is None:
            work = method.sparsify(work, value)
    quant = _single(steps, "quantize", where)
    if quant is None:
        return PackedLinear.from_work(work, 32)  # sparse values stored as they are
    return quant[0].quantize(work, quant[1])


def compress_linear(
    linear: nn.Linear,
    settings: Settings,
    stats: LayerStats | None = None,
    where: str = "layer",
    memo: dict[Any, Any] | None = None,
) -> nn.Module:
    """The stored form of one Linear under ``settings`` (the layer itself is not changed).

    ``memo`` keeps factorizations by (``where``, method, value), so a caller that stores the
    same layer many ways (the sensitivity profile) factorizes it once per value."""
    steps = settings.steps()
    if steps and all(m.option_of is not None for m, _ in steps):
        return linear  # options without the method they modify change nothing
    bias = linear.bias.detach() if linear.bias is not None else None
    options = {m.name: v for m, v in steps if m.option_of is not None}
    work = LinearWork(linear.weight.detach().float(), bias, stats=stats, options=options)
    later = [s for s in steps if s[0].stage in ("sparsify", "quantize")]
    factor = _single(steps, "factorize", where)
    if factor is None:
        return _store(work, later, where)
    key = (where, factor[0].name, factor[1], tuple(sorted(options.items())))
    if memo is not None and key in memo:
        module, parts = copy.deepcopy(memo[key])
    else:
        module, parts = factor[0].factorize(work, factor[1])
        if memo is not None:
            memo[key] = copy.deepcopy((module, parts))
    if later:
        for attr, part in parts.items():
            setattr(module, attr, _store(replace(part, options=options), later, f"{where}.{attr}"))
    return module


def compress_embedding(emb: nn.Embedding, settings: Settings) -> nn.Module:
    steps = settings.steps()
    other = {m.name: v for m, v in steps if "table" not in m.scopes}
    if other:
        allowed = [m.name for m in registry.methods("table")]
        raise ValueError(
            "embeddings take only "
            + ", ".join(repr(n) for n in allowed)
            + "; got "
            + ", ".join(f"{k}={v}" for k, v in other.items())
        )
    quant = _single(steps, "quantize", "embedding")
    if quant is None:
        return emb
    return quant[0].quantize_table(emb, quant[1])


def _tied_output(model: nn.Module, emb_name: str, emb: nn.Embedding) -> str | None:
    """Name of the output layer that shares ``emb``'s weight tensor, if any."""
    for name, module in model.named_modules():
        if name != emb_name and isinstance(module, nn.Linear) and module.weight is emb.weight:
            return name
    return None


def block_values(plan: CompressionPlan, layouts: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """For each block method the plan switches on: block name -> its value."""
    blocks = block_names(layouts)
    unknown = [k for k in plan.structured if not k.startswith("re:") and k not in blocks]
    if unknown:
        raise ValueError(
            f"plan.structured names blocks the model does not have: {unknown[:5]}; "
            f"its blocks look like {blocks[:3]}"
        )
    out: dict[str, dict[str, Any]] = {}
    for block in blocks:
        settings = plan.structured_for(block)
        for method, value in settings.steps() if settings is not None else []:
            out.setdefault(method.name, {})[block] = value
    return out


def layer_stats(stats: CalibrationStats | None, name: str, module: nn.Module) -> LayerStats | None:
    """The baseline statistics of a Linear's input, where its input is still the baseline's
    (structured pruning that removed input columns makes them not apply)."""
    layer = stats.layer(name) if stats is not None else None
    if layer is None or not isinstance(module, nn.Linear):
        return None
    width = layer.act_sq.shape[0] if layer.act_sq is not None else layer.hessian.shape[0]  # type: ignore[union-attr]
    return layer if width == module.in_features else None


def apply_plan(
    model: nn.Module,
    plan: CompressionPlan,
    calibration: Mapping[str, Tensor] | None = None,
    stats: CalibrationStats | None = None,
    skeleton: bool = False,
    store: Any = None,
) -> nn.Module:
    """Compress ``model`` in place as ``plan`` says and return it (see ``compress``)."""
    compress(model, plan, calibration, stats, skeleton, store)
    return model


def compress(
    model: nn.Module,
    plan: CompressionPlan,
    calibration: Mapping[str, Tensor] | None = None,
    stats: CalibrationStats | None = None,
    skeleton: bool = False,
    store: Any = None,
) -> CompressionPlan:
    """Compress ``model`` in place as ``plan`` says; returns the plan as applied, with what
    block methods kept (the heads and neurons of structured pruning) in its ``selection``, so
    that applying the returned plan to the same baseline rebuilds this model exactly, with
    no calibration. An all-off plan changes nothing.

    ``stats`` are the baseline's calibration statistics (calibration.capture), which methods
    that declare ``needs`` read; when None and ``calibration`` (a small batch of model inputs,
    keyword arguments of ``model(...)``) is given, they are captured from it first. Without
    either, structured pruning ranks by weight magnitude alone and methods that require
    statistics refuse. ``skeleton=True`` builds only the compressed shapes, for weights that
    will be loaded over them (methods get neutral statistics; see calibration.NeutralStats).
    ``store`` (a ``slimsearch.spaces.store.LayerStore``) returns each Linear's result from
    disk when it was computed before, from the same weights, settings and statistics.
    """
    modules = compressible_modules(model)
    unknown = [k for k in plan.layers if not k.startswith("re:") and k not in modules]
    if unknown:
        raise ValueError(
            f"plan names layers the model does not have: {unknown[:5]}; "
            f"compressible layers look like {list(modules)[:3]}"
        )
    # Found before anything changes; a plan without block settings needs none.
    layouts = block_layouts(model) if plan.structured else {}
    per_block = block_values(plan, layouts)
    wanted = needs(plan)
    if wanted and skeleton:
        stats = NeutralStats.of(model, wanted)
    elif wanted and calibration is not None and (stats is None or not stats.covers(wanted)):
        stats = capture(model, [calibration], wanted)
    selection: dict[str, str] = {}
    columns: dict[str, Tensor] = {}
    for method, values in _block_order(per_block):
        selection.update(method.apply_blocks(model, values, stats, plan.selection))
        columns.update(method.kept_columns(layouts[method.name], values, selection))
    if skeleton:
        from slimsearch.spaces.methods.structured import check_rebuilt

        check_rebuilt(model, selection, plan.selection)
    if stats is not None:
        stats = stats.narrowed(columns)  # the statistics follow the columns structured pruning cut
    modules = compressible_modules(model)  # after pruning: shapes (and objects) changed
    for name, settings in plan.active(modules).items():
        _compress_layer(model, plan, name, modules[name], settings, stats, None if skeleton else store)
    return replace(plan, selection=selection)


def _block_order(per_block: Mapping[str, dict[str, Any]]) -> Iterable[tuple[Method, dict[str, Any]]]:
    for method, _ in registry.in_stage_order(dict.fromkeys(per_block)):
        yield method, per_block[method.name]


def _compress_layer(
    model: nn.Module,
    plan: CompressionPlan,
    name: str,
    module: nn.Module,
    settings: Settings,
    stats: CalibrationStats | None,
    store: Any,
) -> None:
    """Replace one Linear or embedding table by its compressed form (from ``store`` when it
    holds it); a packed table's tied output layer, unless the plan compresses it too, reads
    the packed table."""
    if isinstance(module, nn.Embedding):
        tied = _tied_output(model, name, module)
        if store is None or type(module) is not nn.Embedding:  # scaled tables are checked each time
            packed = compress_embedding(module, settings)
        else:
            key = store.key(module, settings, None)
            packed = store.get_or_compute(key, partial(compress_embedding, module, settings))
        model.set_submodule(name, packed)
        if tied is not None and not plan.active([tied]) and isinstance(packed, PackedEmbedding):
            model.set_submodule(tied, TiedHead(packed))
    elif isinstance(module, nn.Linear):
        own = layer_stats(stats, name, module)
        compute = partial(compress_linear, module, settings, own, name)
        stored = (
            compute() if store is None else store.get_or_compute(store.key(module, settings, own), compute)
        )
        model.set_submodule(name, stored)
