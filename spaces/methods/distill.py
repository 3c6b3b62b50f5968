"""Knowledge distillation: train a compressed student to match its uncompressed teacher.

Three pieces, torch only:

- ``DistillRecipe``: the plain-data recipe stored in ``CompressionPlan.distill``.
- ``TeacherCache``: the teacher's outputs (logits; hidden states and attention maps when a
  recipe needs them) on a fixed list of batches, computed once and reusable across trials
  (in memory, or saved to a safetensors file).
- ``distill(student, cache, batches, recipe, task_kind)``: a short training run of the
  student against the cache.

What trains: every float parameter of the student except embedding tables (their packed
forms hold codes, not parameters, and freezing them keeps a tied LM head frozen too).
Quantized or sparse layers (``PackedLinear``) train as the methods that made them declare
(``Method.qat``): a layer made only by "requantize" and "train" methods is swapped for a
``FakeQuantLinear`` whose float weight is rounded to its quantizer's grid in the forward pass
(``Method.fake_quantize``) with a straight-through gradient, and whose pruned entries stay
zero; after training the quantizer re-stores it with the same value and the same mask, so
the student's size and layout do not change. A layer any "frozen" method made (a calibrated
quantizer whose codes plain rounding would undo) keeps its stored values and does not train.

Attention maps need the eager attention implementation: in transformers 5.23 the default
``sdpa`` returns an empty ``attentions`` tuple for ``output_attentions=True`` (with only a
warning). Both the cache and ``distill`` switch a model to ``eager`` while they need maps
and switch it back afterwards, so callers need not build models differently.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from slimsearch.spaces.inputs import IGNORE, INPUT_KEYS, model_inputs
from slimsearch.spaces.methods import registry
from slimsearch.spaces.methods.packed import PackedLinear
from slimsearch.spaces.methods.quantize import unpack_bits
from slimsearch.spaces.methods.registry import LinearWork, Method

DISTILL_KINDS = ("off", "logits", "logits+hidden", "logits+hidden+attention")
TASK_KINDS = ("classification", "token-classification", "causal-lm")
CACHE_FORMAT = 1

Batch = Mapping[str, Tensor]


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


@dataclass(frozen=True)
class DistillRecipe:
    """How to distil a compressed student. ``kind="off"`` skips distillation.

    - ``kind``: which teacher signals the student matches: logits, plus each block's hidden
      states, plus each block's attention maps.
    - ``steps``: optimizer steps (one batch each); ``batch_size``: rows per batch (the caller
      batches the data with it; ``distill`` checks the batches it gets).
    - ``learning_rate``: AdamW, decayed linearly to zero over the steps.
    - ``temperature``: softens both logit distributions in the KL term.
    - ``alpha``: weight of the soft-target KL term against the task loss (cross-entropy with
      the batch's ``labels``) when the batches carry labels; 1.0 ignores the labels.
    - ``hidden_weight``, ``attention_weight``: weights of the hidden-state and attention terms.
    - ``seed``: the batch order; the same seed gives the same student.
    """

    kind: str = "logits"
    steps: int = 100
    learning_rate: float = 1e-4
    temperature: float = 2.0
    alpha: float = 0.5
    hidden_weight: float = 1.0
    attention_weight: float = 1.0
    batch_size: int = 32
    seed: int = 0

    def __post_init__(self) -> None:
        if self.kind not in DISTILL_KINDS:
            raise ValueError(f"distill kind={self.kind!r} is not known: choose one of {DISTILL_KINDS}")
        for name in ("steps", "seed"):
            value = getattr(self, name)
            if not _is_int(value) or value < 0:
                raise ValueError(f"distill {name}={value!r} must be a non-negative integer")
        if not _is_int(self.batch_size) or self.batch_size < 1:
            raise ValueError(f"distill batch_size={self.batch_size!r} must be a positive integer, e.g. 32")
        for name in ("learning_rate", "temperature"):
            value = getattr(self, name)
            if not _is_number(value) or value <= 0:
                raise ValueError(f"distill {name}={value!r} must be a positive number")
        if not _is_number(self.alpha) or not 0.0 <= self.alpha <= 1.0:
            raise ValueError(
                f"distill alpha={self.alpha!r} must be in [0, 1]: the weight of the teacher's soft "
                "targets against the labels (1.0 ignores the labels)"
            )
        for name in ("hidden_weight", "attention_weight"):
            value = getattr(self, name)
            if not _is_number(value) or value < 0:
                raise ValueError(f"distill {name}={value!r} must be a number >= 0 (0 turns the term off)")

    @property
    def is_off(self) -> bool:
        return self.kind == "off" or self.steps == 0

    @property
    def uses_hidden(self) -> bool:
        return "hidden" in self.kind

    @property
    def uses_attention(self) -> bool:
        return "attention" in self.kind

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> DistillRecipe:
        allowed = [f.name for f in fields(cls)]
        unknown = sorted(set(data) - set(allowed))
        if unknown:
            raise ValueError(f"distill recipe has unknown keys {unknown}; allowed keys are {allowed}")
        return cls(**data)


# ---------------------------------------------------------------------------------------------
# Layer mapping and attention implementation


def teacher_layer_for(student_layer: int, student_layers: int, teacher_layers: int) -> int:
    """Uniform mapping of student block i to teacher block round((i+1)*T/S) - 1 (half rounds
    up; clamped to block 0 when the student is more than twice as deep)."""
    if student_layers < 1 or teacher_layers < 1:
        raise ValueError(
            f"layer counts must be positive; got student_layers={student_layers}, "
            f"teacher_layers={teacher_layers}"
        )
    if not 0 <= student_layer < student_layers:
        raise ValueError(f"student_layer={student_layer} is out of range for {student_layers} layers")
    # Integer half-up rounding: Python's round() rounds halves to even.
    rounded = (2 * (student_layer + 1) * teacher_layers + student_layers) // (2 * student_layers)
    return max(rounded - 1, 0)


def layer_map(student_layers: int, teacher_layers: int) -> list[int]:
    """``teacher_layer_for`` of every student block."""
    if student_layers < 1:
        raise ValueError(f"layer counts must be positive; got student_layers={student_layers}")
    return [teacher_layer_for(i, student_layers, teacher_layers) for i in range(student_layers)]


@contextmanager
def attention_implementation(model: nn.Module, wanted: str | None) -> Iterator[None]:
    """Run with ``model`` on attention implementation ``wanted`` (None: leave it), then restore."""
    config = getattr(model, "config", None)
    before = getattr(config, "_attn_implementation", None)
    setter = getattr(model, "set_attn_implementation", None)
    if wanted is None or before == wanted:
        yield
        return
    if setter is None or before is None:
        raise ValueError(
            f"{type(model).__name__} has no set_attn_implementation; attention distillation needs a "
            "transformers model that can run eager attention"
        )
    setter(wanted)
    try:
        yield
    finally:
        setter(before)


# ---------------------------------------------------------------------------------------------
# Teacher cache


def batch_fingerprint(batch: Batch) -> str:
    """A hash of a batch's model inputs: ties cached teacher outputs to the batch they came from."""
    digest = hashlib.sha256()
    for key in INPUT_KEYS:
        if key in batch:
            tensor = batch[key].detach().cpu().contiguous()
            digest.update(key.encode())
            digest.update(str(tuple(tensor.shape)).encode())
            digest.update(tensor.numpy().tobytes())
    return digest.hexdigest()[:32]


@dataclass(frozen=True)
class TeacherOutputs:
    """The teacher's outputs on one batch. ``hidden`` holds the embedding output then one state
    per block (fp32); ``attentions`` one (batch, heads, query, key) map per block (fp16, the
    bulk of a cache). Causal-LM logits are stored in fp16 too: they are vocabulary-wide."""

    fingerprint: str
    logits: Tensor
    hidden: tuple[Tensor, ...] = ()
    attentions: tuple[Tensor, ...] = ()


def _kind_rank(kind: str) -> int:
    return DISTILL_KINDS.index(kind)


class TeacherCache:
    """The teacher's outputs on a fixed list of distillation batches.

    Build it once with ``TeacherCache.compute(teacher, batches, kind, task_kind)`` for the
    richest recipe kind a search may use; it then serves every recipe of that kind or a
    poorer one. ``save``/``load`` keep it in one safetensors file between runs.
    """

    def __init__(self, outputs: Sequence[TeacherOutputs], kind: str, task_kind: str) -> None:
        if kind not in DISTILL_KINDS or kind == "off":
            raise ValueError(f"cache kind={kind!r} must be one of {DISTILL_KINDS[1:]}")
        _check_task_kind(task_kind)
        self.outputs = tuple(outputs)
        self.kind = kind
        self.task_kind = task_kind

    @classmethod
    def compute(cls, teacher: nn.Module, batches: Sequence[Batch], kind: str, task_kind: str) -> TeacherCache:
        """Run ``teacher`` once on each batch (eval mode, no grad) and keep what ``kind`` needs."""
        if kind not in DISTILL_KINDS or kind == "off":
            raise ValueError(f"cache kind={kind!r} must be one of {DISTILL_KINDS[1:]}")
        _check_task_kind(task_kind)
        hidden, attention = "hidden" in kind, "attention" in kind
        was_training = teacher.training
        teacher.eval()
        outputs = []
        try:
            with torch.no_grad(), attention_implementation(teacher, "eager" if attention else None):
                for batch in batches:
                    out = teacher(
                        **model_inputs(batch), output_hidden_states=hidden, output_attentions=attention
                    )
                    outputs.append(_teacher_outputs(batch, out, hidden, attention, task_kind))
        finally:
            teacher.train(was_training)
        return cls(outputs, kind, task_kind)

    def __len__(self) -> int:
        return len(self.outputs)

    def covers(self, recipe: DistillRecipe) -> bool:
        return _kind_rank(recipe.kind) <= _kind_rank(self.kind)

    def nbytes(self) -> int:
        total = 0
        for o in self.outputs:
            for t in (o.logits, *o.hidden, *o.attentions):
                total += t.numel() * t.element_size()
        return total

    def check_batches(self, batches: Sequence[Batch]) -> None:
        """Raise unless ``batches`` are exactly the batches this cache was computed on."""
        if len(batches) != len(self.outputs):
            raise ValueError(
                f"the teacher cache holds {len(self.outputs)} batches but distill got {len(batches)}; "
                "pass the same batches the cache was computed on"
            )
        for i, (batch, out) in enumerate(zip(batches, self.outputs, strict=True)):
            if batch_fingerprint(batch) != out.fingerprint:
                raise ValueError(
                    f"batch {i} differs from the batch the teacher cache was computed on "
                    "(different data, tokenizer or batch order); recompute the cache for these batches"
                )

    def save(self, path: str | Path) -> None:
        tensors: dict[str, Tensor] = {}
        for i, o in enumerate(self.outputs):
            tensors[f"{i}.logits"] = o.logits.contiguous()
            for j, h in enumerate(o.hidden):
                tensors[f"{i}.hidden.{j}"] = h.contiguous()
            for j, a in enumerate(o.attentions):
                tensors[f"{i}.attention.{j}"] = a.contiguous()
        metadata = {
            "format": str(CACHE_FORMAT),
            "kind": self.kind,
            "task_kind": self.task_kind,
            "fingerprints": json.dumps([o.fingerprint for o in self.outputs]),
            "hidden": str(len(self.outputs[0].hidden) if self.outputs else 0),
            "attentions": str(len(self.outputs[0].attentions) if self.outputs else 0),
        }
        save_file(tensors, str(path), metadata=metadata)

    @classmethod
    def load(cls, path: str | Path) -> TeacherCache:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
        if metadata.get("format") != str(CACHE_FORMAT):
            raise ValueError(
                f"{path} is not a teacher cache of format {CACHE_FORMAT} (metadata {metadata!r}); "
                "recompute it with TeacherCache.compute"
            )
        tensors = load_file(str(path))
        n_hidden, n_attn = int(metadata["hidden"]), int(metadata["attentions"])
        outputs = [
            TeacherOutputs(
                fingerprint=fp,
                logits=tensors[f"{i}.logits"],
                hidden=tuple(tensors[f"{i}.hidden.{j}"] for j in range(n_hidden)),
                attentions=tuple(tensors[f"{i}.attention.{j}"] for j in range(n_attn)),
            )
            for i, fp in enumerate(json.loads(metadata["fingerprints"]))
        ]
        return cls(outputs, metadata["kind"], metadata["task_kind"])


def _check_task_kind(task_kind: str) -> None:
    if task_kind not in TASK_KINDS:
        raise ValueError(f"task_kind={task_kind!r} is not known: choose one of {TASK_KINDS}")


def _teacher_outputs(batch: Batch, out: Any, hidden: bool, attention: bool, task_kind: str) -> TeacherOutputs:
    logits = out.logits.detach()
    logits = logits.half() if task_kind == "causal-lm" else logits.float()
    hidden_states: tuple[Tensor, ...] = ()
    maps: tuple[Tensor, ...] = ()
    if hidden:
        hidden_states = tuple(h.detach().float().clone() for h in out.hidden_states)
    if attention:
        maps = tuple(a.detach().half() for a in (out.attentions or ()))
        if not maps:
            raise ValueError("the teacher returned no attention maps even with eager attention")
    return TeacherOutputs(batch_fingerprint(batch), logits.clone(), hidden_states, maps)


# ---------------------------------------------------------------------------------------------
# Quantization-aware training of PackedLinear layers


def quantizer_of(packed: PackedLinear) -> tuple[Method, Any] | None:
    """The quantize-stage method that stored ``packed`` and its value (None: stored as fp32)."""
    for name in packed.made_by:
        method = registry.get(name)
        if method.stage == "quantize" and method.option_of is None:
            return method, method.stored_value(packed)
    if packed.bits != 32:
        raise ValueError(
            f"a {packed.bits}-bit PackedLinear records no quantize method: build it through "
            "apply_plan or a registered method, so distillation knows how to re-store it"
        )
    return None


def trains(packed: PackedLinear) -> bool:
    """Whether distillation may change the layer: no method that made it is frozen."""
    return all(registry.get(name).qat != "frozen" for name in packed.made_by)


class FakeQuantLinear(nn.Module):
    """A trainable stand-in for a PackedLinear during distillation.

    The forward pass uses the weight rounded to the grid of the method that stored the layer
    (``Method.fake_quantize``); the backward pass treats the rounding as identity
    (straight-through estimator). Pruned entries stay zero and get no gradient, because the
    mask multiplies the weight before everything else.
    """

    def __init__(
        self,
        weight: Tensor,
        bias: Tensor | None,
        keep: Tensor | None,
        quantizer: tuple[Method, Any] | None,
        made_by: tuple[str, ...] = (),
        options: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        self.in_features = weight.shape[1]
        self.out_features = weight.shape[0]
        self.quantizer = quantizer
        self.made_by = made_by  # the methods before the quantizer, recorded again on re-storing
        self.options = options or {}  # the quantizer's options (group size), re-stored the same
        self.weight = nn.Parameter(weight.detach().float().clone())
        self.bias = nn.Parameter(bias.detach().float().clone()) if bias is not None else None
        self.keep: Tensor | None
        self.register_buffer("keep", keep)

    @classmethod
    def from_packed(cls, packed: PackedLinear) -> FakeQuantLinear:
        keep = None
        if packed.sparse:
            numel = packed.in_features * packed.out_features
            keep = unpack_bits(packed.mask, numel).view(packed.out_features, packed.in_features)
        quantizer = quantizer_of(packed)
        before = tuple(n for n in packed.made_by if quantizer is None or n != quantizer[0].name)
        options = quantizer[0].stored_options(packed) if quantizer is not None else {}
        return cls(packed.dense_weight(), getattr(packed, "bias", None), keep, quantizer, before, options)

    def rounded(self, w: Tensor) -> Tensor:
        """``w`` on the stored grid (no gradient)."""
        if self.quantizer is None:
            return w.detach() * self.keep if self.keep is not None else w.detach()
        method, value = self.quantizer
        return method.fake_quantize(w, value, self.keep, self.options)

    def forward(self, x: Tensor) -> Tensor:
        w = self.weight * self.keep if self.keep is not None else self.weight
        w = w + (self.rounded(w) - w).detach()
        return F.linear(x, w, self.bias)

    def to_packed(self) -> nn.Module:
        """Re-store the trained weight by the same method and value, with exactly the same mask."""
        weight = self.weight.detach().clone()
        if self.keep is not None:
            # Kept entries that trained to exactly zero are stored as the smallest float, as
            # a mask re-derived by magnitude would have kept them.
            tiny = torch.finfo(weight.dtype).tiny
            weight = torch.where(self.keep & (weight == 0), torch.full_like(weight, tiny), weight)
            weight = weight * self.keep
        bias = self.bias.detach().clone() if self.bias is not None else None
        work = LinearWork(weight, bias, keep=self.keep, made_by=self.made_by, options=self.options)
        if self.quantizer is None:
            packed: nn.Module = PackedLinear.from_work(work, 32)
        else:
            packed = self.quantizer[0].quantize(work, self.quantizer[1])
        self._check_repacked(packed)
        return packed

    def _check_repacked(self, packed: nn.Module) -> None:
        if not isinstance(packed, PackedLinear):
            return  # a method's own storage: it answers for its layout
        bits = 32 if self.quantizer is None else self.quantizer[0].stored_value(packed)
        expected = 32 if self.quantizer is None else self.quantizer[1]
        if (packed.in_features, packed.out_features, bits) != (self.in_features, self.out_features, expected):
            raise RuntimeError("re-packing changed the layer's shape or bits; this is a bug in distill")
        if self.keep is None:
            if packed.sparse:
                raise RuntimeError("re-packing made a dense layer sparse; this is a bug in distill")
            return
        mask = unpack_bits(packed.mask, self.keep.numel()).view_as(self.keep)
        if not packed.sparse or not torch.equal(mask, self.keep):
            raise RuntimeError("re-packing changed the sparsity mask; this is a bug in distill")


@contextmanager
def trainable_packed(model: nn.Module) -> Iterator[list[str]]:
    """Swap every PackedLinear for a FakeQuantLinear; on exit re-pack each one in place.

    Yields the swapped module names. Re-packing runs even if training fails, so the model
    never stays half-swapped.
    """
    names = [
        name for name, module in model.named_modules() if isinstance(module, PackedLinear) and trains(module)
    ]
    for name in names:
        packed = model.get_submodule(name)
        if not isinstance(packed, PackedLinear):
            raise TypeError(f"{name} changed type while swapping")
        model.set_submodule(name, FakeQuantLinear.from_packed(packed))
    try:
        yield names
    finally:
        for name in names:
            fake = model.get_submodule(name)
            if isinstance(fake, FakeQuantLinear):
                model.set_submodule(name, fake.to_packed())


@contextmanager
def frozen_embeddings(model: nn.Module) -> Iterator[None]:
    """Embedding tables do not train (their packed forms hold codes, not parameters)."""
    frozen = [m.weight for m in model.modules() if isinstance(m, nn.Embedding) and m.weight.requires_grad]
    for weight in frozen:
        weight.requires_grad_(False)
    try:
        yield
    finally:
        for weight in frozen:
            weight.requires_grad_(True)


# ---------------------------------------------------------------------------------------------
# Losses


def _token_mask(batch: Batch, rows: int, seq: int) -> Tensor:
    """(rows, seq) float mask of real tokens."""
    if "attention_mask" in batch:
        return batch["attention_mask"].float()
    return torch.ones(rows, seq)


def _kl(student_logits: Tensor, teacher_logits: Tensor, temperature: float) -> Tensor:
    """KL(teacher || student) per row of the last dimension, at ``temperature``, times T^2."""
    s = F.log_softmax(student_logits.float() / temperature, dim=-1)
    t = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    return (t.exp() * (t - s)).sum(dim=-1) * temperature**2


def logit_loss(
    student_logits: Tensor, teacher: TeacherOutputs, batch: Batch, recipe: DistillRecipe, task_kind: str
) -> Tensor:
    """Soft-target KL, mixed with cross-entropy on the batch's labels when it has any.

    Token classification is compared at the labelled positions (the first sub-token of
    each word; every real token when the batch has no labels). Causal LMs are compared on
    next-token logits: position p predicts token p+1, and only positions where both tokens
    are real count.
    """
    labels = batch.get("labels")
    if task_kind == "token-classification":
        return _token_logit_loss(student_logits, teacher.logits, batch, recipe)
    if task_kind == "classification":
        soft = _kl(student_logits, teacher.logits, recipe.temperature).mean()
        if labels is None:
            return soft
        hard = F.cross_entropy(student_logits.float(), labels)
        return recipe.alpha * soft + (1 - recipe.alpha) * hard
    mask = _token_mask(batch, *student_logits.shape[:2])
    pairs = (mask[:, :-1] * mask[:, 1:]).reshape(-1)
    s = student_logits[:, :-1].reshape(-1, student_logits.shape[-1])
    t = teacher.logits[:, :-1].reshape(-1, teacher.logits.shape[-1])
    count = pairs.sum().clamp_min(1)
    soft = (_kl(s, t, recipe.temperature) * pairs).sum() / count
    if labels is None:
        return soft
    targets = labels[:, 1:].reshape(-1)
    hard_rows = F.cross_entropy(s.float(), targets.clamp_min(0), reduction="none")
    valid = pairs * (targets != -100).float()
    hard = (hard_rows * valid).sum() / valid.sum().clamp_min(1)
    return recipe.alpha * soft + (1 - recipe.alpha) * hard


def _token_logit_loss(student: Tensor, teacher: Tensor, batch: Batch, recipe: DistillRecipe) -> Tensor:
    labels = batch.get("labels")
    rows, seq = student.shape[:2]
    counted = (labels != IGNORE).float() if labels is not None else _token_mask(batch, rows, seq)
    counted = counted.reshape(-1)
    s = student.reshape(-1, student.shape[-1])
    t = teacher.reshape(-1, teacher.shape[-1])
    soft = (_kl(s, t, recipe.temperature) * counted).sum() / counted.sum().clamp_min(1)
    if labels is None:
        return soft
    hard = F.cross_entropy(s.float(), labels.reshape(-1), ignore_index=IGNORE)
    return recipe.alpha * soft + (1 - recipe.alpha) * hard


def hidden_loss(student_hidden: Sequence[Tensor], teacher_hidden: Sequence[Tensor], batch: Batch) -> Tensor:
    """Mean over student blocks of the squared error against the mapped teacher block,
    divided by the teacher's mean square: a relative error, so one ``hidden_weight`` suits
    post-norm encoders (states near unit scale) and pre-norm decoders (large residuals) alike.
    Index 0 of both is the embedding output; padding tokens do not count."""
    mapping = layer_map(len(student_hidden) - 1, len(teacher_hidden) - 1)
    mask = _token_mask(batch, *student_hidden[0].shape[:2])[..., None]
    terms = []
    for i, j in enumerate(mapping):
        s, t = student_hidden[i + 1], teacher_hidden[j + 1].float()
        terms.append(((s - t) ** 2 * mask).sum() / ((t**2) * mask).sum().clamp_min(1e-12))
    return torch.stack(terms).mean()


def attention_loss(student_maps: Sequence[Tensor], teacher_maps: Sequence[Tensor], batch: Batch) -> Tensor:
    """Mean KL(teacher || student) over attention rows of real query tokens, per mapped block.

    When head counts differ (structured pruning removed heads, and which teacher head each
    remaining one was is not recorded here), both maps are averaged over heads first.
    """
    mapping = layer_map(len(student_maps), len(teacher_maps))
    first = student_maps[0]
    query = _token_mask(batch, first.shape[0], first.shape[2])  # (batch, query)
    terms = []
    for i, j in enumerate(mapping):
        s, t = student_maps[i], teacher_maps[j].float()
        if s.shape[1] != t.shape[1]:
            s, t = s.mean(dim=1, keepdim=True), t.mean(dim=1, keepdim=True)
        rows = (torch.xlogy(t, t) - t * torch.log(s.clamp_min(1e-12))).sum(dim=-1)  # (b, h, q)
        weight = query[:, None, :].expand_as(rows)
        terms.append((rows * weight).sum() / weight.sum().clamp_min(1))
    return torch.stack(terms).mean()


def distill_loss(
    student_out: Any, teacher: TeacherOutputs, batch: Batch, recipe: DistillRecipe, task_kind: str
) -> Tensor:
    loss = logit_loss(student_out.logits, teacher, batch, recipe, task_kind)
    if recipe.uses_hidden and recipe.hidden_weight:
        loss = loss + recipe.hidden_weight * hidden_loss(student_out.hidden_states, teacher.hidden, batch)
    if recipe.uses_attention and recipe.attention_weight:
        maps = student_out.attentions
        if not maps:
            raise ValueError("the student returned no attention maps; it needs eager attention")
        loss = loss + recipe.attention_weight * attention_loss(maps, teacher.attentions, batch)
    return loss


def _student_forward(student: nn.Module, batch: Batch, recipe: DistillRecipe) -> Any:
    return student(
        **model_inputs(batch),
        output_hidden_states=recipe.uses_hidden,
        output_attentions=recipe.uses_attention,
    )


def evaluate_loss(
    student: nn.Module, cache: TeacherCache, batches: Sequence[Batch], recipe: DistillRecipe, task_kind: str
) -> float:
    """The recipe's loss averaged over all batches, in eval mode, without training.

    PackedLinear layers compute as they are (int8 layers on their kernel), so this is the
    loss of the deployed student.
    """
    _check_inputs(cache, batches, recipe, task_kind)
    was_training = student.training
    student.eval()
    total = 0.0
    wanted = "eager" if recipe.uses_attention else None
    try:
        with torch.no_grad(), attention_implementation(student, wanted):
            for batch, teacher in zip(batches, cache.outputs, strict=True):
                out = _student_forward(student, batch, recipe)
                total += float(distill_loss(out, teacher, batch, recipe, task_kind))
    finally:
        student.train(was_training)
    return total / max(len(batches), 1)


# ---------------------------------------------------------------------------------------------
# Training


def _check_inputs(
    cache: TeacherCache, batches: Sequence[Batch], recipe: DistillRecipe, task_kind: str
) -> None:
    _check_task_kind(task_kind)
    if task_kind != cache.task_kind:
        raise ValueError(f"the teacher cache is for task_kind={cache.task_kind!r}, not {task_kind!r}")
    if not recipe.is_off and not cache.covers(recipe):
        raise ValueError(
            f"recipe kind {recipe.kind!r} needs teacher outputs the cache (kind {cache.kind!r}) lacks; "
            f"compute the cache with kind={recipe.kind!r} or richer"
        )
    if not batches:
        raise ValueError("distill needs at least one batch")
    too_big = [i for i, b in enumerate(batches) if b["input_ids"].shape[0] > recipe.batch_size]
    if too_big:
        raise ValueError(
            f"batches {too_big[:5]} hold more rows than the recipe's batch_size={recipe.batch_size}; "
            "batch the distillation data with recipe.batch_size"
        )
    cache.check_batches(batches)


def _batch_order(n_batches: int, steps: int, generator: torch.Generator) -> list[int]:
    """Shuffled epochs over the batches (they are often sorted by length), as many as needed."""
    order: list[int] = []
    while len(order) < steps:
        order.extend(torch.randperm(n_batches, generator=generator).tolist())
    return order[:steps]


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else float("nan")


def distill(
    student: nn.Module,
    teacher_cache: TeacherCache,
    batches: Sequence[Batch],
    recipe: DistillRecipe,
    task_kind: str,
) -> dict[str, float]:
    """Train ``student`` in place to match the cached teacher outputs on ``batches``.

    Returns stats: ``steps``, ``seconds``, ``trainable`` (parameters), ``qat_layers``, and
    ``loss_start``/``loss_end`` (training loss averaged over the first and last tenth of
    the steps). The student ends in eval mode with its compressed layout unchanged.
    Deterministic for a given recipe (its ``seed`` orders the batches); the global RNG state is
    left untouched. Dropout is off throughout (the student runs in eval mode with gradients).
    """
    started = time.monotonic()
    if recipe.is_off:
        student.eval()
        return {"steps": 0.0, "seconds": 0.0, "trainable": 0.0, "qat_layers": 0.0}
    _check_inputs(teacher_cache, batches, recipe, task_kind)
    wanted = "eager" if recipe.uses_attention else None
    with (
        torch.random.fork_rng(devices=[]),
        trainable_packed(student) as swapped,
        frozen_embeddings(student),
        attention_implementation(student, wanted),
    ):
        torch.manual_seed(recipe.seed)
        curve, trainable = _train(student, teacher_cache, batches, recipe, task_kind)
    student.eval()
    tenth = max(len(curve) // 10, 1)
    return {
        "steps": float(len(curve)),
        "seconds": time.monotonic() - started,
        "trainable": float(trainable),
        "qat_layers": float(len(swapped)),
        "loss_start": _mean(curve[:tenth]),
        "loss_end": _mean(curve[-tenth:]),
    }


def _train(
    student: nn.Module, cache: TeacherCache, batches: Sequence[Batch], recipe: DistillRecipe, task_kind: str
) -> tuple[list[float], int]:
    params = [p for p in student.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the student has no trainable parameters left to distil")
    optimizer = torch.optim.AdamW(params, lr=recipe.learning_rate, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 - step / recipe.steps)
    generator = torch.Generator().manual_seed(recipe.seed)
    # Dropout stays off: the cache holds the teacher's eval-mode outputs, and dropout noise
    # would put them out of reach of the hidden and attention terms in a short run.
    student.eval()
    curve = []
    for index in _batch_order(len(batches), recipe.steps, generator):
        batch = batches[index]
        out = _student_forward(student, batch, recipe)
        loss = distill_loss(out, cache.outputs[index], batch, recipe, task_kind)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"distillation loss became {float(loss)}; lower the learning_rate")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        schedule.step()
        curve.append(float(loss.detach()))
    return curve, sum(p.numel() for p in params)
