"""How good a compressed model is: quality on a task, size, latency, and user plugins."""

from slimsearch.evaluators.base import Direction, EvalContext, Evaluator, LatencySpec, TaskKind
from slimsearch.evaluators.decode import DecodeSpeedup, DecodeTokensPerS, TimeToFirstToken, measure_decode
from slimsearch.evaluators.latency import LatencyMs, LatencyRatio, measure, time_forward
from slimsearch.evaluators.memory import ResidentBytes, measure_resident
from slimsearch.evaluators.quality import Accuracy, Perplexity
from slimsearch.evaluators.registry import evaluator_names, import_object, make_evaluator, register_evaluator
from slimsearch.evaluators.size import SizeBytes

__all__ = [
    "Accuracy",
    "DecodeSpeedup",
    "DecodeTokensPerS",
    "Direction",
    "EvalContext",
    "Evaluator",
    "LatencyMs",
    "LatencyRatio",
    "LatencySpec",
    "Perplexity",
    "ResidentBytes",
    "SizeBytes",
    "TaskKind",
    "TimeToFirstToken",
    "evaluator_names",
    "import_object",
    "make_evaluator",
    "measure",
    "measure_decode",
    "measure_resident",
    "register_evaluator",
    "time_forward",
]
