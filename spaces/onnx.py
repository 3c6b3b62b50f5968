"""ONNX for ONNX Runtime: a compressed encoder written with the operators that run its
stored codes, so ORT computes what slimsearch scored and at the speed its kernels give.

Per packed Linear (what ``onnx_ops`` reports):
- ``bits: 8`` (W8A8): ``DynamicQuantizeLinear`` on the activations (per tensor, uint8) and
  ``MatMulInteger`` on the stored int8 codes, rescaled by the row scales: ORT's dynamic
  int8, with slimsearch's codes instead of codes it would choose again;
- ``bits: 4``, ``3``, ``2`` and ``weight_only`` int8: ``MatMulNBits`` (ORT's weight-only
  kernel; com.microsoft domain) holding the stored codes, scales and the offsets as zero
  points (``code * scale + offset == (code - zero) * scale``); 3- and 2-bit codes in 4-bit
  slots. Zero points are uint8 where every offset is a whole code (int8 weight-only always;
  ``integer_zero: true`` layers), and such layers compute on int8 activations
  (``accuracy_level`` 4, ORT's fast path); else they are float, on ORT's slow path;
- anything else (fp32, bf16, sparse, a shape the kernel cannot take): ``MatMul`` on the fp32
  values the layer computes with (the same function; no speed claimed for it).
AWQ's input scale becomes a ``Div`` before the matmul. A packed embedding table is written
as its stored codes (bf16, int8 with row scales, 4- or 2-bit with group scales and offsets),
gathered and then dequantized, so the runtime holds no fp32 copy of it. Low-rank layers are
their two factors, each as above.

Causal LMs (decoders) are written the same way, as ``input_ids``, ``attention_mask`` ->
``logits`` of every position; with ``kv_cache`` also ``position_ids`` and each block's
``past_key_values.N.key`` / ``.value`` in, ``present.N.key`` / ``.value`` out (the names
Optimum's exports use), so a generation loop feeds one token a step (``generate``); an
empty past (length 0) scores whole blocks. A tied output layer is a matmul on the table's
stored codes: ``MatMulNBits`` for 8/4/2-bit tables, ``MatMul`` for fp32 and bf16. Llama-layout
blocks are written in their export form (``onnx_llama``: no shape arithmetic per block, and
Linears reading one input as one operator, ``fused_projections``).
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from slimsearch.spaces.methods import PackedEmbedding, PackedLinear
from slimsearch.spaces.methods.packed import TiedHead
from slimsearch.spaces.methods.quantize import GROUP_SIZE, GROUPED_BITS, group_size_for, whole_zeros
from slimsearch.spaces.onnx_llama import exportable

OPSET = 17
MS_DOMAIN = "com.microsoft"
NBITS_BLOCKS = (16, 32, 64, 128, 256)
# MatMulNBits' accuracy_level for integer zero points: 4 computes on int8 activations (ORT's
# fast path; float ones at level 0 run many times slower), 0 keeps fp32 activations.
INT8_COMPUTE = 4
_accuracy_level = INT8_COMPUTE
# The layers being exported, by id, with the fp32 weight they compute with (symbolic reads them).
_LAYERS: dict[int, tuple[PackedLinear | TiedHead, Tensor]] = {}
# Their MatMulNBits inputs, packed once per export (``_packed``).
_PACKED: dict[int, tuple[Tensor, Tensor, Tensor, int, int]] = {}


def onnx_op(layer: PackedLinear | TiedHead) -> str:
    """The ONNX operator that computes ``layer`` (see the module docstring)."""
    if isinstance(layer, TiedHead):
        table = layer.table
        return "MatMulNBits" if _nbits_fits(table.bits, table.embedding_dim, GROUP_SIZE) else "MatMul"
    if layer.sparse:
        return "MatMul"
    if layer.bits == 8 and not layer.weight_only:
        return "MatMulInteger"
    return "MatMulNBits" if _nbits_fits(layer.bits, layer.in_features, layer.group) else "MatMul"


def _nbits_fits(bits: int, cols: int, group: int) -> bool:
    """Whether ``MatMulNBits`` takes weights of ``bits`` (8: symmetric int8) in rows of ``cols``."""
    if bits == 8:
        return cols % 16 == 0
    return bits in GROUPED_BITS and group_size_for(cols, group) in NBITS_BLOCKS


def _const(g: Any, tensor: Tensor) -> Any:
    return g.op("Constant", value_t=tensor.contiguous())


def _stored(layer: PackedLinear | TiedHead) -> tuple[Tensor, Tensor, Tensor | None, int, int]:
    """(codes [out, in], scale, offset or None, bits, group) of a layer or a tied table."""
    if isinstance(layer, TiedHead):
        table = layer.table
        if table.bits == 8:
            codes = table.values.view(table.num_embeddings, table.embedding_dim)
            return codes, table.scale, None, 8, GROUP_SIZE
        return table.stored_codes(), table.scale, table.offset, table.bits, GROUP_SIZE
    offset = layer.offset if layer.bits in GROUPED_BITS else None
    return layer._dense_stored(), layer.scale, offset, layer.bits, layer.group


def _nbits_inputs(layer: PackedLinear | TiedHead) -> tuple[Tensor, Tensor, Tensor, int, int]:
    """(B uint8 [N, blocks, blob], scales [N * blocks], zero points (uint8, two 4-bit ones a
    byte, where they are whole; else float), bits, block size)."""
    codes, scale, offset, bits, group = _stored(layer)
    rows, cols = codes.shape
    if bits == 8:
        block = 32 if cols % 32 == 0 else 16
        blocks = cols // block
        q = (codes.to(torch.int16) + 128).to(torch.uint8).view(rows, blocks, block)
        scale = scale.float().view(rows, 1).expand(rows, blocks).contiguous()
        zero = torch.full((rows, blocks), 128, dtype=torch.uint8)  # symmetric codes, shifted
        return q, scale.reshape(-1), zero, 8, block
    assert offset is not None
    block = group_size_for(cols, group)
    blocks = -(-cols // block)
    padded = F.pad(codes.to(torch.uint8), (0, blocks * block - cols)).view(rows, blocks, block)
    packed = padded[..., 0::2] | (padded[..., 1::2] << 4)
    scale = scale.float()
    offset = offset.float()
    # A group of equal values may have scale 0: a tiny scale keeps (code - zero) * scale at
    # its offset, to a relative 1e-6.
    scale = torch.where(scale == 0, 1e-6 * offset.abs().clamp_min(1e-12), scale)
    whole = whole_zeros(offset, scale, 2**bits - 1)
    if whole is None:
        return packed.contiguous(), scale.reshape(-1), (-offset / scale).reshape(-1), 4, block
    if blocks % 2:
        whole = F.pad(whole, (0, 1))
    nibbles = whole[:, 0::2] | (whole[:, 1::2] << 4)
    return packed.contiguous(), scale.reshape(-1), nibbles.contiguous(), 4, block


class _PackedMatMul(torch.autograd.Function):
    """Computes the layer (for tracing) and writes its ONNX operators (``symbolic``)."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, key: int) -> Tensor:  # type: ignore[override]
        layer, weight = _LAYERS[key]
        return F.linear(x, weight, getattr(layer, "bias", None))

    @staticmethod
    def symbolic(g: Any, x: Any, key: int) -> Any:
        layer, weight = _LAYERS[key]
        in_scale = layer.column_scale() if isinstance(layer, PackedLinear) else None
        if in_scale is not None:
            x = g.op("Div", x, _const(g, in_scale))
        op = onnx_op(layer)
        if op == "MatMulInteger":
            xq, xs, xz = g.op("DynamicQuantizeLinear", x, outputs=3)
            codes = layer._dense_stored().to(torch.int8).t()
            y = g.op(
                "MatMulInteger",
                xq,
                _const(g, codes),
                xz,
                _const(g, torch.zeros(layer.out_features, dtype=torch.int8)),
            )
            y = g.op("Cast", y, to_i=1)  # float
            y = g.op("Mul", y, g.op("Mul", xs, _const(g, layer.scale.float())))
        elif op == "MatMulNBits":
            y = _nbits_op(g, x, _packed(layer), weight.shape[1], weight.shape[0])
        else:
            y = g.op("MatMul", x, _const(g, weight.t()))
        bias = getattr(layer, "bias", None)
        if bias is not None:
            y = g.op("Add", y, _const(g, bias.detach().float()))
        return y


class _FusedMatMul(torch.autograd.Function):
    """Several exported layers reading one input, computed as one: their outputs concatenated
    (for tracing), written as one ``MatMulNBits`` on their stacked codes or one ``MatMul`` on
    their stacked fp32 weights (``symbolic``). Every output column is its layer's own sum, so
    the values are the separate layers'."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, keys: tuple[int, ...]) -> Tensor:  # type: ignore[override]
        return torch.cat([F.linear(x, _LAYERS[k][1]) for k in keys], dim=-1)

    @staticmethod
    def symbolic(g: Any, x: Any, keys: tuple[int, ...]) -> Any:
        layers = [_LAYERS[k][0] for k in keys]
        rows = sum(layer.out_features for layer in layers)
        if onnx_op(layers[0]) == "MatMul":
            weight = torch.cat([_LAYERS[k][1] for k in keys])
            return g.op("MatMul", x, _const(g, weight.t()))
        parts = [_packed(layer) for layer in layers]
        b = torch.cat([p[0] for p in parts])
        scales = torch.cat([p[1] for p in parts])
        zeros = torch.cat([p[2] for p in parts])
        return _nbits_op(g, x, (b, scales, zeros, parts[0][3], parts[0][4]), layers[0].in_features, rows)


def _packed(layer: PackedLinear | TiedHead) -> tuple[Tensor, Tensor, Tensor, int, int]:
    """``_nbits_inputs`` of a layer being exported, packed once per export (the format check of
    ``fused_projections`` and the operator's constants both read it)."""
    key = id(layer)
    if key not in _PACKED:
        _PACKED[key] = _nbits_inputs(layer)
    return _PACKED[key]


def _nbits_op(g: Any, x: Any, inputs: tuple[Tensor, Tensor, Tensor, int, int], k: int, n: int) -> Any:
    """One ``MatMulNBits`` of ``x`` (..., k) on packed ``inputs`` (``_nbits_inputs``) -> (..., n)."""
    b, scales, zeros, bits, block = inputs
    y = g.op(
        f"{MS_DOMAIN}::MatMulNBits",
        x,
        _const(g, b),
        _const(g, scales),
        _const(g, zeros),
        K_i=k,
        N_i=n,
        bits_i=int(bits),  # sizes may be traced tensors
        block_size_i=int(block),
        accuracy_level_i=_accuracy_level if zeros.dtype == torch.uint8 else 0,
    )
    # ORT's operator has no shape function in the exporter: give the output's type.
    sizes = x.type().varyingSizes()
    if sizes is not None:
        y.setType(x.type().with_sizes([*sizes[:-1], n]))
    return y


def _format(layer: PackedLinear) -> tuple[Any, ...] | None:
    """What must match for layers to share one operator (None: this one shares with none)."""
    op = onnx_op(layer)
    if getattr(layer, "bias", None) is not None or layer.column_scale() is not None or op == "MatMulInteger":
        return None
    if op == "MatMul":
        return (op,)
    _, _, zeros, bits, block = _packed(layer)
    return (op, int(bits), int(block), zeros.dtype)  # sizes may be traced tensors: compare values


def fused_projections(modules: Sequence[nn.Module], x: Tensor) -> list[Tensor] | None:
    """The outputs of ``modules`` (Linears reading the same ``x``: a block's query, key and
    value projections, or its gate and up projections) through one operator while exporting,
    where all are exported packed layers of one format without bias or input scale; None
    where they are not (each is then called on its own)."""
    if all(type(m) is nn.Linear for m in modules):  # fp32 layers: one matmul on stacked weights
        linears = [m for m in modules if isinstance(m, nn.Linear)]
        if any(m.bias is not None for m in linears):
            return None
        weight = torch.cat([m.weight for m in linears])
        return list(F.linear(x, weight).split([m.out_features for m in linears], dim=-1))
    if not all(isinstance(m, _Exported) for m in modules):
        return None
    keys = tuple(m.key for m in modules if isinstance(m, _Exported))
    layers = [_LAYERS[k][0] for k in keys]
    if not all(isinstance(layer, PackedLinear) for layer in layers):
        return None
    formats = {_format(layer) for layer in layers if isinstance(layer, PackedLinear)}
    if len(formats) != 1 or None in formats:
        return None
    out: Tensor = _FusedMatMul.apply(x, keys)
    return list(out.split([layer.out_features for layer in layers], dim=-1))


class _Exported(nn.Module):
    def __init__(self, layer: PackedLinear | TiedHead) -> None:
        super().__init__()
        self.key = id(layer)

    def forward(self, x: Tensor) -> Tensor:
        out: Tensor = _PackedMatMul.apply(x, self.key)
        return out


class _Lookup(nn.Module):
    """A packed table's lookup written on its stored codes: ``Gather`` of the rows' bytes,
    unpacked and scaled after the gather, so the runtime holds the codes, not fp32 values.
    The arithmetic is ``PackedEmbedding``'s (codes * scale + offset in fp32); codes are
    unpacked with division and floor, as opset 17 has no bitwise and."""

    codes: Tensor
    scale: Tensor
    offset: Tensor

    def __init__(self, table: PackedEmbedding) -> None:
        super().__init__()
        self.bits = table.bits
        self.dim = table.embedding_dim
        self.lookup_scale = table.lookup_scale
        rows = table.num_embeddings
        if table.bits == 16:
            self.register_buffer("codes", table.values.view(rows, self.dim))
        elif table.bits == 8:
            self.register_buffer("codes", table.values.view(rows, self.dim))
            self.register_buffer("scale", table.scale.float().view(rows, 1))
        else:
            self.register_buffer("codes", table.values.view(rows, table._row_bytes()))
            self.register_buffer("scale", table.scale.float())
            self.register_buffer("offset", table.offset.float())

    def forward(self, ids: Tensor) -> Tensor:
        rows = F.embedding(ids, self.codes).float()
        if self.bits == 8:
            rows = rows * F.embedding(ids, self.scale)
        elif self.bits != 16:
            rows = self._dequantized(ids, rows)
        return rows * self.lookup_scale if self.lookup_scale != 1.0 else rows

    def _dequantized(self, ids: Tensor, packed: Tensor) -> Tensor:
        base = float(2**self.bits)
        parts = []
        for _ in range(8 // self.bits - 1):
            high = torch.floor(packed / base)
            parts.append(packed - high * base)  # lowest bits first, as pack_codes stores them
            packed = high
        parts.append(packed)
        codes = torch.stack(parts, dim=-1).flatten(-2)[..., : self.dim]
        groups = self.scale.shape[1]
        group = group_size_for(self.dim)
        codes = F.pad(codes, (0, groups * group - self.dim)).unflatten(-1, (groups, group))
        scale = F.embedding(ids, self.scale).unsqueeze(-1)
        offset = F.embedding(ids, self.offset).unsqueeze(-1)
        return (codes * scale + offset).flatten(-2)[..., : self.dim]


class _Logits(nn.Module):
    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: Tensor, attention_mask: Tensor, *types: Tensor) -> Tensor:
        inputs: dict[str, Any] = dict(
            zip(input_names(self.model), (input_ids, attention_mask, *types), strict=True)
        )
        if is_causal(self.model):
            inputs["use_cache"] = False  # logits of every position; no KV cache in the graph
        logits: Tensor = self.model(**inputs).logits
        return logits


class _Decoder(nn.Module):
    """A causal LM with its KV cache as flat inputs and outputs (see the module docstring)."""

    def __init__(self, model: nn.Module, blocks: int) -> None:
        super().__init__()
        self.model = model
        self.blocks = blocks

    def forward(self, input_ids: Tensor, attention_mask: Tensor, position_ids: Tensor, *past: Tensor) -> Any:
        from transformers import DynamicCache

        cache = DynamicCache(config=getattr(self.model, "config", None))
        for i in range(self.blocks):
            cache.update(past[2 * i], past[2 * i + 1], i)
        out = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=cache,
            use_cache=True,
        )
        present: list[Tensor] = []
        for layer in out.past_key_values.layers:
            present += [layer.keys, layer.values]
        return (out.logits, *present)


def _cache_shapes(model: nn.Module, ids: Tensor) -> list[tuple[int, ...]]:
    """The shape of each block's key and value cache after ``ids`` (transformers' DynamicCache)."""
    out = model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=True)
    layers = getattr(out.past_key_values, "layers", None)
    if not layers or any(getattr(layer, "keys", None) is None for layer in layers):
        raise ValueError(
            f"{type(model).__name__} does not return a DynamicCache of keys and values per block: "
            "export it without the KV cache (kv_cache=False)"
        )
    return [tuple(t.shape) for layer in layers for t in (layer.keys, layer.values)]


def _kv_names(blocks: int, prefix: str) -> list[str]:
    return [f"{prefix}.{i}.{kind}" for i in range(blocks) for kind in ("key", "value")]


def is_causal(model: nn.Module) -> bool:
    """Whether ``model`` is a decoder that generates (a transformers causal LM)."""
    can_generate = getattr(model, "can_generate", None)
    return bool(can_generate()) if callable(can_generate) else False


def input_names(model: nn.Module) -> tuple[str, ...]:
    """The graph's inputs: ``token_type_ids`` too where the model has segment embeddings (BERT,
    ELECTRA: ``type_vocab_size`` > 1), as Hugging Face's own ONNX exports have it."""
    base = ("input_ids", "attention_mask")
    config = getattr(model, "config", None)
    return (*base, "token_type_ids") if getattr(config, "type_vocab_size", 0) > 1 else base


def feeds(sess: Any, batch: Mapping[str, Tensor]) -> dict[str, np.ndarray]:
    """A session's inputs from a batch; segment ids it lacks (single texts) are zeros, an
    attention mask it lacks (unpadded blocks of a causal LM) is ones."""
    names = [i.name for i in sess.get_inputs()]
    out = {n: batch[n].numpy() for n in names if n in batch}
    if "attention_mask" in names and "attention_mask" not in out:
        out["attention_mask"] = np.ones_like(out["input_ids"])
    rows, length = out["input_ids"].shape
    if "position_ids" in names and "position_ids" not in out:
        out["position_ids"] = np.broadcast_to(np.arange(length, dtype=np.int64), (rows, length)).copy()
    for i in sess.get_inputs():
        if i.name.startswith("past_key_values.") and i.name not in out:
            _, heads, _, dim = i.shape  # an empty past: the whole block is scored
            out[i.name] = np.zeros((rows, heads, 0, dim), dtype=np.float32)
    if "token_type_ids" in names and "token_type_ids" not in out:
        out["token_type_ids"] = np.zeros_like(out["input_ids"])
    return out


@contextlib.contextmanager
def _swapped(model: nn.Module) -> Iterator[dict[str, str]]:
    """Packed Linears replaced by their exported form, tables by fp32 copies; restored after,
    with no dense table left cached on the model (it would hold fp32 bytes while it lives)."""
    swaps: list[tuple[nn.Module, str, nn.Module]] = []
    ops: dict[str, str] = {}
    uncached = [m for m in model.modules() if isinstance(m, PackedEmbedding) and "dense" not in m._cache]
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            full = f"{name}.{child_name}" if name else child_name
            if isinstance(child, PackedLinear):
                _LAYERS[id(child)] = (child, child.dense_weight().detach())
                ops[full] = onnx_op(child)
                replacement: nn.Module = _Exported(child)
            elif isinstance(child, PackedEmbedding):
                replacement = _Lookup(child)
            elif isinstance(child, TiedHead):
                _LAYERS[id(child)] = (child, child.table.dense_weight().detach())
                ops[full] = onnx_op(child)
                replacement = _Exported(child)
            else:
                continue
            swaps.append((module, child_name, child))
            setattr(module, child_name, replacement)
    try:
        yield ops
    finally:
        for module, child_name, child in swaps:
            setattr(module, child_name, child)
            _LAYERS.pop(id(child), None)
            _PACKED.pop(id(child), None)
        for table in uncached:
            table._cache.pop("dense", None)


def export_onnx(
    model: nn.Module,
    path: Path,
    vocab_size: int,
    seq_len: int = 16,
    int8_compute: bool = True,
    kv_cache: bool = False,
) -> dict[str, str]:
    """Write a classifier or a causal LM (``input_ids``, ``attention_mask`` and, see
    ``input_names``, ``token_type_ids`` -> ``logits``; batch and sequence dynamic) to ``path``;
    returns the ONNX operator of each packed Linear (and tied output layer) by name.
    ``int8_compute`` lets MatMulNBits layers with integer zero points compute on int8
    activations (ORT's fast path); off, they keep fp32 activations (exact, and slow).
    ``kv_cache`` (causal LMs) adds positions and the KV cache (see the module docstring)."""
    global _accuracy_level
    if kv_cache and not is_causal(model):
        raise ValueError(f"kv_cache=True is for causal LMs; {type(model).__name__} does not generate")
    _accuracy_level = INT8_COMPUTE if int8_compute else 0
    ids = torch.randint(1, max(vocab_size, 2), (1, seq_len), generator=torch.Generator().manual_seed(0))
    names = list(input_names(model))
    example: tuple[Tensor, ...] = (ids, torch.ones_like(ids)) + (
        (torch.zeros_like(ids),) if len(names) > 2 else ()
    )
    outputs = ["logits"]
    axes = {n: {0: "batch", 1: "sequence"} for n in names}
    wrapper: nn.Module = _Logits(model)
    if kv_cache:
        with torch.no_grad():
            shapes = _cache_shapes(model, ids[:, :2])
        blocks = len(shapes) // 2
        new = ids[:, 2:]  # traced with a past of 2 tokens, so no shape is fixed at 0
        past = [torch.randn(shape, generator=torch.Generator().manual_seed(1)) for shape in shapes]
        example = (new, torch.ones_like(ids), torch.arange(2, seq_len)[None], *past)
        names = [*names, "position_ids", *_kv_names(blocks, "past_key_values")]
        outputs = [*outputs, *_kv_names(blocks, "present")]
        axes = {
            "input_ids": {0: "batch", 1: "sequence"},
            "attention_mask": {0: "batch", 1: "total"},
            "position_ids": {0: "batch", 1: "sequence"},
            "logits": {0: "batch", 1: "sequence"},
            **{n: {0: "batch", 2: "past"} for n in names[3:]},
            **{n: {0: "batch", 2: "total"} for n in outputs[1:]},
        }
        wrapper = _Decoder(model, blocks)
    with _swapped(model) as ops, exportable(model), torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation and tracer notes
        torch.onnx.export(
            wrapper.eval(),
            example,
            str(path),
            input_names=names,
            output_names=outputs,
            dynamic_axes=axes,
            opset_version=OPSET,
            custom_opsets={MS_DOMAIN: 1} if "MatMulNBits" in ops.values() else {},
            dynamo=False,
        )
    return ops


# Threads spin between a run's operators (waking sleeping ones costs more than a small
# operator), and stop when the run returns: left spinning, they take the cores from the
# other session timed in alternation with it (two sessions of one model 1.12x apart).
SPIN_WITHIN_RUNS: Mapping[str, str] = {
    "session.intra_op.allow_spinning": "1",
    "session.force_spinning_stop": "1",
}


def session(path: Path | bytes, threads: int, config: Mapping[str, str] = SPIN_WITHIN_RUNS) -> Any:
    """An ONNX Runtime CPU session of the model file ``path`` (or a serialized model) with
    ``threads`` intra-op threads, all graph optimizations, and the session ``config`` entries
    (how idle threads wait, by default ``SPIN_WITHIN_RUNS``)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    for key, value in config.items():
        options.add_session_config_entry(key, value)
    model = path if isinstance(path, bytes) else str(path)
    return ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])


def prefill(sess: Any, ids: np.ndarray) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """A prompt (``[rows, length]`` token ids) through a KV-cache graph on an empty cache: each
    row's greedy next token (``[rows, 1]``) and the cache after the prompt."""
    out = sess.run(None, feeds(sess, {"input_ids": torch.from_numpy(ids)}))
    return _greedy(out[0]), _cache(sess, out)


def step(
    sess: Any, token: np.ndarray, past: dict[str, np.ndarray], seen: int
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """One token per row (``[rows, 1]``) after ``seen`` cached ones: the next greedy token
    and the grown cache."""
    rows = token.shape[0]
    feed = {
        "input_ids": token,
        "attention_mask": np.ones((rows, seen + 1), dtype=np.int64),
        "position_ids": np.full((rows, 1), seen, dtype=np.int64),
        **past,
    }
    out = sess.run(None, feed)
    return _greedy(out[0]), _cache(sess, out)


def generate(sess: Any, prompt: Tensor, new_tokens: int, kv_cache: bool = True) -> list[int]:
    """Greedy continuation of one prompt (``[1, length]``) by a causal LM's ONNX session: with
    ``kv_cache`` one token a step through the graph's cache (``export_onnx(kv_cache=True)``);
    without, the whole sequence again each step (an empty past, or a graph without one)."""
    names = {i.name for i in sess.get_inputs()}
    if kv_cache and "past_key_values.0.key" not in names:
        raise ValueError(
            "this ONNX graph has no KV cache: export it with kv_cache=True, or pass kv_cache=False"
        )
    ids = prompt.numpy()
    if new_tokens <= 0:
        return []
    if kv_cache:
        token, past = prefill(sess, ids)
        tokens = [int(token[0, 0])]
        for seen in range(ids.shape[1], ids.shape[1] + new_tokens - 1):
            token, past = step(sess, token, past, seen)
            tokens.append(int(token[0, 0]))
        return tokens
    tokens = []
    for _ in range(new_tokens):
        out = sess.run(None, feeds(sess, {"input_ids": torch.from_numpy(ids)}))
        token = _greedy(out[0])
        tokens.append(int(token[0, 0]))
        ids = np.concatenate([ids, token.astype(ids.dtype)], axis=1)
    return tokens


def _greedy(logits: Any) -> np.ndarray:
    return np.asarray(logits)[:, -1:].argmax(-1).astype(np.int64)


def _cache(sess: Any, out: list[Any]) -> dict[str, np.ndarray]:
    """A graph's ``present.*`` outputs as the next step's ``past_key_values.*`` inputs."""
    return {
        n.replace("present", "past_key_values"): v for n, v in zip(_outputs(sess)[1:], out[1:], strict=True)
    }


def _outputs(sess: Any) -> list[str]:
    return [o.name for o in sess.get_outputs()]
