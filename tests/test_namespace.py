"""Our packages import under slimsearch.*, so PyPI's `spaces` / `evaluators` cannot shadow them."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path


def test_top_level_namesakes_do_not_shadow_slimsearch(tmp_path: Path) -> None:
    # Stand-ins for Hugging Face's `spaces` and PyPI's `evaluators`, placed first on the path.
    for name in ("spaces", "evaluators", "search"):
        pkg = tmp_path / name
        pkg.mkdir()
        (pkg / "__init__.py").write_text(f"IMPOSTOR = {name!r}\n")
    code = (
        "import spaces, evaluators, search\n"
        "import slimsearch.spaces as s, slimsearch.evaluators as e, slimsearch.search as q\n"
        "assert spaces.IMPOSTOR == 'spaces' and evaluators.IMPOSTOR == 'evaluators'\n"
        "from slimsearch.spaces import CompressionPlan\n"
        "from slimsearch.evaluators import Accuracy\n"
        "print(s.__file__); print(e.__file__); print(q.__file__)\n"
    )
    env = dict(os.environ, PYTHONPATH=str(tmp_path))
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    repo = Path(__file__).resolve().parent.parent
    files = [Path(line) for line in out.stdout.split()]
    assert files == [
        repo / "spaces/__init__.py",
        repo / "evaluators/__init__.py",
        repo / "search/__init__.py",
    ]
