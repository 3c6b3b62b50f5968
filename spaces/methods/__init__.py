"""Compression methods: torch only, no Optuna. Each method is one registered module (see
registry.py); importing this package registers the built-in ones: sparsity, wanda,
sparsegpt, bits (with its options group, weight_only, awq and gptq), rank (with whiten),
heads, neurons and drop (listed in that order: ``Method.position``)."""

from slimsearch.spaces.methods import registry
from slimsearch.spaces.methods.awq import AWQ
from slimsearch.spaces.methods.bits import Bits, Group, WeightOnly
from slimsearch.spaces.methods.depth import Drop, DroppedBlock
from slimsearch.spaces.methods.gptq import GPTQ
from slimsearch.spaces.methods.lowrank import LowRankLinear, Rank, Whiten, max_useful_rank
from slimsearch.spaces.methods.packed import PackedEmbedding, PackedLinear, TiedHead
from slimsearch.spaces.methods.pruning import Sparsity, magnitude_mask
from slimsearch.spaces.methods.registry import LinearWork, Method, register
from slimsearch.spaces.methods.sparsegpt import SparseGPT
from slimsearch.spaces.methods.structured import Heads, Neurons
from slimsearch.spaces.methods.wanda import Wanda

__all__ = [
    "AWQ",
    "GPTQ",
    "Bits",
    "Drop",
    "DroppedBlock",
    "Group",
    "Heads",
    "LinearWork",
    "LowRankLinear",
    "Method",
    "Neurons",
    "PackedEmbedding",
    "PackedLinear",
    "Rank",
    "SparseGPT",
    "Sparsity",
    "TiedHead",
    "Wanda",
    "WeightOnly",
    "Whiten",
    "magnitude_mask",
    "max_useful_rank",
    "register",
    "registry",
]
