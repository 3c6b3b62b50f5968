"""Calibration statistics: what the layers of the baseline see on real training rows.

Captured once, in forward passes over the uncompressed model, and shared by every method
that reads them (``Method.needs``), in trials, sensitivity and export alike:
- ``act_sq``: per Linear, per input column, the sum of squared inputs over real tokens
  (padding, where ``attention_mask`` marks it, does not count); its square root is the
  activation norm that Wanda-style scores and structured pruning use;
- ``hessian``: per Linear, X^T X summed over real tokens (the proxy GPTQ and SparseGPT use).
Hessians of a large model do not fit at once, so they are captured in as many passes as a
memory budget needs, each pass keeping only its share of layers.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor, nn

KINDS = ("act_sq", "hessian")
# Bumped whenever the same rows give different statistics, so cached files are not reused.
STATS_VERSION = 1
HESSIAN_BUDGET_BYTES = 2 << 30


@dataclass(frozen=True)
class LayerStats:
    """The statistics of one Linear's input."""

    act_sq: Tensor | None
    hessian: Tensor | None
    tokens: int

    def norms(self) -> Tensor:
        if self.act_sq is None:
            raise ValueError("these statistics hold no act_sq: capture them with needs including 'act_sq'")
        return self.act_sq.sqrt()


@dataclass
class CalibrationStats:
    """Statistics per Linear name; ``kinds`` says which were captured."""

    kinds: frozenset[str]
    tokens: int = 0
    act_sq: dict[str, Tensor] = field(default_factory=dict)
    hessian: dict[str, Tensor] = field(default_factory=dict)

    def covers(self, needs: Iterable[str]) -> bool:
        return set(needs) <= self.kinds

    def layer(self, name: str) -> LayerStats | None:
        if name not in self.act_sq and name not in self.hessian:
            return None
        return LayerStats(self.act_sq.get(name), self.hessian.get(name), self.tokens)

    def narrowed(self, columns: Mapping[str, Tensor]) -> CalibrationStats:
        """These statistics after Linears lost input columns (``columns``: the kept ones)."""
        if not columns:
            return self
        out = CalibrationStats(self.kinds, self.tokens, dict(self.act_sq), dict(self.hessian))
        for name, kept in columns.items():
            if name in out.act_sq:
                out.act_sq[name] = out.act_sq[name][kept]
            if name in out.hessian:
                out.hessian[name] = out.hessian[name][kept][:, kept]
        return out

    def save(self, path: str | Path) -> None:
        tensors = {f"act_sq/{k}": v.contiguous() for k, v in self.act_sq.items()}
        tensors |= {f"hessian/{k}": v.contiguous() for k, v in self.hessian.items()}
        meta = {
            "kinds": json.dumps(sorted(self.kinds)),
            "tokens": str(self.tokens),
            "version": str(STATS_VERSION),
        }
        save_file(tensors, str(path), metadata=meta)

    @classmethod
    def load(cls, path: str | Path) -> CalibrationStats:
        with safe_open(str(path), framework="pt") as handle:
            meta = handle.metadata() or {}
            if meta.get("version") != str(STATS_VERSION):
                raise ValueError(
                    f"{path}: calibration statistics of version {meta.get('version')}, not {STATS_VERSION}"
                )
            out = cls(frozenset(json.loads(meta["kinds"])), int(meta["tokens"]))
            for key in handle.keys():  # noqa: SIM118 (safe_open has no __iter__)
                kind, _, name = key.partition("/")
                getattr(out, kind)[name] = handle.get_tensor(key)
        return out


class NeutralStats(CalibrationStats):
    """Stand-in statistics for building a skeleton (shapes only; the weights are replaced by
    saved ones afterwards): every input column counts the same (act_sq ones, hessian the
    identity), built per layer on demand. A method's stored shapes must depend on its value
    and the layer's shape only, never on the statistics; the conformance round trip checks it."""

    def __init__(self, widths: Mapping[str, int], kinds: Iterable[str]) -> None:
        super().__init__(frozenset(kinds), tokens=1)
        self._widths = dict(widths)  # input columns per Linear name

    @classmethod
    def of(cls, model: nn.Module, kinds: Iterable[str]) -> NeutralStats:
        return cls({n: m.in_features for n, m in model.named_modules() if isinstance(m, nn.Linear)}, kinds)

    def narrowed(self, columns: Mapping[str, Tensor]) -> CalibrationStats:
        return NeutralStats({**self._widths, **{n: int(c.numel()) for n, c in columns.items()}}, self.kinds)

    def layer(self, name: str) -> LayerStats | None:
        width = self._widths.get(name)
        if width is None:
            return None
        act = torch.ones(width) if "act_sq" in self.kinds else None
        hessian = torch.eye(width) if "hessian" in self.kinds else None
        return LayerStats(act, hessian, self.tokens)


def _real_rows(x: Tensor, mask: Tensor | None) -> Tensor:
    """The input as (tokens, features), padding rows zeroed."""
    x = x.detach().float()
    if mask is not None and x.dim() == 3 and tuple(x.shape[:2]) == tuple(mask.shape):
        x = x * mask.to(x.dtype)[..., None]
    return x.reshape(-1, x.shape[-1])


def _real_tokens(batch: Mapping[str, Tensor]) -> int:
    mask = batch.get("attention_mask")
    if mask is not None:
        return int(mask.sum())
    ids = batch.get("input_ids")
    return int(ids.numel()) if ids is not None else 0


def capture(
    model: nn.Module,
    batches: Sequence[Mapping[str, Tensor]],
    needs: Iterable[str],
    names: Sequence[str] | None = None,
    hessian_budget: int = HESSIAN_BUDGET_BYTES,
    progress: Callable[[str], None] | None = None,
) -> CalibrationStats:
    """Statistics of ``needs`` for the Linears ``names`` (default: every Linear) over
    ``batches`` (keyword inputs of ``model``; labels are ignored). Eval mode, no gradients:
    the same batches always give the same statistics."""
    kinds = frozenset(needs)
    unknown = kinds - set(KINDS)
    if unknown:
        raise ValueError(f"unknown calibration statistics {sorted(unknown)}; the kinds are {list(KINDS)}")
    linears = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    chosen = list(linears) if names is None else list(names)
    missing = [n for n in chosen if n not in linears]
    if missing:
        raise ValueError(f"calibration statistics asked for layers that are not Linears: {missing[:3]}")
    stats = CalibrationStats(kinds, tokens=sum(_real_tokens(b) for b in batches))
    # Each pass hooks {layer: (act_sq, hessian)}: activations all in the first pass, Hessians
    # in as many passes as the budget needs.
    passes: list[dict[str, tuple[bool, bool]]] = [{n: ("act_sq" in kinds, False) for n in chosen}]
    if "hessian" in kinds:
        used = 0
        for name in chosen:
            size = linears[name].in_features ** 2 * 4
            if used and used + size > hessian_budget:
                passes.append({})
                used = 0
            act, _ = passes[-1].get(name, (False, False))
            passes[-1][name] = (act, True)
            used += size
    passes = [p for p in passes if any(act or hess for act, hess in p.values())]
    for index, hooks in enumerate(passes):
        if progress is not None and len(passes) > 1:
            progress(f"calibration statistics: pass {index + 1} of {len(passes)} ({len(hooks)} layers)")
        _one_pass(model, batches, {linears[n]: (n, *flags) for n, flags in hooks.items()}, stats)
    missed = [
        n
        for n in chosen
        if ("act_sq" in kinds and n not in stats.act_sq) or ("hessian" in kinds and n not in stats.hessian)
    ]
    if missed:
        raise ValueError(f"the calibration forward pass never reached {missed[:3]}; check the batch's keys")
    return stats


def _one_pass(
    model: nn.Module,
    batches: Sequence[Mapping[str, Tensor]],
    hooks: Mapping[nn.Linear, tuple[str, bool, bool]],
    stats: CalibrationStats,
) -> None:
    """One forward pass over ``batches``, adding to ``stats`` what ``hooks`` asks of each
    Linear: (its name, act_sq?, hessian?)."""
    mask: list[Tensor | None] = [None]

    def hook(name: str, act: bool, hess: bool) -> Callable[..., None]:
        def record(_module: nn.Module, inputs: tuple[Any, ...]) -> None:
            rows = _real_rows(inputs[0], mask[0])
            if act:
                total = rows.pow(2).sum(dim=0)
                stats.act_sq[name] = stats.act_sq[name] + total if name in stats.act_sq else total
            if hess:
                gram = rows.T @ rows
                stats.hessian[name] = stats.hessian[name] + gram if name in stats.hessian else gram

        return record

    handles = [linear.register_forward_pre_hook(hook(*spec)) for linear, spec in hooks.items()]
    training = model.training
    model.eval()  # dropout off
    try:
        with torch.no_grad():
            for batch in batches:
                mask[0] = batch.get("attention_mask")
                model(**{k: v for k, v in batch.items() if k != "labels"})
    finally:
        model.train(training)
        for handle in handles:
            handle.remove()
