"""Structured pruning: remove whole attention heads and FFN neurons by shrinking Linears.

Both are one operation. A *unit* is a set of equal-width channel groups that some Linears
produce (their output rows) and one Linear consumes (its input columns): the query/key/
value projections and the attention output projection, or the up (and gate) projections and
the down projection. Removing a group deletes its rows from every producer and its columns
from the consumer, so the model computes exactly what it did minus that group.

Under grouped-query attention a group is one key/value head together with the query heads
that share it, so the ratio of query to key/value heads (``num_key_value_groups``) never
changes. Multi-head attention is the case of one query head per group.

Importance (which groups go): with a calibration batch, each consumer column j scores
``||W[:, j]|| * ||X_j||`` (weight times the norm of its input activation over the batch's
real tokens, as in Wanda); a group scores the sum of its columns. Without calibration the
score falls back to weights alone: the norm of the group's consumer columns times the norm
of its producer rows.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch
from torch import Tensor, nn

from slimsearch.spaces.methods.calibration import CalibrationStats, capture
from slimsearch.spaces.methods.registry import BOTH, QAT, Method, Scope, Stage, is_fraction, register

Kind = Literal["heads", "neurons"]


@dataclass(frozen=True)
class Unit:
    """One prunable structure. ``producers`` are (Linear name, output rows per group);
    ``consumer`` is (Linear name, input columns per group). ``sections`` are parts of a fused
    Linear (name, output rows per group, first row of the part): a qkv projection that puts
    all queries first, then keys, then values, is three sections of one Linear."""

    kind: Kind
    block: str
    owner: str
    producers: tuple[tuple[str, int], ...]
    consumer: tuple[str, int]
    groups: int
    heads_per_group: int = 1
    head_dim: int = 0
    sections: tuple[tuple[str, int, int], ...] = ()
    # The owner's forward reads its head counts from ``owner.config`` (Phi-3): a pruned layer
    # gets its own copy of the config with its own counts.
    config_heads: bool = False
    # Only query heads are groups; the one key/value head all of them read stays (Falcon MQA):
    # its rows, (name, first row, count), are kept whatever is pruned.
    shared_kv: bool = False
    kept_rows: tuple[tuple[str, int, int], ...] = ()
    # The keyword the owner's forward takes its ALiBi bias by ("alibi": BLOOM's, batch by
    # head; "position_bias": MPT's, head first). The model builds it for all its heads, so a
    # pruned layer picks its kept heads' rows (``_alibi_of_kept_heads``).
    alibi: str = ""

    def row_parts(self) -> dict[str, list[tuple[int, int]]]:
        """Each producing Linear's parts as (first row, rows per group), in row order."""
        parts: dict[str, list[tuple[int, int]]] = {}
        for name, rows in self.producers:
            parts.setdefault(name, []).append((0, rows))
        for name, rows, first in self.sections:
            parts.setdefault(name, []).append((first, rows))
        return {name: sorted(p) for name, p in parts.items()}

    def linears(self) -> list[str]:
        return [*self.row_parts(), self.consumer[0]]


def _parent(name: str) -> str:
    return name.rsplit(".", 1)[0] if "." in name else ""


def _join(*parts: str) -> str:
    return ".".join(p for p in parts if p)


def _width(module: nn.Module, attr: str) -> int:
    value = getattr(module, attr, None)
    if not isinstance(value, int):
        raise ValueError(f"{type(module).__name__} has no integer {attr!r}; cannot prune it structurally")
    return value


def _llama_attention(name: str, module: nn.Module) -> Unit | None:
    """q_proj/k_proj/v_proj/o_proj with a ``head_dim`` (Llama, Mistral, Qwen2, SmolLM2, ...)."""
    if not all(hasattr(module, a) for a in ("q_proj", "k_proj", "v_proj", "o_proj", "head_dim")):
        return None
    head_dim = _width(module, "head_dim")
    heads = _width(module.get_submodule("q_proj"), "out_features") // head_dim
    kv_heads = _width(module.get_submodule("k_proj"), "out_features") // head_dim
    per_group = heads // kv_heads
    return Unit(
        kind="heads",
        block=_parent(name),
        owner=name,
        producers=(
            (_join(name, "q_proj"), per_group * head_dim),
            (_join(name, "k_proj"), head_dim),
            (_join(name, "v_proj"), head_dim),
        ),
        consumer=(_join(name, "o_proj"), per_group * head_dim),
        groups=kv_heads,
        heads_per_group=per_group,
        head_dim=head_dim,
    )


def _bert_attention(name: str, module: nn.Module) -> Unit | None:
    """BertAttention-like: ``self`` with query/key/value, ``output.dense`` consumes them."""
    inner = getattr(module, "self", None)
    out = getattr(getattr(module, "output", None), "dense", None)
    if inner is None or out is None or not all(hasattr(inner, a) for a in ("query", "key", "value")):
        return None
    head_dim = _width(inner, "attention_head_size")
    owner = _join(name, "self")
    return Unit(
        kind="heads",
        block=_parent(name),
        owner=owner,
        producers=tuple((_join(owner, p), head_dim) for p in ("query", "key", "value")),
        consumer=(_join(name, "output.dense"), head_dim),
        groups=_width(inner, "num_attention_heads"),
        head_dim=head_dim,
    )


def _deberta_attention(name: str, module: nn.Module) -> Unit | None:
    """DeBERTa(-v2)'s disentangled attention: ``self`` with query_proj/key_proj/value_proj,
    and, when it does not share them, pos_query_proj/pos_key_proj (per-head projections of
    the relative-position embeddings); ``output.dense`` consumes the heads."""
    inner = getattr(module, "self", None)
    out = getattr(getattr(module, "output", None), "dense", None)
    projections = ("query_proj", "key_proj", "value_proj")
    if inner is None or out is None or not all(hasattr(inner, a) for a in projections):
        return None
    head_dim = _width(inner, "attention_head_size")
    owner = _join(name, "self")
    extra = tuple(
        p for p in ("pos_query_proj", "pos_key_proj") if isinstance(getattr(inner, p, None), nn.Linear)
    )
    return Unit(
        kind="heads",
        block=_parent(name),
        owner=owner,
        producers=tuple((_join(owner, p), head_dim) for p in (*projections, *extra)),
        consumer=(_join(name, "output.dense"), head_dim),
        groups=_width(inner, "num_attention_heads"),
        head_dim=head_dim,
    )


def _gated_mlp(name: str, module: nn.Module) -> Unit | None:
    if not all(hasattr(module, a) for a in ("gate_proj", "up_proj", "down_proj")):
        return None
    return Unit(
        kind="neurons",
        block=_parent(name),
        owner=name,
        producers=((_join(name, "gate_proj"), 1), (_join(name, "up_proj"), 1)),
        consumer=(_join(name, "down_proj"), 1),
        groups=_width(module.get_submodule("up_proj"), "out_features"),
    )


def _bert_mlp(name: str, module: nn.Module) -> Unit | None:
    """BertLayer-like: ``intermediate.dense`` feeds ``output.dense`` (beside ``attention``)."""
    hidden = getattr(getattr(module, "intermediate", None), "dense", None)
    out = getattr(getattr(module, "output", None), "dense", None)
    if hidden is None or out is None or not hasattr(module, "attention"):
        return None
    return Unit(
        kind="neurons",
        block=name,
        owner=_join(name, "intermediate"),
        producers=((_join(name, "intermediate.dense"), 1),),
        consumer=(_join(name, "output.dense"), 1),
        groups=_width(hidden, "out_features"),
    )


# Separate query/key/value/output projections under other names, multi-head (one query
# head per key/value head): OPT, DistilBERT.
_SEPARATE_QKVO = (
    ("q_proj", "k_proj", "v_proj", "out_proj"),
    ("q_lin", "k_lin", "v_lin", "out_lin"),
    ("query", "key", "value", "dense"),  # ALBERT: its projections and output on one module
)


def _is_linear(module: nn.Module, attr: str) -> bool:
    return type(getattr(module, attr, None)) is nn.Linear  # a subclass may compute otherwise


def _separate_attention(name: str, module: nn.Module) -> Unit | None:
    for names in _SEPARATE_QKVO:
        if not all(_is_linear(module, a) for a in names):
            continue
        heads = next(
            (
                getattr(module, a)
                for a in ("num_heads", "n_heads", "num_attention_heads")
                if isinstance(getattr(module, a, None), int)
            ),
            None,
        )
        if heads is None:
            return None
        q, k, v, o = names
        width = _width(module.get_submodule(q), "out_features")
        if any(_width(module.get_submodule(p), "out_features") != width for p in (k, v)) or width % heads:
            return None  # grouped key/value heads under these names: not a layout known here
        head_dim = width // heads
        return Unit(
            kind="heads",
            block=_parent(name),
            owner=name,
            producers=tuple((_join(name, p), head_dim) for p in (q, k, v)),
            consumer=(_join(name, o), head_dim),
            groups=heads,
            head_dim=head_dim,
        )
    return None


def _per_head_fused_attention(name: str, module: nn.Module) -> Unit | None:
    """One ``query_key_value`` Linear whose rows are laid out head by head (each head's
    query, key and value rows together) and whose forward views it by ``head_size`` alone:
    GPT-NeoX. (BLOOM lays rows out the same way but its ALiBi slopes are per head of the
    model, so its heads are not offered; Falcon and MPT put all queries first.)"""
    if not (_is_linear(module, "query_key_value") and _is_linear(module, "dense")):
        return None
    head_size = getattr(module, "head_size", None)
    if not isinstance(head_size, int) or not hasattr(module, "rotary_ndims"):
        return None
    rows = _width(module.get_submodule("query_key_value"), "out_features")
    if rows % (3 * head_size):
        return None
    return Unit(
        kind="heads",
        block=_parent(name),
        owner=name,
        producers=((_join(name, "query_key_value"), 3 * head_size),),
        consumer=(_join(name, "dense"), head_size),
        groups=rows // (3 * head_size),
        head_dim=head_size,
    )


def _falcon_attention(name: str, module: nn.Module) -> Unit | None:
    """Falcon's query_key_value in its three layouts, and dense. New decoder architecture:
    per key/value group its query heads, then its key, then its value. Multi-query: all
    queries, then the one key and value every head reads (only queries are pruned). Else
    head by head, query, key and value together. ALiBi variants are not offered (their
    slopes belong to the model's heads)."""
    if not (_is_linear(module, "query_key_value") and _is_linear(module, "dense")):
        return None
    config = getattr(module, "config", None)
    if not hasattr(module, "new_decoder_architecture") or getattr(config, "alibi", True):
        return None
    heads, kv, head_dim = (getattr(module, a, None) for a in ("num_heads", "num_kv_heads", "head_dim"))
    if not all(isinstance(v, int) and v > 0 for v in (heads, kv, head_dim)):
        return None
    assert isinstance(heads, int) and isinstance(kv, int) and isinstance(head_dim, int)
    qkv, dense = _join(name, "query_key_value"), _join(name, "dense")
    rows = _width(module.get_submodule("query_key_value"), "out_features")
    common: dict[str, Any] = {"kind": "heads", "block": _parent(name), "owner": name, "head_dim": head_dim}
    if module.new_decoder_architecture:
        if heads % kv or rows != (heads + 2 * kv) * head_dim:
            return None
        per_group = heads // kv
        return Unit(
            producers=((qkv, (per_group + 2) * head_dim),),
            consumer=(dense, per_group * head_dim),
            groups=kv,
            heads_per_group=per_group,
            **common,
        )
    if getattr(module, "multi_query", False):
        if rows != (heads + 2) * head_dim:
            return None
        return Unit(
            producers=(),
            sections=((qkv, head_dim, 0),),
            consumer=(dense, head_dim),
            groups=heads,
            shared_kv=True,
            kept_rows=((qkv, heads * head_dim, 2 * head_dim),),
            **common,
        )
    if rows != 3 * heads * head_dim:
        return None
    return Unit(producers=((qkv, 3 * head_dim),), consumer=(dense, head_dim), groups=heads, **common)


def _bloom_attention(name: str, module: nn.Module) -> Unit | None:
    """BLOOM's query_key_value (head by head: each head's query, key and value rows
    together) and dense, with the ALiBi bias picked for the kept heads."""
    if not (_is_linear(module, "query_key_value") and _is_linear(module, "dense")):
        return None
    if not all(hasattr(module, a) for a in ("beta", "inv_norm_factor", "num_heads", "head_dim")):
        return None
    if hasattr(module, "new_decoder_architecture"):
        return None  # Falcon's
    if getattr(module, "pretraining_tp", 1) > 1 and getattr(module, "slow_but_exact", False):
        return None  # its dense is applied in slices of the hidden size
    heads, head_dim = _width(module, "num_heads"), _width(module, "head_dim")
    if _width(module.get_submodule("query_key_value"), "out_features") != 3 * heads * head_dim:
        return None
    return Unit(
        kind="heads",
        block=_parent(name),
        owner=name,
        producers=((_join(name, "query_key_value"), 3 * head_dim),),
        consumer=(_join(name, "dense"), head_dim),
        groups=heads,
        head_dim=head_dim,
        alibi="alibi",
    )


def _mpt_attention(name: str, module: nn.Module) -> Unit | None:
    """MPT's Wqkv (all queries, then keys, then values) and out_proj, with its ALiBi
    position bias picked for the kept heads."""
    if not (_is_linear(module, "Wqkv") and _is_linear(module, "out_proj")):
        return None
    return _three_sections(
        name, module, "Wqkv", "out_proj", getattr(module, "n_heads", None), "position_bias"
    )


def _three_sections(
    name: str, module: nn.Module, fused: str, out: str, heads: Any, alibi: str = ""
) -> Unit | None:
    """A fused Linear of all queries, then all keys, then all values (one head_dim each)."""
    head_dim = getattr(module, "head_dim", None)
    if not isinstance(heads, int) or not isinstance(head_dim, int):
        return None
    width = heads * head_dim
    if _width(module.get_submodule(fused), "out_features") != 3 * width:
        return None
    return Unit(
        kind="heads",
        block=_parent(name),
        owner=name,
        producers=(),
        sections=tuple((_join(name, fused), head_dim, i * width) for i in range(3)),
        consumer=(_join(name, out), head_dim),
        groups=heads,
        head_dim=head_dim,
        alibi=alibi,
    )


def _alibi_of_kept_heads(
    module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> tuple[tuple[Any, ...], dict[str, Any]] | None:
    """Forward pre-hook of a pruned ALiBi attention: its kept heads' rows of the bias."""
    key, total, kept = module.alibi_heads  # type: ignore[misc]
    bias = kwargs.get(key)
    if bias is None:
        return None
    index = torch.tensor(kept, device=bias.device)
    # BLOOM's is (batch * heads, 1, keys), MPT's (heads, 1, keys).
    batched = key == "alibi"
    bias = bias.view(-1, total, *bias.shape[1:])[:, index].flatten(0, 1) if batched else bias[index]
    return args, {**kwargs, key: bias}


def _gpt2_attention(name: str, module: nn.Module) -> Unit | None:
    """GPT-2's c_attn (its Conv1D made Linear; queries, keys, values one after another, split
    by ``split_size``) and c_proj. Cross-attention (``q_attn``) is not offered."""
    if not (_is_linear(module, "c_attn") and _is_linear(module, "c_proj")) or hasattr(module, "q_attn"):
        return None
    if not hasattr(module, "split_size"):
        return None
    return _three_sections(name, module, "c_attn", "c_proj", getattr(module, "num_heads", None))


def _fused_qkv_attention(name: str, module: nn.Module) -> Unit | None:
    """Phi-3's qkv_proj (all query rows, then the key rows, then the value rows; grouped key/
    value heads) and o_proj. Its forward finds the query rows from the config's
    ``num_attention_heads``, which every layer shares, so ``config_heads`` is set."""
    if not (_is_linear(module, "qkv_proj") and _is_linear(module, "o_proj")):
        return None
    config = getattr(module, "config", None)
    head_dim, kv = getattr(module, "head_dim", None), getattr(module, "num_key_value_heads", None)
    heads = getattr(config, "num_attention_heads", None)
    if not all(isinstance(v, int) and v > 0 for v in (head_dim, kv, heads)):
        return None
    assert isinstance(head_dim, int) and isinstance(kv, int) and isinstance(heads, int)
    if heads % kv or _width(module.get_submodule("qkv_proj"), "out_features") != (heads + 2 * kv) * head_dim:
        return None
    per_group = heads // kv
    qkv, queries, keys = _join(name, "qkv_proj"), heads * head_dim, kv * head_dim
    return Unit(
        kind="heads",
        block=_parent(name),
        owner=name,
        producers=(),
        sections=((qkv, per_group * head_dim, 0), (qkv, head_dim, queries), (qkv, head_dim, queries + keys)),
        consumer=(_join(name, "o_proj"), per_group * head_dim),
        groups=kv,
        heads_per_group=per_group,
        head_dim=head_dim,
        config_heads=True,
    )


def _fused_gated_mlp(name: str, module: nn.Module) -> Unit | None:
    """Phi-3's gate_up_proj (gate rows, then up rows; chunked in two) and down_proj."""
    if not (_is_linear(module, "gate_up_proj") and _is_linear(module, "down_proj")):
        return None
    rows = _width(module.get_submodule("gate_up_proj"), "out_features")
    if rows % 2 or _width(module.get_submodule("down_proj"), "in_features") != rows // 2:
        return None
    return Unit(
        kind="neurons",
        block=_parent(name),
        owner=name,
        producers=(),
        sections=((_join(name, "gate_up_proj"), 1, 0), (_join(name, "gate_up_proj"), 1, rows // 2)),
        consumer=(_join(name, "down_proj"), 1),
        groups=rows // 2,
    )


# (up, down) Linear pairs with an elementwise activation between: OPT (on the block
# itself), DistilBERT, GPT-NeoX / BLOOM / Falcon, GPT-2 (its Conv1D made Linear), MPT, ALBERT.
_PLAIN_MLPS = (
    ("fc1", "fc2"),
    ("lin1", "lin2"),
    ("dense_h_to_4h", "dense_4h_to_h"),
    ("c_fc", "c_proj"),
    ("up_proj", "down_proj"),
    ("ffn", "ffn_output"),  # ALBERT
)


def _plain_mlp(name: str, module: nn.Module) -> Unit | None:
    if hasattr(module, "gate_proj"):
        return None  # gated: _gated_mlp's
    for up, down in _PLAIN_MLPS:
        if _is_linear(module, up) and _is_linear(module, down):
            # OPT keeps fc1/fc2 on the numbered block itself; the others in a child of it.
            block = name if name.rsplit(".", 1)[-1].isdigit() else _parent(name)
            return Unit(
                kind="neurons",
                block=block,
                owner=name,
                producers=((_join(name, up), 1),),
                consumer=(_join(name, down), 1),
                groups=_width(module.get_submodule(up), "out_features"),
            )
    return None


DETECTORS: tuple[Callable[[str, nn.Module], Unit | None], ...] = (
    _llama_attention,
    _bert_attention,
    _deberta_attention,
    _separate_attention,
    _per_head_fused_attention,
    _gpt2_attention,
    _falcon_attention,
    _bloom_attention,
    _mpt_attention,
    _fused_qkv_attention,
    _gated_mlp,
    _fused_gated_mlp,
    _bert_mlp,
    _plain_mlp,
)


def find_units(model: nn.Module) -> list[Unit]:
    """Every attention and MLP unit of the model, in module order."""
    units = []
    for name, module in model.named_modules():
        for detect in DETECTORS:
            unit = detect(name, module)
            if unit is not None:
                units.append(unit)
    return units


def removed_groups(fraction: float, groups: int) -> int:
    """How many of ``groups`` a fraction removes: rounded half up, and never all of them."""
    return min(math.floor(fraction * groups + 0.5), groups - 1)


def shrunk_shapes(
    units: list[Unit], fractions: Mapping[tuple[str, Kind], float], shapes: Mapping[str, tuple[int, int]]
) -> dict[str, tuple[int, int]]:
    """(in, out) of every Linear after removing ``fractions[(block, kind)]`` of each unit."""
    out = dict(shapes)
    for unit in units:
        removed = removed_groups(fractions.get((unit.block, unit.kind), 0.0), unit.groups)
        for name, parts in unit.row_parts().items():
            n_in, n_out = out[name]
            out[name] = (n_in, n_out - removed * sum(rows for _, rows in parts))
        name, cols = unit.consumer
        n_in, n_out = out[name]
        out[name] = (n_in - removed * cols, n_out)
    return out


def _linear(model: nn.Module, name: str) -> nn.Linear:
    module = model.get_submodule(name)
    if type(module) is not nn.Linear:
        raise ValueError(
            f"structured pruning runs first, on plain nn.Linear layers, but {name} is a "
            f"{type(module).__name__}: apply the whole plan once, to the uncompressed model"
        )
    return module


def _group_scores(model: nn.Module, unit: Unit, norms: Mapping[str, Tensor] | None) -> Tensor:
    name, cols = unit.consumer
    weight = _linear(model, name).weight.detach().float()
    col_norm = weight.norm(dim=0)
    if norms is not None:
        return (col_norm * norms[name]).view(unit.groups, cols).sum(dim=1)
    score = weight.pow(2).sum(dim=0).view(unit.groups, cols).sum(dim=1).sqrt()
    rows_norm = torch.zeros(unit.groups)
    for pname, parts in unit.row_parts().items():
        w = _linear(model, pname).weight.detach().float()
        for first, rows in parts:
            part = w[first : first + unit.groups * rows]
            rows_norm += part.pow(2).sum(dim=1).view(unit.groups, rows).sum(dim=1).sqrt()
    return score * rows_norm


def _kept_index(kept: Tensor, width: int) -> Tensor:
    return (kept[:, None] * width + torch.arange(width)[None, :]).reshape(-1)


def _shrink(linear: nn.Linear, rows: Tensor | None, cols: Tensor | None) -> nn.Linear:
    weight = linear.weight.detach()
    bias = linear.bias.detach() if linear.bias is not None else None
    if rows is not None:
        weight = weight[rows]
        bias = bias[rows] if bias is not None else None
    if cols is not None:
        weight = weight[:, cols]
    out = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, dtype=weight.dtype)
    with torch.no_grad():
        out.weight.copy_(weight)
        if bias is not None and out.bias is not None:
            out.bias.copy_(bias)
    return out


_HEAD_ATTRS = ("num_attention_heads", "num_heads", "n_heads")
_KV_ATTRS = ("num_key_value_heads", "num_kv_heads")


def _update_owner(owner: nn.Module, unit: Unit, kept_groups: Tensor) -> None:
    """Keep the module's own size attributes true (its forward reads some of them)."""
    kept = int(kept_groups.numel())
    if unit.alibi:
        if hasattr(owner, "alibi_heads"):
            raise ValueError(f"{unit.owner}: its heads were pruned already; prune the unpruned model once")
        setattr(owner, "alibi_heads", (unit.alibi, unit.groups, tuple(int(i) for i in kept_groups)))  # noqa: B010
        owner.register_forward_pre_hook(_alibi_of_kept_heads, with_kwargs=True)
    if unit.kind == "neurons":
        if isinstance(getattr(owner, "intermediate_size", None), int):
            setattr(owner, "intermediate_size", kept)  # noqa: B010 (typed as a Module attribute)
        return
    for attr in _HEAD_ATTRS:
        if isinstance(getattr(owner, attr, None), int):
            setattr(owner, attr, kept * unit.heads_per_group)
    for attr in () if unit.shared_kv else _KV_ATTRS:
        if isinstance(getattr(owner, attr, None), int):
            setattr(owner, attr, kept)
    for attr in ("all_head_size", "split_size"):  # split_size: where GPT-2 splits its c_attn output
        if isinstance(getattr(owner, attr, None), int):
            setattr(owner, attr, kept * unit.heads_per_group * unit.head_dim)
    if unit.config_heads:
        config: Any = copy.copy(owner.config)  # shallow: only the counts differ
        config.num_attention_heads = kept * unit.heads_per_group
        config.num_key_value_heads = kept
        owner.config = config


def unit_key(unit: Unit) -> str:
    return f"{unit.owner}:{unit.kind}"


def check_rebuilt(model: nn.Module, applied: Mapping[str, str], recorded: Mapping[str, str]) -> None:
    """A skeleton's pruned ALiBi heads must be the recorded ones: their weights are loaded
    over it, but which heads they were decides their ALiBi slopes."""
    for key in applied:
        owner = key.rsplit(":", 1)[0]
        if key not in recorded and hasattr(model.get_submodule(owner), "alibi_heads"):
            raise ValueError(
                f"{owner}: the plan records no kept heads for this ALiBi attention, so the rebuilt "
                "model cannot know their slopes; export the trial with `slimsearch export` (its plan "
                "records them), or save the plan that apply_plan's compress() returns"
            )


def encode_kept(kept: Tensor) -> str:
    """Kept group indices as a hex mask (bit i set: group i kept)."""
    return f"{sum(1 << int(i) for i in kept.tolist()):x}"


def kept_indices(mask: str) -> list[int]:
    """The group indices a selection mask keeps, ascending."""
    value = int(mask, 16)
    return [i for i in range(value.bit_length()) if value >> i & 1]


def decode_kept(mask: str, unit: Unit, removed: int) -> Tensor:
    value = int(mask, 16)
    kept = kept_indices(mask)
    if value >> unit.groups or len(kept) != unit.groups - removed:
        raise ValueError(
            f"plan selection for {unit_key(unit)} keeps {len(kept)} groups (mask {mask}), but the plan "
            f"removes {removed} of this model's {unit.groups}: the selection belongs to another model "
            "or plan"
        )
    return torch.tensor(kept, dtype=torch.long)


def prune_unit(
    model: nn.Module,
    unit: Unit,
    fraction: float,
    norms: Mapping[str, Tensor] | None,
    kept: Tensor | None = None,
) -> Tensor:
    """Remove ``fraction`` of the unit's groups in place (the ``kept`` ones stay, when given);
    returns the kept group indices."""
    removed = removed_groups(fraction, unit.groups)
    if removed == 0:
        return torch.arange(unit.groups)
    if kept is None:
        scores = _group_scores(model, unit, norms)
        # Stable order: equal scores keep the lower index, so the same inputs give the same model.
        order = torch.sort(-scores, stable=True).indices
        kept = torch.sort(order[: unit.groups - removed]).values
    for name, parts in unit.row_parts().items():
        pieces = [(first, first + _kept_index(kept, per)) for first, per in parts]
        pieces += [(first, torch.arange(first, first + n)) for at, first, n in unit.kept_rows if at == name]
        rows = torch.cat([rows for _, rows in sorted(pieces, key=lambda piece: piece[0])])
        model.set_submodule(name, _shrink(_linear(model, name), rows, None))
    name, cols = unit.consumer
    model.set_submodule(name, _shrink(_linear(model, name), None, _kept_index(kept, cols)))
    _update_owner(model.get_submodule(unit.owner), unit, kept)
    return kept


def prune_structured(
    model: nn.Module,
    fractions: Mapping[tuple[str, Kind], float],
    calibration: Mapping[str, Tensor] | None = None,
    selection: Mapping[str, str] | None = None,
    stats: CalibrationStats | None = None,
) -> dict[str, str]:
    """Prune every unit whose (block, kind) has a non-zero fraction; returns the kept groups
    of each pruned unit as a selection (``unit_key`` -> hex mask).

    A unit named in ``selection`` keeps exactly those groups (a rebuild); the others are
    ranked on the activation norms of the unpruned model: ``stats`` (captured beforehand),
    else one forward pass of ``calibration``, else weights alone (one-shot pruning).
    """
    selection = selection or {}
    units = [u for u in find_units(model) if fractions.get((u.block, u.kind), 0.0) > 0]
    active = [u for u in units if removed_groups(fractions[(u.block, u.kind)], u.groups) > 0]
    for unit in active:
        for name in unit.linears():
            _linear(model, name)  # refuse before changing anything
    given = {
        unit_key(u): decode_kept(
            selection[unit_key(u)], u, removed_groups(fractions[(u.block, u.kind)], u.groups)
        )
        for u in active
        if unit_key(u) in selection
    }
    ranked = [u for u in active if unit_key(u) not in given]
    norms = None
    consumers = [u.consumer[0] for u in ranked]
    if ranked and stats is None and calibration is not None:
        stats = capture(model, [calibration], {"act_sq"}, consumers)
    if ranked and stats is not None:
        norms = {}
        for name in consumers:
            layer = stats.layer(name)
            if layer is None or layer.act_sq is None:
                raise ValueError(f"the calibration statistics hold no activations of {name}")
            norms[name] = layer.norms()
    kept = {}
    for unit in active:
        index = prune_unit(model, unit, fractions[(unit.block, unit.kind)], norms, given.get(unit_key(unit)))
        kept[unit_key(unit)] = encode_kept(index)
    return kept


class _StructuredMethod(Method):
    """Heads and neurons share one implementation: they prune different units of a block."""

    kind: ClassVar[Kind]
    stage: ClassVar[Stage] = "structured"
    scopes: ClassVar[frozenset[Scope]] = frozenset({"block"})
    off = 0.0
    needs = frozenset({"act_sq"})  # optional: without statistics, weights alone rank the groups
    qat: ClassVar[QAT] = "train"
    always_listed = True

    def check(self, value: Any) -> Any:
        if not is_fraction(value):
            raise ValueError(
                f"structured {self.name}={value!r} is out of range: use the fraction removed, "
                "in [0, 1), e.g. 0.5 to remove half"
            )
        return float(value)

    def check_choice(self, value: Any) -> Any:
        if not is_fraction(value):
            raise ValueError(
                f"{self.name}: {value!r} is not allowed; use fractions removed in "
                "[0, 1) such as [0.0, 0.25, 0.5], with 0.0 meaning off"
            )
        return value

    def short(self, value: Any) -> str:
        return f"{self.name[0]}{value:g}"

    def realized(self, value: Any) -> str:
        return BOTH  # Linear shapes shrink: fewer weights and fewer FLOPs

    def examples(self) -> tuple[Any, ...]:
        return (0.5,)

    def layout(self, model: nn.Module) -> list[Unit]:
        return find_units(model)

    def blocks(self, layout: Any) -> list[str]:
        return list(dict.fromkeys(u.block for u in layout if u.kind == self.kind))

    def shrunk(
        self, layout: Any, values: Mapping[str, Any], shapes: Mapping[str, tuple[int, int]]
    ) -> dict[str, tuple[int, int]]:
        return shrunk_shapes(layout, {(b, self.kind): float(v) for b, v in values.items()}, shapes)

    def kept_columns(
        self, layout: Any, values: Mapping[str, Any], selection: Mapping[str, str]
    ) -> dict[str, Tensor]:
        out = {}
        for unit in layout:
            key = unit_key(unit)
            if unit.kind != self.kind or unit.block not in values or key not in selection:
                continue
            removed = removed_groups(float(values[unit.block]), unit.groups)
            if not removed:
                continue
            groups = decode_kept(selection[key], unit, removed)
            name, cols = unit.consumer
            out[name] = (groups[:, None] * cols + torch.arange(cols)[None, :]).reshape(-1)
        return out

    def apply_blocks(
        self, model: nn.Module, values: Mapping[str, Any], stats: Any, selection: Mapping[str, str]
    ) -> dict[str, str]:
        fractions = {(block, self.kind): float(v) for block, v in values.items()}
        return prune_structured(model, fractions, None, selection, stats)


@register
class Heads(_StructuredMethod):
    """Attention heads (whole key/value groups under grouped-query attention) removed."""

    name = "heads"
    position = 40
    kind = "heads"
    block_part = "attention layout (query/key/value and output projections)"
    colorscale = "Purples"


@register
class Neurons(_StructuredMethod):
    """FFN neurons removed."""

    name = "neurons"
    position = 50
    kind = "neurons"
    block_part = "MLP"
    colorscale = "Oranges"
