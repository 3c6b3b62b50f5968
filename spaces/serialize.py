"""The on-disk form of a compressed model: one safetensors file whose metadata holds the plan.

Size objectives are the length of exactly these bytes, so a reported size is what an
export writes.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load, save
from torch import Tensor, nn

from slimsearch.spaces.apply import apply_plan
from slimsearch.spaces.plan import CompressionPlan


def state_tensors(model: nn.Module) -> tuple[dict[str, Tensor], dict[str, str]]:
    """The model's state with shared tensors (tied weights) stored once.

    Returns the tensors and an alias map {dropped name: kept name}.
    """
    tensors: dict[str, Tensor] = {}
    aliases: dict[str, str] = {}
    seen: dict[tuple[int, int, tuple[int, ...]], str] = {}
    for name, tensor in model.state_dict().items():
        key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape))
        if key in seen:
            aliases[name] = seen[key]
            continue
        seen[key] = name
        tensors[name] = tensor.detach().contiguous()
    return tensors, aliases


def state_digest(model: nn.Module) -> str:
    """sha256 of the model's stored state: every tensor's name, dtype, shape and bytes, and
    which names share a tensor. Equal digests mean the same weights, bit for bit."""
    tensors, aliases = state_tensors(model)
    digest = hashlib.sha256(json.dumps(sorted(aliases.items())).encode())
    for name in sorted(tensors):
        tensor = tensors[name].cpu().contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        if tensor.numel():
            digest.update(tensor.reshape(-1).view(torch.uint8).numpy().data)  # a view, no copy
    return digest.hexdigest()


def to_bytes(model: nn.Module, plan: CompressionPlan) -> bytes:
    tensors, aliases = state_tensors(model)
    metadata = {"slimsearch_plan": plan.to_json(), "aliases": json.dumps(aliases)}
    return save(tensors, metadata=metadata)


def serialized_size(model: nn.Module, plan: CompressionPlan) -> int:
    """Bytes of the safetensors file ``save_compressed`` would write for this model."""
    return len(to_bytes(model, plan))


def save_compressed(model: nn.Module, plan: CompressionPlan, path: str | Path) -> int:
    data = to_bytes(model, plan)
    Path(path).write_bytes(data)
    return len(data)


def load_tensors(path: str | Path) -> dict[str, Tensor]:
    return load(Path(path).read_bytes())


def read_metadata(path: str | Path) -> tuple[CompressionPlan, dict[str, str]]:
    """The plan and alias map stored in a file written by ``save_compressed``."""
    with safe_open(str(path), framework="pt") as handle:
        metadata: Mapping[str, str] = handle.metadata() or {}
    if "slimsearch_plan" not in metadata:
        raise ValueError(f"{path} holds no slimsearch plan: it was not written by save_compressed")
    return CompressionPlan.from_json(metadata["slimsearch_plan"]), json.loads(metadata.get("aliases", "{}"))


def load_compressed(path: str | Path, skeleton: nn.Module) -> tuple[nn.Module, CompressionPlan]:
    """Rebuild a saved compressed model: apply its plan to ``skeleton`` (an uncompressed model
    of the same config, any weights), which gives every layer its compressed shape, then load
    the saved tensors into it. Returns the model (in eval mode) and its plan."""
    plan, aliases = read_metadata(path)
    apply_plan(skeleton, plan, skeleton=True)  # only the shapes matter: the weights are replaced
    tensors = load_tensors(path)
    for dropped, kept in aliases.items():
        tensors[dropped] = tensors[kept]
    skeleton.load_state_dict(tensors, strict=True)
    return skeleton.eval(), plan
