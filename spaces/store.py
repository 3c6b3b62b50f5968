"""The layer store: each (layer, settings) result computed once and kept on disk.

A trial assembles its model from stored layers instead of compressing every Linear again.
An entry's key is the sha256 of everything its result depends on: the layer's weight and
bias bytes (so a layer that structured pruning cut, or another baseline, is another key),
the settings, the versions of the methods involved, and the calibration statistics of the
layer where a method reads them. A result that no longer matches its baseline or a method's
version therefore has another key and is computed again, never reused.

Entries are safetensors files whose metadata describes the module to rebuild; the built-in
module types (PackedLinear, LowRankLinear, nn.Linear) are stored, a method's own module type
is computed each time.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import Tensor, nn

from slimsearch.spaces.methods.calibration import LayerStats
from slimsearch.spaces.methods.lowrank import LowRankLinear
from slimsearch.spaces.methods.packed import PackedEmbedding, PackedLinear
from slimsearch.spaces.methods.quantize import GROUP_SIZE
from slimsearch.spaces.plan import Settings

STORE_FORMAT = 1
# A night of distinct settings on a large model can fill a disk: the store keeps under this.
DEFAULT_MAX_BYTES = 8 << 30


def _bytes(tensor: Tensor) -> memoryview:
    flat = tensor.detach().contiguous().reshape(-1)
    return flat.view(torch.uint8).numpy().data if flat.numel() else memoryview(b"")


def _buffers(module: nn.Module, prefix: str, tensors: dict[str, Tensor]) -> list[str]:
    """The module's own buffers, added to ``tensors``; their names in registration order."""
    names = []
    for name, buffer in module.named_buffers(recurse=False):
        tensors[prefix + name] = buffer.detach().contiguous()
        names.append(name)
    return names


def _spec(module: nn.Module, prefix: str, tensors: dict[str, Tensor]) -> dict[str, Any] | None:
    """A JSON description of ``module`` (None: a type the store does not know), its tensors
    added to ``tensors`` under ``prefix``."""
    if isinstance(module, PackedLinear):
        return {
            "type": "PackedLinear",
            "in": module.in_features,
            "out": module.out_features,
            "bits": module.bits,
            "sparse": module.sparse,
            "made_by": list(module.made_by),
            "group": module.group,
            "weight_only": module.weight_only,
            "buffers": _buffers(module, prefix, tensors),
        }
    if isinstance(module, PackedEmbedding):
        return {
            "type": "PackedEmbedding",
            "num": module.num_embeddings,
            "dim": module.embedding_dim,
            "bits": module.bits,
            "padding_idx": module.padding_idx,
            "lookup_scale": module.lookup_scale,
            "buffers": _buffers(module, prefix, tensors),
        }
    if type(module) is nn.Linear:
        for name, param in module.named_parameters(recurse=False):
            tensors[prefix + name] = param.detach().contiguous()
        return {
            "type": "Linear",
            "in": module.in_features,
            "out": module.out_features,
            "bias": module.bias is not None,
        }
    if type(module) is LowRankLinear:
        down = _spec(module.get_submodule("down"), prefix + "down.", tensors)
        up = _spec(module.get_submodule("up"), prefix + "up.", tensors)
        if down is None or up is None:
            return None
        return {
            "type": "LowRankLinear",
            "in": module.in_features,
            "out": module.out_features,
            "rank": module.rank,
            "down": down,
            "up": up,
        }
    return None


def _build(spec: dict[str, Any], prefix: str, tensors: dict[str, Tensor]) -> nn.Module:
    kind = spec["type"]
    if kind == "PackedLinear":
        out = PackedLinear(
            spec["in"],
            spec["out"],
            spec["bits"],
            spec["sparse"],
            tuple(spec["made_by"]),
            spec.get("group", GROUP_SIZE),
            spec.get("weight_only", False),
        )
        for name in spec["buffers"]:
            out.register_buffer(name, tensors[prefix + name])
        return out
    if kind == "PackedEmbedding":
        table = PackedEmbedding(
            spec["num"], spec["dim"], spec["bits"], spec["padding_idx"], spec["lookup_scale"]
        )
        for name in spec["buffers"]:
            table.register_buffer(name, tensors[prefix + name])
        return table
    if kind == "Linear":
        linear = nn.Linear(spec["in"], spec["out"], bias=spec["bias"])
        with torch.no_grad():
            linear.weight.copy_(tensors[prefix + "weight"])
            if spec["bias"]:
                linear.bias.copy_(tensors[prefix + "bias"])
        return linear
    if kind == "LowRankLinear":
        down = _build(spec["down"], prefix + "down.", tensors)
        up = _build(spec["up"], prefix + "up.", tensors)
        return LowRankLinear(down, up, spec["in"], spec["out"], spec["rank"])
    raise ValueError(
        f"layer store entry of unknown type {kind!r}; the store holds PackedLinear, LowRankLinear, Linear"
    )


class LayerStore:
    """Compressed layers (Linears and embedding tables) on disk under ``folder``;
    ``hits``, ``misses`` and ``skipped`` (results of a type the store does not hold) count
    lookups."""

    def __init__(self, folder: str | Path, max_bytes: int | None = DEFAULT_MAX_BYTES) -> None:
        self.folder = Path(folder)
        self.max_bytes = max_bytes
        self.hits = 0
        self.misses = 0
        self.skipped = 0
        self._size: int | None = None  # bytes on disk, counted once and then kept up to date

    @staticmethod
    def key(layer: nn.Linear | nn.Embedding, settings: Settings, stats: LayerStats | None) -> str:
        digest = hashlib.sha256()
        steps = settings.steps()
        ident = {
            "format": STORE_FORMAT,
            "settings": sorted((m.name, repr(v)) for m, v in steps),
            "versions": sorted((m.name, m.version) for m, _ in steps),
            "layer": type(layer).__name__,
            "shape": list(layer.weight.shape),
        }
        digest.update(json.dumps(ident).encode())
        digest.update(_bytes(layer.weight))
        bias = getattr(layer, "bias", None)
        if isinstance(bias, Tensor):
            digest.update(b"bias")
            digest.update(_bytes(bias))
        if stats is not None and any(m.needs for m, _ in steps):
            for tensor in (stats.act_sq, stats.hessian):
                digest.update(b"|" if tensor is None else _bytes(tensor.float()))
        return digest.hexdigest()

    def path(self, key: str) -> Path:
        return self.folder / key[:2] / f"{key}.safetensors"

    def get_or_compute(self, key: str, compute: Callable[[], nn.Module]) -> nn.Module:
        path = self.path(key)
        if path.is_file():
            try:
                module = self._load(path)
            except (OSError, ValueError, KeyError, RuntimeError, SafetensorError):
                path.unlink(missing_ok=True)  # a damaged entry is computed again, never trusted
            else:
                self.hits += 1
                return module
        module = compute()
        tensors: dict[str, Tensor] = {}
        spec = _spec(module, "", tensors)
        if spec is None:
            self.skipped += 1
            return module
        self.misses += 1
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            save_file(tensors, str(tmp), metadata={"spec": json.dumps(spec), "format": str(STORE_FORMAT)})
            tmp.replace(path)  # whole or not at all, even with workers racing
            self._grow(path.stat().st_size)
        except OSError:
            tmp.unlink(missing_ok=True)  # a full or read-only disk costs the reuse, never the trial
        return module

    def _grow(self, added: int) -> None:
        """Keep the store under ``max_bytes``: past it, the least recently written entries go
        (down to 90%, so it does not evict on every write)."""
        if self.max_bytes is None:
            return
        self._size = self.size_bytes() if self._size is None else self._size + added
        if self._size <= self.max_bytes:
            return
        entries = sorted(self.folder.rglob("*.safetensors"), key=lambda p: p.stat().st_mtime)
        total = sum(p.stat().st_size for p in entries)
        for entry in entries:
            if total <= 0.9 * self.max_bytes:
                break
            total -= entry.stat().st_size
            entry.unlink(missing_ok=True)
        self._size = total

    @staticmethod
    def _load(path: Path) -> nn.Module:
        with safe_open(str(path), framework="pt") as handle:
            meta = handle.metadata() or {}
            if meta.get("format") != str(STORE_FORMAT):
                raise ValueError(f"{path}: store format {meta.get('format')}, not {STORE_FORMAT}")
            tensors = {k: handle.get_tensor(k) for k in handle.keys()}  # noqa: SIM118
        return _build(json.loads(meta["spec"]), "", tensors)

    def size_bytes(self) -> int:
        if not self.folder.is_dir():
            return 0
        return sum(p.stat().st_size for p in self.folder.rglob("*.safetensors"))
