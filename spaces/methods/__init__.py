"""Compression methods: torch only, no Optuna. Each method is one registered module (see
registry.py); importing this package registers the built-in ones: sparsity, bits, rank,
heads and neurons (listed in that order: ``Method.position``)."""

from slimsearch.spaces.methods import registry
from slimsearch.spaces.methods.bits import Bits
from slimsearch.spaces.methods.lowrank import LowRankLinear, Rank, max_useful_rank
from slimsearch.spaces.methods.packed import PackedEmbedding, PackedLinear, TiedHead
from slimsearch.spaces.methods.pruning import Sparsity, magnitude_mask
from slimsearch.spaces.methods.registry import LinearWork, Method, register
from slimsearch.spaces.methods.structured import Heads, Neurons

__all__ = [
    "Bits",
    "Heads",
    "LinearWork",
    "LowRankLinear",
    "Method",
    "Neurons",
    "PackedEmbedding",
    "PackedLinear",
    "Rank",
    "Sparsity",
    "TiedHead",
    "magnitude_mask",
    "max_useful_rank",
    "register",
    "registry",
]
