"""A task's data source read through `datasets`: files, `save_to_disk` folders, hub names.

Everything a source gives comes out as plain rows ``(text, label)`` (``text`` a pair of
strings when ``task.text_pair_column`` is set), ``(words, tags)`` for token classification,
or, for a causal LM, one text. Column and
label problems are one StudyError line naming the column, what the source has, and the fix.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

from slimsearch.search.study_file import StudyError, TaskSpec
from slimsearch.search.tasks import read_text_file

# File suffix -> the `datasets` builder that reads it.
FILE_FORMATS = {
    ".csv": "csv",
    ".tsv": "csv",
    ".json": "json",
    ".jsonl": "json",
    ".parquet": "parquet",
    ".arrow": "arrow",
    ".txt": "text",
}
HUB = "hub:"
_SPLIT = re.compile(r"^(?P<name>[A-Za-z0-9_.-]+)(\[(?P<start>[^:\]]*):(?P<stop>[^\]]*)\])?$")


def describe_formats() -> str:
    return (
        "a .csv/.tsv/.json/.jsonl/.parquet/.arrow/.txt file, a folder written by "
        "Dataset.save_to_disk, or hub:<name> when the hub is reachable"
    )


def check_split(value: str, where: str) -> None:
    """StudyError unless ``value`` reads as ``name`` or ``name[start:stop]``."""
    match = _SPLIT.match(value)
    bounds = [match.group("start"), match.group("stop")] if match else []
    if not match or not all(_bound_ok(b) for b in bounds if b is not None):
        raise StudyError(
            f"{where}: {value!r} is not a split; write a name such as 'train' or a slice such as "
            "'train[:2000]', 'train[10%:]' or 'validation[100:600]'"
        )


def _bound_ok(text: str) -> bool:
    return text == "" or re.fullmatch(r"-?\d+%?", text.strip()) is not None


def _bound(text: str | None, n: int, default: int) -> int:
    if text is None or text.strip() == "":
        return default
    text = text.strip()
    value = round(n * int(text[:-1]) / 100) if text.endswith("%") else int(text)
    return max(0, min(n, value + n if value < 0 else value))


def _cache_dir(cache: Path) -> str:
    return str(cache / "datasets")


def _load(source: str, cache: Path) -> Any:
    """The whole source as a DatasetDict (or a Dataset for a `save_to_disk` of one split)."""
    import datasets

    datasets.utils.logging.set_verbosity_error()
    datasets.disable_progress_bars()
    try:
        if source.startswith(HUB):
            return datasets.load_dataset(source[len(HUB) :], cache_dir=_cache_dir(cache))
        path = Path(source)
        if path.is_dir():
            if any((path / f).is_file() for f in ("dataset_dict.json", "dataset_info.json", "state.json")):
                return datasets.load_from_disk(str(path))
            return datasets.load_dataset(str(path), cache_dir=_cache_dir(cache))
        builder = FILE_FORMATS.get(path.suffix.lower())
        if builder is None:
            raise StudyError(f"task.data: {source} has an unknown suffix; give {describe_formats()}")
        if builder in ("csv", "json", "text"):
            read_text_file(path)  # a file that is not UTF-8: its byte and offset, not a parser's trace
        kwargs: dict[str, Any] = {"delimiter": "\t"} if path.suffix.lower() == ".tsv" else {}
        return datasets.load_dataset(builder, data_files=str(path), cache_dir=_cache_dir(cache), **kwargs)
    except StudyError:
        raise
    except Exception as exc:  # datasets raises many types; the user needs the one line
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise StudyError(f"task.data: cannot read {source} ({first[:300]})") from None


def _split(whole: Any, spec: str | None, source: str, where: str) -> Any:
    """One split of ``whole``, sliced as ``spec`` says; the only split (or 'train') by default."""
    import datasets

    if isinstance(whole, datasets.Dataset):
        names = ["train"]
        splits = {"train": whole}
    else:
        names = list(whole)
        splits = dict(whole)
    if spec is None:
        if len(names) == 1:
            return splits[names[0]]
        if "train" in names:
            return splits["train"]
        raise StudyError(f"task.split: {source} has splits {names}; name the one to read (task.split)")
    match = _SPLIT.match(spec)
    assert match is not None  # checked when the study was read
    name = match.group("name")
    if name not in splits:
        raise StudyError(f"{where}: {source} has no split {name!r}; it has {names}")
    part = splits[name]
    if match.group(2) is None:
        return part
    n = len(part)
    start, stop = _bound(match.group("start"), n, 0), _bound(match.group("stop"), n, n)
    return part.select(range(start, max(start, stop)))


def _column(part: Any, name: str, where: str, source: str) -> list[Any]:
    if name not in part.column_names:
        raise StudyError(
            f"{where}: {source} has no column {name!r}; its columns are {part.column_names} "
            f"(set {where} to one of them)"
        )
    return list(part[name])


def _labels(part: Any, task: TaskSpec, source: str) -> list[int | str]:
    import datasets

    where = "task.label_column"
    values = _column(part, task.label_column, where, source)
    feature = part.features[task.label_column]
    classes = isinstance(feature, datasets.ClassLabel)
    out: list[int | str] = []
    for number, value in enumerate(values):
        if classes and value is not None and value >= 0:
            value = feature.int2str(int(value))
        if value is None or value == "" or (classes and isinstance(value, int)):
            raise StudyError(f"{where}: row {number} of {source} has no label; fill it in or drop the row")
        if isinstance(value, bool):
            value = int(value)
        if isinstance(value, float):
            if not value.is_integer():
                raise StudyError(
                    f"{where}: {source} column {task.label_column!r} holds {value!r}; slimsearch classifies "
                    "(whole-number or text labels), it does not regress"
                )
            value = int(value)
        out.append(value if isinstance(value, int) else str(value).strip())
    return out


def _texts(part: Any, name: str, where: str, source: str) -> list[str]:
    texts = _column(part, name, where, source)
    for number, value in enumerate(texts):
        if not isinstance(value, str):
            raise StudyError(
                f"{where}: row {number} of {source} holds {type(value).__name__} {value!r}, not text; "
                "point it at a text column"
            )
    return texts


def labelled(part: Any, task: TaskSpec, source: str) -> list[tuple[Any, int | str]]:
    texts: list[Any] = _texts(part, task.text_column, "task.text_column", source)
    if task.text_pair_column is not None:
        pairs = _texts(part, task.text_pair_column, "task.text_pair_column", source)
        texts = list(zip(texts, pairs, strict=True))
    return list(zip(texts, _labels(part, task, source), strict=True))


def _class_feature(feature: Any) -> Any:
    """The ClassLabel a label column declares: itself, or the element of a list of them."""
    import datasets

    inner = getattr(feature, "feature", feature)  # datasets' List / Sequence hold their element
    return inner if isinstance(inner, datasets.ClassLabel) else None


def tagged(part: Any, task: TaskSpec, source: str) -> list[tuple[list[str], list[int | str]]]:
    """Token rows ``(words, tags)``: the text column a list of words, the label column a
    list of tags (ClassLabel ids become their names, so the declared order maps them)."""
    words = _column(part, task.text_column, "task.text_column", source)
    tags = _column(part, task.label_column, "task.label_column", source)
    classes = _class_feature(part.features[task.label_column])
    rows: list[tuple[list[str], list[int | str]]] = []
    for number, (w, t) in enumerate(zip(words, tags, strict=True)):
        if not isinstance(w, list) or not all(isinstance(x, str) for x in w):
            raise StudyError(
                f"task.text_column: row {number} of {source} holds {type(w).__name__} {str(w)[:60]!r}, not a "
                "list of words; token-classification reads pre-split words (e.g. a 'tokens' column)"
            )
        if not isinstance(t, list) or any(x is None or isinstance(x, (bool, float)) for x in t):
            raise StudyError(
                f"task.label_column: row {number} of {source} holds {str(t)[:60]!r}, not a list of tags "
                "(whole numbers or names, one per word)"
            )
        rows.append((w, [classes.int2str(int(x)) if classes is not None else x for x in t]))
    return rows


@dataclass(frozen=True)
class Read:
    """A classification source as read: the rows of ``task.split``, those of
    ``task.test_split`` (empty when it is not set), and the declared class names in id order
    (a ClassLabel column; None when the labels are plain values)."""

    rows: list[tuple[Any, Any]]  # (text, label), or (words, tags) for token classification
    test_rows: list[tuple[Any, Any]]
    class_names: tuple[str, ...] | None


def read_rows(task: TaskSpec, cache: Path) -> Read:
    import datasets

    whole = _load(task.data, cache)
    part = _split(whole, task.split, task.data, "task.split")
    read: Any = tagged if task.kind == "token-classification" else labelled
    rows = read(part, task, task.data)
    feature = part.features.get(task.label_column)
    if task.kind == "token-classification":
        feature = _class_feature(feature)
    names = tuple(feature.names) if isinstance(feature, datasets.ClassLabel) else None
    if task.test_split is None:
        return Read(rows, [], names)
    test = read(_split(whole, task.test_split, task.data, "task.test_split"), task, task.data)
    return Read(rows, test, names)


@lru_cache(maxsize=8)
def read_text(task: TaskSpec, cache: Path) -> str:
    """A causal LM's text: a .txt file as it is, any other source's ``text_column`` rows
    joined by blank lines."""
    path = Path(task.data)
    if path.suffix.lower() == ".txt" and path.is_file():
        return read_text_file(path)
    part = _split(_load(task.data, cache), task.split, task.data, "task.split")
    return "\n\n".join(_texts(part, task.text_column, "task.text_column", task.data))
