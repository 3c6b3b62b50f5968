"""A task of lm-eval-harness, run on the compressed model itself (the optional ``lmeval``
extra): ``{name: lm_eval, options: {task: my_task, include_path: tasks/, metric: acc}}``.

``include_path`` is a folder of the user's own task YAML files (lm-eval's task format; its
data may be a local file read through `datasets`), so nothing is fetched. The model is
handed to lm-eval's ``HFLM`` as an object, with the baseline's tokenizer, on the CPU.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

from torch import nn

from slimsearch.evaluators.base import Direction, EvalContext
from slimsearch.evaluators.device import model_device


class LmEvalTask:
    name = "lm_eval"
    compare = "difference"
    direction: Direction = "maximize"
    tasks = ("causal-lm",)

    def __init__(
        self,
        task: str = "",
        include_path: str = "",
        metric: str = "acc",
        limit: int | None = None,
        num_fewshot: int | None = None,
        batch_size: int = 8,
        direction: Direction = "maximize",
    ) -> None:
        self.task = task
        self.include_path = include_path
        self.metric = metric
        self.limit = limit
        self.num_fewshot = num_fewshot
        self.batch_size = batch_size
        self.direction = direction

    def check(self) -> None:
        """lm-eval installed, the task folder there, the task in it (before any model loads)."""
        if importlib.util.find_spec("lm_eval") is None:
            raise ValueError("lm_eval needs the lm-eval package: pip install -e '.[lmeval]'")
        if not self.task:
            raise ValueError("lm_eval: give options.task, the name of a task in options.include_path")
        if not self.include_path or not Path(self.include_path).is_dir():
            raise ValueError(
                f"lm_eval: options.include_path {self.include_path!r} is not a folder; give the folder "
                "of your task YAML files"
            )
        known = self._manager().all_tasks
        if self.task not in known:
            mine = sorted(t for t in known if str(t).startswith(self.task[:3]))[:8]
            raise ValueError(
                f"lm_eval: no task {self.task!r} in {self.include_path} (or lm-eval's own); similar: {mine}"
            )

    def _manager(self) -> Any:
        from lm_eval.tasks import TaskManager

        return TaskManager(include_path=self.include_path, verbosity="ERROR")

    def evaluate(self, model: nn.Module, context: EvalContext) -> float:
        import lm_eval
        from lm_eval.models.huggingface import HFLM

        if context.tokenizer is None:
            raise ValueError("lm_eval needs the context's tokenizer; run it through slimsearch")
        tokenizer = context.tokenizer
        extra: dict[str, Any] = {}
        if tokenizer.bos_token_id is None and tokenizer.eos_token_id is None:
            # lm-eval decodes a prefix token (BOS, else EOS) for empty contexts; a tokenizer with
            # neither (a word tokenizer built for a config) offers its padding token instead.
            extra["prefix_token_id"] = tokenizer.pad_token_id or 0
        lm = HFLM(
            pretrained=model,
            tokenizer=tokenizer,
            device=str(model_device(model)),
            batch_size=self.batch_size,
            **extra,
        )
        out = lm_eval.simple_evaluate(
            model=lm,
            tasks=[self.task],
            task_manager=self._manager(),
            limit=self.limit,
            num_fewshot=self.num_fewshot,
            bootstrap_iters=0,
            log_samples=False,
            verbosity="ERROR",
        )
        scores = (out or {}).get("results", {}).get(self.task, {})
        key = self.metric if "," in self.metric else f"{self.metric},none"
        if key not in scores:
            raise ValueError(
                f"lm_eval: task {self.task!r} reports {sorted(scores)}, not {key!r}; set options.metric"
            )
        value = float(scores[key])
        return 100.0 * value if self.metric.split(",")[0] in ("acc", "acc_norm", "exact_match") else value
