"""The evaluator protocol and the context every evaluator receives.

Evaluators know nothing of Optuna or Ray: they take a torch model and a context and return
one number, so a user can test a plugin with plain torch.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal, Protocol, runtime_checkable

from torch import Tensor, nn

from slimsearch.spaces.plan import CompressionPlan

Direction = Literal["minimize", "maximize"]
TaskKind = Literal["classification", "token-classification", "causal-lm"]


BACKENDS = ("torch", "onnxruntime")
# The tasks whose models spaces/onnx.py writes (and ONNX Runtime times and checks).
ONNX_TASKS = ("classification", "causal-lm")


@dataclass(frozen=True)
class LatencySpec:
    """How latency is measured (see evaluators/latency.py for the protocol).

    ``shapes`` adds (batch, seq_len) pairs beyond the primary one; ``target`` names the Ray
    resource of the machines latency must be measured on (None: wherever the trial runs).
    ``precision``: keep adding blocks of ``repeats`` interleaved passes until the ratio's 95%
    interval is within +-precision of it, or ``max_repeats`` passes (never fewer than
    ``repeats``). ``max_drift``: re-measure when the baseline runs this much slower than the
    quietest it has run (in this process or earlier trials of the study: a busy neighbour).
    0 turns either off. ``time_budget``: seconds one measurement (all shapes, warm-up and
    retries) may take; past it the best attempt so far is kept and flagged ``noisy`` (0: no
    limit). ``decode_tokens``: how many tokens the decode evaluators generate after the
    first (causal LMs; the prompt is ``seq_len`` tokens). ``backend``: the runtime the
    latency objectives time the model in, ``torch`` or ``onnxruntime`` (classifiers and
    causal LMs' forward passes: the model and the baseline are exported to ONNX with the
    operators of their stored formats and timed in ONNX Runtime, see spaces/onnx.py).
    """

    batch_size: int = 1
    seq_len: int = 64
    warmup: int = 5
    repeats: int = 20
    threads: int = 2
    max_cv: float = 0.15
    retries: int = 2
    precision: float = 0.01
    max_repeats: int = 200
    max_drift: float = 0.05
    shapes: tuple[tuple[int, int], ...] = ()
    target: str | None = None
    time_budget: float = 60.0
    decode_tokens: int = 32
    backend: str = "torch"

    def __post_init__(self) -> None:
        for name in (
            "batch_size",
            "seq_len",
            "warmup",
            "repeats",
            "threads",
            "retries",
            "max_repeats",
            "decode_tokens",
        ):
            value = getattr(self, name)
            low = 0 if name in ("warmup", "retries") else 1
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise ValueError(f"latency.{name}={value!r}: give an integer >= {low}")
        if not isinstance(self.max_cv, (int, float)) or not self.max_cv > 0:
            raise ValueError(f"latency.max_cv={self.max_cv!r}: give a positive fraction such as 0.15")
        for name, example in (("precision", "0.01"), ("max_drift", "0.05"), ("time_budget", "60 (seconds)")):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
                raise ValueError(f"latency.{name}={value!r}: give a fraction >= 0 such as {example} (0: off)")
        for shape in self.shapes:
            ok = isinstance(shape, tuple) and len(shape) == 2
            if not ok or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in shape):
                raise ValueError(
                    f"latency.shapes: {shape!r} is not a [batch_size, seq_len] pair of positive ints"
                )
        if self.backend not in BACKENDS:
            raise ValueError(f"latency.backend={self.backend!r}: choose one of {list(BACKENDS)}")
        if self.target is not None and (not isinstance(self.target, str) or not self.target):
            raise ValueError(f"latency.target={self.target!r}: give the name of a Ray custom resource")

    def all_shapes(self) -> list[tuple[int, int]]:
        primary = (self.batch_size, self.seq_len)
        return [primary] + [s for s in self.shapes if s != primary]


@dataclass
class EvalContext:
    """What an evaluator may use.

    - ``task``: "classification", "token-classification" or "causal-lm".
    - ``batches``: the test data as ready model inputs: for classification dicts of
      input_ids / attention_mask / labels, and token_type_ids for a text pair where the
      tokenizer gives segment ids (pass ``spaces.inputs.model_inputs(batch)`` to the model);
      for token classification the same with ``labels`` per position (the first sub-token
      of each word its tag id, every other position -100, which nothing counts);
      for causal LMs dicts of input_ids blocks.
    - ``vocab_size``, ``plan`` (the trial's plan as applied), ``latency`` (how to time).
    - ``baseline``: the baseline's measured values by evaluator name (empty while the
      baseline itself is measured).
    - ``reference``: the uncompressed baseline model when the caller has it.
    - ``tokenizer``: the baseline's tokenizer (a transformers tokenizer), when the caller
      has it: to decode predictions, or to tokenize text of the evaluator's own.
    - ``data``: the task's data object (search/data.py ``TaskData``) when the caller has it:
      ``data.task`` (the study's task section), ``data.splits()`` (train/test rows as
      ``(text, class id)``, or ``(words, tag ids)``), ``data.class_names()``, ``data.text()``
      (a causal LM's text), ``data.test_batches()``.
      Read it; never change it (every trial in the process shares it).
    - ``options``: the evaluator's options from the study file.
    - ``records``: details an evaluator wants kept with the trial (e.g. latency spread).
    """

    task: TaskKind
    batches: list[dict[str, Tensor]]
    vocab_size: int
    plan: CompressionPlan
    latency: LatencySpec = field(default_factory=LatencySpec)
    baseline: dict[str, float] = field(default_factory=dict)
    reference: nn.Module | None = None  # the uncompressed model, for interleaved timing
    options: dict[str, Any] = field(default_factory=dict)
    records: dict[str, Any] = field(default_factory=dict)
    tokenizer: Any = None
    data: Any = None  # search.data.TaskData; typed loosely since evaluators never import search


@runtime_checkable
class Evaluator(Protocol):
    """A measurement of a compressed model: ``name``, ``direction`` and ``evaluate``.

    An evaluator may also set ``exclusive = True`` when it must run with no other trial
    computing on the machine (timing does); the worker then holds a machine-wide lock. And
    ``tasks``, the task kinds it can measure (e.g. ``("causal-lm",)`` for decode speed): a
    study of another kind is refused before any trial. ``repeatable = False`` marks a
    measurement that moves from run to run of the same model (resident memory): an export
    re-measures and reports it instead of requiring the searched value back. ``compare``,
    "difference" (the default) or "ratio": how a value is judged against the baseline's,
    which a constraint written as ``{metric: NAME, limit: x}`` reads (a difference on a
    maximized metric bounds the drop, a ratio on a minimized one bounds value / baseline).
    ``check()``, when defined, validates the evaluator's own inputs (a data file it reads)
    and is called when the study is read, before any model is loaded: raise ValueError
    naming the value and the fix. evaluators/testing.py holds the conformance suite an
    evaluator's tests inherit.
    """

    name: str
    direction: Direction

    def evaluate(self, model: nn.Module, context: EvalContext) -> float: ...
