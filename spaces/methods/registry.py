"""The method registry: every compression method is one registered ``Method``.

A method owns one knob (``name``: the key in study files, plans and Optuna parameters). It
declares where it applies (``scopes``), when it runs (``stage``), its off value, the values a
study file may list, whether it reads calibration statistics, what it realizes, and how it
behaves under distillation. The plan, the space, apply, the report, the results table, export,
sensitivity and the conformance suite read these declarations; none of them names a method.

Register a method by decorating its class with ``@register``; a study file can also name one
as ``package.module:ClassName`` (``resolve``), as it can an evaluator.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field, replace
from typing import Any, ClassVar, Literal

from torch import Tensor, nn

Stage = Literal["structured", "depth", "factorize", "sparsify", "quantize"]
# The order methods run in, whatever order a plan lists them: structured pruning changes
# shapes, depth drops blocks, factorization makes the matrices that get stored, sparsity
# chooses which of their entries are kept, quantization stores the kept values.
STAGES: tuple[Stage, ...] = ("structured", "depth", "factorize", "sparsify", "quantize")
Scope = Literal["block", "linear", "table"]
# What a method's result buys; the latency evaluator measures what really happens anyway.
SPEED, SIZE, BOTH, NOTHING = "speed", "size", "speed+size", "nothing"
# Under distillation a method's layers either train through a fake-quantization grid and are
# re-stored by the method afterwards ("requantize"), keep their stored values untouched
# ("frozen": e.g. a calibrated quantizer whose codes plain rounding would undo), or simply
# train as the modules they are ("train": low-rank factors, pruned shapes).
QAT = Literal["requantize", "frozen", "train"]


def is_fraction(value: Any) -> bool:
    """Whether ``value`` is a number in [0, 1) (not a bool): what fraction knobs take."""
    return not isinstance(value, bool) and isinstance(value, (int, float)) and 0.0 <= value < 1.0


@dataclass
class LinearWork:
    """One Linear on its way through the layer stages: its weight (fp32, out x in), bias,
    the entries sparsity kept (None: all), the input statistics of the layer (None where the
    method runs without them or on a factor whose input was never observed), the methods
    that made it so far (recorded on the stored module), the values of the layer's option
    methods (``Method.option_of``), and the per-input-column scale the weight was multiplied
    by (activation-aware scaling; the stored layer divides it back out)."""

    weight: Tensor
    bias: Tensor | None
    keep: Tensor | None = None
    stats: Any = None
    made_by: tuple[str, ...] = ()
    options: Mapping[str, Any] = field(default_factory=dict)
    column_scale: Tensor | None = None

    @property
    def in_features(self) -> int:
        return int(self.weight.shape[1])

    @property
    def out_features(self) -> int:
        return int(self.weight.shape[0])


class Method:
    """Base of every compression method. Subclasses set the class attributes and override the
    hook of their stage; ``register`` checks them. No state: methods are used as classes'
    singletons and must not keep anything between calls."""

    name: ClassVar[str]
    stage: ClassVar[Stage]
    scopes: ClassVar[frozenset[Scope]]
    # The value a plan stores when the method is off, and the value a study file lists for
    # "off" (they differ for rank: a plan says None, a study file 1.0 of the weights kept).
    off: ClassVar[Any]
    choice_off: ClassVar[Any] = None
    # Calibration statistics the method reads (see calibration.py): "act_sq" (per input column,
    # the sum of squares over real tokens) and/or "hessian" (X^T X).
    needs: ClassVar[frozenset[str]] = frozenset()
    qat: ClassVar[QAT] = "train"
    # Bumped whenever the method stores different results for the same input, so cached
    # results (layer store, sensitivity profiles, benchmark caches) are not reused across it.
    version: ClassVar[int] = 1
    # Plotly colour scale of the report's per-layer heat map of this knob.
    colorscale: ClassVar[str] = "Viridis"
    # Listed in a space's parameters even when a study file leaves it off. True only for the
    # methods that were there before the registry, so existing studies keep their fingerprint.
    always_listed: ClassVar[bool] = False
    # Where the method's knob is listed among a scope's knobs (plans, spaces, tables): lower
    # first, then registration order. The built-ins take 10-50, so existing plans and spaces
    # keep their order whatever order modules are imported in.
    position: ClassVar[int] = 100
    # For block methods: what a block must have for the method to apply (for error messages).
    block_part: ClassVar[str] = "part"
    # An option changes how the method of its stage works instead of storing anything itself
    # (a group size, GPTQ's rounding, AWQ's scales): its value reaches that method in
    # ``LinearWork.options``. Quantize options may override ``prepare`` (change the weight
    # before codes are chosen) and ``choose_codes`` (choose them; ``rounds = True``), which
    # ``calibrated_codes`` runs for any quantize method that exposes a ``Grid``.
    option_of: ClassVar[Stage | None] = None
    # A rounding option chooses codes on its host's grid and stores them in the host's
    # layout, so it never changes a layer's bytes (the sensitivity profile relies on it).
    rounds: ClassVar[bool] = False
    # For options: the settings of the method they modify, switched on with them where an
    # option alone would do nothing (conformance cases, the realized table).
    option_base: ClassVar[Mapping[str, Any]] = {}

    def acts_with(self, host: Mapping[str, Any]) -> bool:
        """For an option: whether it changes a layer whose host settings are ``host`` (e.g.
        ``group`` does nothing at 16 bits); uniform seeds skip the pairs where it does not."""
        return True

    # -- values -----------------------------------------------------------------------------
    def check(self, value: Any) -> Any:
        """The plan value, validated (ValueError naming the value and what is allowed)."""
        return value

    def check_choice(self, value: Any) -> Any:
        """A value a study file lists, validated."""
        return self.check(value)

    def allowed(self) -> tuple[Any, ...] | None:
        """Every value a study file may list, where they are few (None: a range)."""
        return None

    def table_allowed(self) -> tuple[Any, ...] | None:
        """For table scope: the values an embedding table may take (None: as ``allowed``)."""
        return None

    def choice_off_value(self) -> Any:
        return self.off if self.choice_off is None else self.choice_off

    def setting(self, choice: Any, shape: tuple[int, int] | None) -> Any:
        """The plan value of a study-file ``choice`` for a Linear of ``shape`` (in, out)."""
        return choice

    def is_off(self, value: Any) -> bool:
        return bool(value == self.off)

    def short(self, value: Any) -> str:
        """A few characters for summaries ("8b", "s0.5")."""
        return f"{self.name}{value}"

    def display(self, value: Any) -> str:
        """How the report's table shows a plan value."""
        return "" if value is None else f"{value:g}" if isinstance(value, (int, float)) else str(value)

    def realized(self, value: Any) -> str:
        """What this value buys: SPEED, SIZE or BOTH."""
        return SIZE

    def realized_key(self, value: Any) -> str:
        """The name a plan's ``realized()`` lists this value under."""
        return self.name

    def amend_realized(self, value: Any, values: Mapping[str, Any], realized: dict[str, str]) -> None:
        """Change what the layer's methods realize given the others (``values``: all of the
        layer's methods), in place; options, which are not listed themselves, say here what
        they make of their host."""

    def examples(self) -> tuple[Any, ...]:
        """Non-off plan values the conformance suite checks (on every scope the method has)."""
        raise NotImplementedError(f"method {self.name!r} gives no examples for its conformance suite")

    # -- blocks (block scope) ------------------------------------------------------------
    def layout(self, model: nn.Module) -> Any:
        """What the method needs to know of a model's blocks (computed once per space)."""
        return None

    def blocks(self, layout: Any) -> list[str]:
        """The block names this method can change, in model order."""
        return []

    def shrunk(
        self, layout: Any, values: Mapping[str, Any], shapes: Mapping[str, tuple[int, int]]
    ) -> dict[str, tuple[int, int]]:
        """Linear (in, out) shapes after this method changes ``values`` (block -> value)."""
        return dict(shapes)

    def kept_columns(
        self, layout: Any, values: Mapping[str, Any], selection: Mapping[str, str]
    ) -> dict[str, Tensor]:
        """For block methods that remove a Linear's input columns: which of the baseline's
        columns each such Linear kept (by name), so calibration statistics follow the cut."""
        return {}

    # -- stage hooks (override the one of your stage) --------------------------------------
    def apply_blocks(
        self,
        model: nn.Module,
        values: Mapping[str, Any],
        stats: Any,
        selection: Mapping[str, str],
    ) -> dict[str, str]:
        """Structured and depth stages: change the blocks named in ``values`` (block name ->
        non-off value) in place; return what was kept as plan selection entries."""
        raise NotImplementedError(f"method {self.name!r} has no block stage")

    def factorize(self, work: LinearWork, value: Any) -> tuple[nn.Module, dict[str, LinearWork]]:
        """Factorize stage: the module that replaces the Linear and its leaf Linears (by
        attribute name) that the later stages store."""
        raise NotImplementedError(f"method {self.name!r} does not factorize")

    def sparsify(self, work: LinearWork, value: Any) -> LinearWork:
        """Sparsify stage: ``work`` with fewer entries kept (and zeroed)."""
        raise NotImplementedError(f"method {self.name!r} does not sparsify")

    def quantize(self, work: LinearWork, value: Any) -> nn.Module:
        """Quantize stage: the module that stores ``work`` (its buffers are what is saved)."""
        raise NotImplementedError(f"method {self.name!r} does not quantize")

    def quantize_table(self, table: nn.Embedding, value: Any) -> nn.Module:
        """Quantize stage, table scope: the module that stores an embedding table."""
        raise NotImplementedError(f"method {self.name!r} does not store embedding tables")

    def fake_quantize(
        self, weight: Tensor, value: Any, keep: Tensor | None, options: Mapping[str, Any] | None = None
    ) -> Tensor:
        """For qat = "requantize": ``weight`` on the grid this method stores it on (no grad),
        under the layer's quantize ``options`` (``stored_options``)."""
        raise NotImplementedError(f"method {self.name!r} has no fake-quantization grid")

    def stored_value(self, module: nn.Module) -> Any:
        """For quantize methods: the plan value that re-stores ``module`` after training."""
        raise NotImplementedError(f"method {self.name!r} cannot read its value back from a module")

    def stored_options(self, module: nn.Module) -> dict[str, Any]:
        """For quantize methods: the option values (``LinearWork.options``) that re-store
        ``module`` after training as it was stored."""
        return {}

    def grid(self, work: LinearWork, value: Any) -> Any:
        """For quantize methods whose codes options may choose: the ``quantize.Grid`` of
        ``value`` for ``work`` (None: this value has no integer grid, e.g. bf16)."""
        return None

    # -- option hooks ------------------------------------------------------------------------
    def prepare(self, work: LinearWork, value: Any, grid: Any) -> LinearWork:
        """Quantize options: ``work`` changed before its codes are chosen on ``grid``."""
        return work

    def choose_codes(self, work: LinearWork, value: Any, grid: Any) -> tuple[Tensor, Tensor, Tensor | None]:
        """Quantize options with ``rounds``: codes, scales and offsets of ``work`` on ``grid``."""
        raise NotImplementedError(f"method {self.name!r} does not choose codes")

    def __repr__(self) -> str:
        return f"<method {self.name!r} ({self.stage})>"


class Switch(Method):
    """A method whose knob is on or off (``true``/``false``); ``true_means`` says what on does
    in the error message."""

    off = False
    true_means: ClassVar[str] = ""

    def check(self, value: Any) -> Any:
        if not isinstance(value, bool):
            raise ValueError(f"{self.name}={value!r} must be true{self.true_means} or false")
        return value

    def allowed(self) -> tuple[Any, ...] | None:
        return (False, True)


_REGISTRY: dict[str, Method] = {}


def register(cls: type[Method]) -> type[Method]:
    """Class decorator: validate a Method subclass and register one instance under its name."""
    name = getattr(cls, "name", None)
    if not isinstance(name, str) or not name.isidentifier():
        raise ValueError(f"method class {cls.__name__}: give a `name` that is an identifier, got {name!r}")
    if name in _REGISTRY:
        raise ValueError(
            f"a compression method named {name!r} is already registered "
            f"({type(_REGISTRY[name]).__module__}.{type(_REGISTRY[name]).__name__}); pick another name"
        )
    stage = getattr(cls, "stage", None)
    if stage not in STAGES:
        raise ValueError(f"method {name!r}: stage {stage!r} is not one of {list(STAGES)}")
    scopes = getattr(cls, "scopes", None)
    if not scopes or not set(scopes) <= {"block", "linear", "table"}:
        raise ValueError(
            f"method {name!r}: scopes {scopes!r} must be a non-empty subset of block, linear, table"
        )
    if ("block" in scopes) != (stage in ("structured", "depth")):
        raise ValueError(
            f"method {name!r}: block-scoped methods run in the structured or depth stage, and only they"
        )
    if not hasattr(cls, "off"):
        raise ValueError(f"method {name!r}: give an `off` value (what a plan stores when it is off)")
    unknown = set(getattr(cls, "needs", ())) - {"act_sq", "hessian"}
    if unknown:
        raise ValueError(f"method {name!r}: needs {sorted(unknown)} unknown; statistics are act_sq, hessian")
    if getattr(cls, "qat", None) not in ("requantize", "frozen", "train"):
        raise ValueError(f"method {name!r}: qat {cls.qat!r} must be requantize, frozen or train")
    option_of = getattr(cls, "option_of", None)
    if option_of is not None and (option_of not in STAGES or set(scopes) != {"linear"} or option_of != stage):
        raise ValueError(
            f"method {name!r}: an option is linear-scoped and names its own stage as option_of, "
            f"got option_of={option_of!r}, stage={stage!r}, scopes={sorted(scopes)}"
        )
    _REGISTRY[name] = cls()
    return cls


def unregister(name: str) -> None:
    """Remove a method (tests that register their own)."""
    _REGISTRY.pop(name, None)


def get(name: str) -> Method:
    if name not in _REGISTRY:
        raise ValueError(
            f"unknown compression method {name!r}; the registered methods are {sorted(_REGISTRY)}"
        )
    return _REGISTRY[name]


def methods(scope: Scope | None = None, stage: Stage | None = None) -> list[Method]:
    """Registered methods in registration order (built-ins first), optionally filtered."""
    listed = sorted(enumerate(_REGISTRY.values()), key=lambda item: (item[1].position, item[0]))
    return [
        m for _, m in listed if (scope is None or scope in m.scopes) and (stage is None or m.stage == stage)
    ]


def names(scope: Scope | None = None) -> tuple[str, ...]:
    return tuple(m.name for m in methods(scope))


def in_stage_order(items: Mapping[str, Any]) -> Iterator[tuple[Method, Any]]:
    """(method, value) for each knob of ``items``, in stage order (registration order within one)."""
    order = {m.name: i for i, m in enumerate(methods())}
    chosen = sorted((get(k) for k in items), key=lambda m: (STAGES.index(m.stage), order[m.name]))
    for method in chosen:
        yield method, items[method.name]


def versions() -> dict[str, int]:
    """Every registered method's version: part of the key of anything cached from results."""
    return {m.name: m.version for m in methods()}


def table_method() -> Method:
    """The quantize-stage method that stores embedding tables (what ``space.embeddings`` and
    ``space.lm_head`` choose for)."""
    found = [m for m in methods("table") if m.stage == "quantize"]
    if not found:
        raise ValueError("no registered method stores embedding tables; space.embeddings cannot be searched")
    return found[0]


def resolve(spec: str) -> Method:
    """A registered method by name, or ``package.module:ClassName`` (imported and registered)."""
    if ":" not in spec:
        return get(spec)
    module_name, _, attr = spec.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ValueError(
            f"method {spec!r}: cannot import {module_name!r} ({exc}); is it installed?"
        ) from None
    cls = getattr(module, attr, None)
    if not (isinstance(cls, type) and issubclass(cls, Method)):
        raise ValueError(f"method {spec!r}: {module_name} has no Method subclass named {attr!r}")
    if getattr(cls, "name", None) not in _REGISTRY:
        register(cls)
    method = get(cls.name)
    if type(method) is not cls:
        raise ValueError(
            f"method {spec!r} is named {cls.name!r}, which {type(method).__module__}.{type(method).__name__} "
            "already registered; give it another name"
        )
    return method


def calibrated_codes(work: LinearWork, grid: Any) -> tuple[LinearWork, Tensor, Tensor, Tensor | None]:
    """Codes of ``work`` on ``grid`` as its quantize options say: each option's ``prepare`` in
    listing order, then the one option that ``rounds`` chooses the codes (round-to-nearest
    when none does). Returns the prepared work (its ``made_by`` naming the options that ran)
    with codes, scales and offsets."""
    chosen = [
        m for m in methods("linear", "quantize") if m.option_of == "quantize" and m.name in work.options
    ]
    rounders = [m for m in chosen if m.rounds]
    if len(rounders) > 1:
        raise ValueError(
            f"options {[m.name for m in rounders]} all choose a layer's codes; a layer takes one of them"
        )
    for method in chosen:
        work = method.prepare(work, work.options[method.name], grid)
    work = replace(work, made_by=(*work.made_by, *(m.name for m in chosen if m.qat == "frozen")))
    if rounders:
        codes, scale, offset = rounders[0].choose_codes(work, work.options[rounders[0].name], grid)
    else:
        codes, scale, offset = grid.round(work.weight, work.keep)
    return work, codes, scale, offset
