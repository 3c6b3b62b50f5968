"""Task data: rows or text from the study's source, split with a fixed seed, tokenized."""

from __future__ import annotations

import random
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from slimsearch.search import assets
from slimsearch.search.study_file import StudyError, TaskSpec
from slimsearch.spaces.inputs import IGNORE

# A row's text is one string, or a pair of them (task.text_pair_column); a token task's row
# is its words, labelled with one tag id per word.
Text = str | tuple[str, ...]
Label = int | tuple[int, ...]
Rows = list[tuple[Text, Label]]


@dataclass(frozen=True)
class Splits:
    train: Rows
    test: Rows


BUILTIN_ROWS = {"builtin:movie-reviews": 4000, "builtin:uncertainty": 3000}


def read_text_file(path: Path, where: str = "task.data") -> str:
    """A data file's text; StudyError naming the file and the byte that is not UTF-8."""
    try:
        return path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise StudyError(
            f"{where}: {path} is not UTF-8 text (byte {exc.object[exc.start]:#04x} at offset {exc.start}); "
            "save it as UTF-8 (e.g. `iconv -f latin1 -t utf-8`)"
        ) from None
    except OSError as exc:
        raise StudyError(f"{where}: cannot read {path} ({exc.strerror})") from None


def label_ids(labels: list[Any], names: tuple[str, ...] | None = None) -> dict[Any, int]:
    """Each distinct label to a class id: the declared order when the source names its
    classes, sorted numerically when every label is a whole number (so 0/1 labels keep
    their ids), else as text."""
    if names is not None:
        return {name: i for i, name in enumerate(names)}
    distinct = set(labels)
    if all(isinstance(v, int) and not isinstance(v, bool) for v in distinct):
        return {v: i for i, v in enumerate(sorted(distinct))}
    return {v: i for i, v in enumerate(sorted(distinct, key=str))}


@dataclass(frozen=True)
class Labelled:
    """A classification task's rows with class ids: ``rows`` (from ``task.split``),
    ``test_rows`` (from ``task.test_split``; empty when the test rows are drawn from
    ``rows``) and the class names in id order."""

    rows: Rows
    test_rows: Rows
    names: tuple[str, ...]


def _mapped(
    raw: list[tuple[Text, Any]], test: list[tuple[Text, Any]], where: str, names: tuple[str, ...] | None
) -> Labelled:
    """Rows with their labels as class ids; StudyError when fewer than two classes."""
    if len(raw) < 2:
        raise StudyError(
            f"{where} has {len(raw)} row(s); a classification task needs at least 2 labelled rows"
        )
    ids = label_ids([label for _, label in raw + test], names)
    if len(ids) < 2:
        raise StudyError(f"{where}: every row has the label {next(iter(ids))!r}; give at least two classes")
    for _, label in test:
        if label not in ids:
            raise StudyError(f"{where}: the test split has the label {label!r}, which {names} lacks")
    named = tuple(str(label) for label in sorted(ids, key=ids.__getitem__))
    return Labelled([(t, ids[label]) for t, label in raw], [(t, ids[label]) for t, label in test], named)


def _tagged(
    raw: list[tuple[Any, Any]], test: list[tuple[Any, Any]], where: str, names: tuple[str, ...] | None
) -> Labelled:
    """Token rows ``(words, tags)`` with each tag as a class id; StudyError naming the row
    whose tags do not match its words, or when fewer than two tags occur."""
    for part, rows in (("", raw), ("the test split's ", test)):
        for number, (words, tags) in enumerate(rows):
            if len(words) != len(tags):
                raise StudyError(
                    f"{where}: {part}row {number} has {len(words)} words and {len(tags)} tags; "
                    "give one tag per word"
                )
    if len(raw) < 2:
        raise StudyError(f"{where} has {len(raw)} row(s); a token-classification task needs at least 2")
    ids = label_ids([t for _, tags in raw + test for t in tags], names)
    if len(ids) < 2:
        raise StudyError(f"{where}: every word has the tag {next(iter(ids), None)!r}; give at least two tags")
    for _, tags in test:
        for tag in tags:
            if tag not in ids:
                raise StudyError(f"{where}: the test split has the tag {tag!r}, which {names} lacks")
    named = tuple(str(label) for label in sorted(ids, key=ids.__getitem__))

    def mapped(rows: list[tuple[Any, Any]]) -> Rows:
        return [(tuple(words), tuple(ids[t] for t in tags)) for words, tags in rows]

    return Labelled(mapped(raw), mapped(test), named)


@lru_cache(maxsize=8)
def labelled(task: TaskSpec, cache: Path) -> Labelled:
    """The task's rows with class ids, read once per process (the baseline key, preflight,
    the model's head and every split ask for them)."""
    mapped = _tagged if task.kind == "token-classification" else _mapped
    if task.rows is not None:
        return mapped(list(task.rows), [], "task.rows", None)
    if task.data == "builtin:movie-reviews":
        return Labelled(list(assets.movie_review_rows(cache)), [], ("0", "1"))
    if task.data == "builtin:uncertainty":
        return Labelled(list(assets.uncertainty_rows(cache)), [], ("0", "1"))
    from slimsearch.search import sources

    read = sources.read_rows(task, cache)
    return mapped(read.rows, read.test_rows, f"task.data: {task.data}", read.class_names)


def words_of(text: Text) -> tuple[str, ...]:
    """The strings a row's text holds: one text, a pair, or a token row's words."""
    return text if isinstance(text, tuple) else (text,)


def classification_rows(task: TaskSpec, cache: Path) -> Rows:
    """Every labelled row of the task (test split included)."""
    data = labelled(task, cache)
    return data.rows + data.test_rows


def num_labels(task: TaskSpec, cache: Path) -> int:
    """How many classes the task's data has (the classifier head's width)."""
    if task.data in BUILTIN_ROWS:
        return 2
    return len(labelled(task, cache).names)


def check_sizes(task: TaskSpec, rows: int, test_rows: int | None = None) -> None:
    """StudyError when the sizes ask for more rows than the data has; ``test_rows``: the
    rows of ``task.test_split`` when the test rows come from there."""
    if test_rows is not None:
        for what, size, have, split in (
            ("train_size", task.train_size, rows, task.split or "the source's split"),
            ("test_size", task.test_size, test_rows, task.test_split),
        ):
            if size > have:
                raise StudyError(
                    f"task.{what} = {size}, but {split} of {task.data} has {have} rows; lower it to {have}"
                )
        return
    need = task.train_size + task.test_size
    if need > rows:
        raise StudyError(
            f"task.train_size + task.test_size = {task.train_size} + {task.test_size} = {need}, but "
            f"{task.data} has {rows} rows; lower the sizes so they fit"
        )


def _shuffled(rows: Rows, seed: int) -> Rows:
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    return [rows[i] for i in order]


def classification_splits(task: TaskSpec, cache: Path) -> Splits:
    data = labelled(task, cache)
    if task.test_split is not None:
        check_sizes(task, len(data.rows), len(data.test_rows))
        return Splits(
            train=_shuffled(data.rows, task.seed)[: task.train_size],
            test=_shuffled(data.test_rows, task.seed)[: task.test_size],
        )
    rows = _shuffled(data.rows, task.seed)
    check_sizes(task, len(rows))
    return Splits(train=rows[task.test_size : task.train_size + task.test_size], test=rows[: task.test_size])


def lm_text(task: TaskSpec, cache: Path) -> str:
    if task.text is not None:
        return task.text
    if task.data == "builtin:oanc":
        return assets.oanc_text(cache)
    from slimsearch.search import sources

    return sources.read_text(task, cache)


def _padded(seqs: list[list[int]], idx: list[int], fill: int) -> Tensor:
    """Rows ``idx`` of ``seqs`` as one tensor, each padded with ``fill`` to the longest."""
    out = torch.full((len(idx), max(len(seqs[i]) for i in idx)), fill, dtype=torch.long)
    for row, i in enumerate(idx):
        out[row, : len(seqs[i])] = torch.tensor(seqs[i], dtype=torch.long)
    return out


def _by_length(
    encoded: list[list[int]], tokenizer: Any, batch_size: int, extra: dict[str, tuple[list[list[int]], int]]
) -> list[tuple[list[int], dict[str, Tensor]]]:
    """Batches of the encoded rows sorted by length, padded only to each batch's longest
    (cheaper than padding everything to max_length; results do not depend on the order),
    with ``extra`` per-token keys padded with their own fill; each with its row indices."""
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    mask = [[1] * len(e) for e in encoded]
    out = []
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        batch = {"input_ids": _padded(encoded, idx, pad), "attention_mask": _padded(mask, idx, 0)}
        out.append((idx, batch | {k: _padded(seqs, idx, fill) for k, (seqs, fill) in extra.items()}))
    return out


def classification_batches(
    tokenizer: Any, rows: Rows, max_length: int, batch_size: int
) -> list[dict[str, Tensor]]:
    """A text (or text pair) and its class id per row, batched by length."""
    firsts = [t[0] if isinstance(t, tuple) else t for t, _ in rows]
    seconds = [t[1] for t, _ in rows if isinstance(t, tuple)]
    pairs = seconds if len(seconds) == len(rows) and rows else None
    tokenized = tokenizer(firsts, pairs, truncation=True, max_length=max_length)
    # Segment ids only for pairs: a single text's are all zero, the models' default.
    types = tokenized.get("token_type_ids") if pairs is not None else None
    extra = {"token_type_ids": (types, 0)} if types is not None else {}
    return [
        batch | {"labels": torch.tensor([rows[i][1] for i in idx])}
        for idx, batch in _by_length(tokenized["input_ids"], tokenizer, batch_size, extra)
    ]


def token_batches(tokenizer: Any, rows: Rows, max_length: int, batch_size: int) -> list[dict[str, Tensor]]:
    """Batches of words tokenized as pre-split words: the first sub-token of each word
    carries its tag, later sub-tokens, special tokens and padding ``IGNORE`` (the
    transformers token-classification convention). Sorted by length like classification
    batches; a row cut by ``max_length`` keeps the tags of the words that fit."""
    if not getattr(tokenizer, "is_fast", False):
        raise ValueError(
            f"token classification needs a fast tokenizer (it maps sub-tokens to words), and "
            f"{type(tokenizer).__name__} is not one; save the model with its tokenizer.json"
        )
    words = [list(text) for text, _ in rows]
    tokenized = tokenizer(words, is_split_into_words=True, truncation=True, max_length=max_length)
    labels: list[list[int]] = []
    for i, (_, tags) in enumerate(rows):
        assert isinstance(tags, tuple)
        previous = None
        row = []
        for word in tokenized.word_ids(i):
            row.append(IGNORE if word is None or word == previous else tags[word])
            previous = word
        labels.append(row)
    extra = {"labels": (labels, IGNORE)}
    return [batch for _, batch in _by_length(tokenized["input_ids"], tokenizer, batch_size, extra)]


def labelled_batches(
    tokenizer: Any, rows: Rows, max_length: int, batch_size: int, kind: str
) -> list[dict[str, Tensor]]:
    """Batches of labelled rows for the task's kind."""
    build = token_batches if kind == "token-classification" else classification_batches
    return build(tokenizer, rows, max_length, batch_size)


def eval_chars(block_size: int, n_blocks: int) -> int:
    """Characters at the start of an LM text reserved for evaluation (~8 a token is generous);
    training and calibration text comes only after them."""
    return block_size * n_blocks * 8


def held_out(task: TaskSpec, text: str) -> str:
    """The part of an LM text held apart from the perplexity text."""
    return text[eval_chars(task.block_size, task.eval_blocks) :]


def lm_train_text(task: TaskSpec, cache: Path) -> str:
    """The LM text held apart from the perplexity text."""
    return held_out(task, lm_text(task, cache))


def lm_blocks(
    tokenizer: Any, text: str, block_size: int, n_blocks: int, batch_size: int
) -> list[dict[str, Tensor]]:
    """The first ``n_blocks`` contiguous blocks of ``block_size`` tokens, batched.

    Evaluation takes text from the start; training (if any) must use text after it.
    """
    ids = tokenizer(text[: eval_chars(block_size, n_blocks)])["input_ids"]
    have = len(ids) // block_size
    if have < 1:
        raise StudyError(
            f"task.block_size: the text gives {len(ids)} tokens, fewer than one block of "
            f"{block_size}; lower task.block_size or give more text"
        )
    blocks = torch.tensor(ids[: min(have, n_blocks) * block_size]).view(-1, block_size)
    return [{"input_ids": blocks[i : i + batch_size]} for i in range(0, len(blocks), batch_size)]
