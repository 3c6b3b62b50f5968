"""The baseline: the uncompressed model every trial starts from.

``prepare_baseline`` builds it once (fine-tuning a classifier head when the study asks)
and saves it with its tokenizer under ``<cache>/baselines/<key>``, where the key hashes
everything that decides its weights. Later runs, and every worker, load that folder.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import math
import random
import shutil
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from torch import nn

from slimsearch.search import assets, tasks
from slimsearch.search.log import fmt_seconds, quiet_libraries, say
from slimsearch.search.study_file import LABELLED_KINDS, FinetuneSpec, StudySpec
from slimsearch.spaces.linears import as_linears

# 2: the classifier head that from_pretrained adds is seeded (format 1 left it to chance, so
# two clones of one study fine-tuned different baselines: MiniLM scored 80.1% and 79.6%).
BASELINE_FORMAT = 2

# tokenizer_config classes that mean "just the tokenizer.json" (transformers 5 and 4 names).
BARE_TOKENIZERS = ("TokenizersBackend", "PreTrainedTokenizerFast")

AUTO_CLASSES = {
    "classification": "AutoModelForSequenceClassification",
    "token-classification": "AutoModelForTokenClassification",
    "causal-lm": "AutoModelForCausalLM",
}


def baseline_key(spec: StudySpec) -> str:
    parts: dict[str, Any] = {
        "format": BASELINE_FORMAT,
        "source": spec.model.source,
        "config": spec.model.config,
    }
    if spec.model.finetune is not None or spec.model.source == "config":
        # The training data (and the tokenizer built from it) decide the weights.
        parts["finetune"] = asdict(spec.model.finetune) if spec.model.finetune else None
        task = spec.task.identity()
        task.pop("eval_batch_size")
        task.pop("calibration_rows")  # what the methods calibrate on, not what the baseline trains on
        parts["task"] = task
    if spec.task.kind == "token-classification":
        parts["kind"] = spec.task.kind  # the same model and data make another head
    if spec.task.kind in LABELLED_KINDS and (classes := tasks.num_labels(spec.task, spec.cache)) != 2:
        parts["num_labels"] = classes  # only when not 2, so the two-class keys stay as they were
    text = json.dumps(parts, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def model_class(kind: str) -> Any:
    import transformers

    return getattr(transformers, AUTO_CLASSES[kind])


def load_tokenizer(folder: Path, trust_remote_code: bool = False) -> Any:
    """The folder's tokenizer. One saved as a bare ``tokenizers`` object (as a config model's
    word tokenizer is) loads as exactly that: AutoTokenizer would pick the model type's own
    class (Qwen2's rebuilds a BPE from a vocabulary the file lacks, and tokenizes to nothing)."""
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    config = folder / "tokenizer_config.json"
    saved = json.loads(config.read_text()).get("tokenizer_class") if config.is_file() else None
    if saved in BARE_TOKENIZERS and (folder / "tokenizer.json").is_file():
        return PreTrainedTokenizerFast.from_pretrained(str(folder))
    return AutoTokenizer.from_pretrained(str(folder), trust_remote_code=trust_remote_code)


def load_baseline(folder: Path, kind: str, trust_remote_code: bool = False) -> tuple[nn.Module, Any]:
    quiet_libraries()
    model = model_class(kind).from_pretrained(
        str(folder), dtype=torch.float32, trust_remote_code=trust_remote_code, use_safetensors=True
    )
    tokenizer = load_tokenizer(folder, trust_remote_code)
    as_linears(model)  # GPT-2's Conv1D, Falcon's FalconLinear: every method sees one kind of layer
    return model.eval(), tokenizer


def _word_tokenizer(texts: list[str], vocab_size: int, pairs: bool = False, segments: bool = False) -> Any:
    """A whitespace word-level tokenizer over ``texts`` for models built from a config. For
    text pairs it joins the two with ``[SEP]``, and gives segment ids where the model has
    segment embeddings, as BERT's tokenizer does."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    special = ["[PAD]", "[UNK]", "[CLS]"] + (["[SEP]"] if pairs else [])
    tok.train_from_iterator(texts, trainers.WordLevelTrainer(vocab_size=vocab_size, special_tokens=special))
    if pairs:
        tok.post_processor = processors.TemplateProcessing(
            single="$A", pair="$A [SEP] $B:1 [SEP]:1", special_tokens=[("[SEP]", tok.token_to_id("[SEP]"))]
        )
    names = ["input_ids", "token_type_ids", "attention_mask"] if segments else ["input_ids", "attention_mask"]
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="[PAD]",
        unk_token="[UNK]",
        cls_token="[CLS]",
        model_input_names=names,
        **({"sep_token": "[SEP]"} if pairs else {}),
    )


def _from_config(spec: StudySpec) -> tuple[Any, Any]:
    from transformers import AutoConfig

    config = dict(spec.model.config or {})
    model_type = config.pop("model_type")
    if spec.task.kind in LABELLED_KINDS:
        config.setdefault("num_labels", tasks.num_labels(spec.task, spec.cache))
    cfg = AutoConfig.for_model(model_type, **config)
    model = model_class(spec.task.kind).from_config(cfg)
    pairs = False
    if spec.task.kind in LABELLED_KINDS:
        rows = tasks.classification_rows(spec.task, spec.cache)
        texts = [part for t, _ in rows for part in tasks.words_of(t)]
        pairs = spec.task.kind == "classification" and any(isinstance(t, tuple) for t, _ in rows)
    else:
        texts = tasks.lm_text(spec.task, spec.cache).split("\n")
    segments = pairs and getattr(cfg, "type_vocab_size", 0) > 1
    return model, _word_tokenizer(texts, cfg.vocab_size, pairs, segments)


SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def source_gguf(spec: StudySpec) -> Path | None:
    """The GGUF file the baseline was read from (its tokenizer and metadata), if any."""
    if spec.model.source == "builtin:smollm2-135m":
        return assets.smollm2_folder(spec.cache) / SMOLLM2_GGUF
    return None


def model_type(folder: Path) -> str:
    """The ``model_type`` of a baseline folder's config."""
    return str(json.loads((folder / "config.json").read_text()).get("model_type", "unknown"))


def _load_smollm2(cache: Path) -> tuple[Any, Any]:
    if importlib.util.find_spec("gguf") is None:
        raise RuntimeError(
            "SmolLM2 arrives as a GGUF file, which needs the 'gguf' package: "
            "pip install -e '.[lm]' (make setup does this)"
        )
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    folder = assets.smollm2_folder(cache)
    gguf = SMOLLM2_GGUF
    say("dequantizing SmolLM2 from GGUF (about 20 s, once); its weights carry Q4_1 rounding")
    loaded = AutoModelForCausalLM.from_pretrained(str(folder), gguf_file=gguf, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(str(folder), gguf_file=gguf)
    config: Any = loaded.config
    config.quantization_config = None
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = LlamaForCausalLM(config)
    model.load_state_dict(loaded.state_dict())
    model.tie_weights()
    return model, tokenizer


def _load_source(spec: StudySpec) -> tuple[Any, Any]:
    source = spec.model.source
    # Weights the source lacks (a new classifier head, a config's whole model) start from
    # the task's seed, so the same study file gives the same baseline on every machine run.
    torch.manual_seed(spec.task.seed)
    if source == "config":
        return _from_config(spec)
    if source == "builtin:smollm2-135m":
        return _load_smollm2(spec.cache)
    folder = assets.minilm_folder(spec.cache) if source == "builtin:all-minilm-l6-v2" else Path(source)
    kwargs: dict[str, Any] = {"trust_remote_code": spec.model.trust_remote_code, "dtype": torch.float32}
    if not spec.model.allow_pickle:
        kwargs["use_safetensors"] = True  # transformers then refuses pickle weights itself
    if spec.task.kind in LABELLED_KINDS:
        kwargs["num_labels"] = tasks.num_labels(spec.task, spec.cache)
    model = model_class(spec.task.kind).from_pretrained(str(folder), **kwargs)
    tokenizer = load_tokenizer(folder, spec.model.trust_remote_code)
    return model, tokenizer


def _name_classes(model: Any, spec: StudySpec) -> None:
    """The data's class names on the config, so an exported classifier reports them."""
    if spec.task.kind in LABELLED_KINDS and spec.task.data not in tasks.BUILTIN_ROWS:
        names = tasks.labelled(spec.task, spec.cache).names
        model.config.id2label = dict(enumerate(names))
        model.config.label2id = {name: i for i, name in enumerate(names)}


def finetune_classifier(
    model: nn.Module,
    tokenizer: Any,
    rows: tasks.Rows,
    ft: FinetuneSpec,
    max_length: int,
    seed: int,
    kind: str = "classification",
) -> None:
    """Plain AdamW fine-tuning with linear warm-up/decay; shows progress with an ETA."""
    torch.manual_seed(seed)
    rng = random.Random(seed)
    batches = tasks.labelled_batches(tokenizer, rows, max_length, ft.batch_size, kind)
    steps = max(1, math.ceil(len(batches) * ft.epochs))
    opt = torch.optim.AdamW(model.parameters(), lr=ft.learning_rate, weight_decay=0.01)
    warm = max(1, steps // 10)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min((s + 1) / warm, max(0.0, (steps - s) / max(1, steps - warm)))
    )
    model.train()
    start = time.monotonic()
    step = 0
    while step < steps:
        rng.shuffle(batches)
        for batch in batches:
            if step >= steps:
                break
            loss = model(**batch).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            opt.zero_grad()
            step += 1
            if step % 20 == 0 or step == steps:
                eta = fmt_seconds((time.monotonic() - start) / step * (steps - step))
                say(f"fine-tuning step {step}/{steps}, loss {loss.item():.3f}, ETA {eta}")
    model.eval()


def prepare_baseline(spec: StudySpec) -> Path:
    """The cached baseline folder for this study, built the first time."""
    folder = spec.cache / "baselines" / baseline_key(spec)
    if (folder / "slimsearch_baseline.json").is_file():
        return folder
    say(f"preparing the baseline model ({spec.model.source}) into {folder}")
    quiet_libraries()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    model, tokenizer = _load_source(spec)
    _name_classes(model, spec)
    info: dict[str, Any] = {"source": spec.model.source, "format": BASELINE_FORMAT}
    if spec.model.finetune is not None:
        if spec.task.kind not in LABELLED_KINDS:
            raise ValueError("model.finetune is for classification tasks; remove it for causal-lm")
        splits = tasks.classification_splits(spec.task, spec.cache)
        started = time.monotonic()
        finetune_classifier(
            model,
            tokenizer,
            splits.train,
            spec.model.finetune,
            spec.task.max_length,
            spec.task.seed,
            spec.task.kind,
        )
        info["finetune"] = asdict(spec.model.finetune) | {
            "train_rows": len(splits.train),
            "seconds": round(time.monotonic() - started, 1),
        }
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    model.save_pretrained(str(tmp))
    tokenizer.save_pretrained(str(tmp))
    (tmp / "slimsearch_baseline.json").write_text(json.dumps(info, indent=2))
    shutil.rmtree(folder, ignore_errors=True)
    tmp.rename(folder)  # appears whole or not at all
    return folder
