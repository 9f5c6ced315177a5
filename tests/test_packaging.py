"""The built package (not the editable checkout) imports, with the kernels under dist_reattn.kernels."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_wheel_installs_kernels_under_a_unique_name(tmp_path):
    target = tmp_path / "site"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "-q",
            "--no-deps",
            "--no-build-isolation",
            "--target",
            str(target),
            str(ROOT),
        ],
        check=True,
        capture_output=True,
        timeout=300,
    )
    assert (target / "dist_reattn" / "kernels" / "score_topk.py").is_file()
    assert (target / "dist_reattn" / "tasks" / "data" / "python_docs_prose.txt").is_file()
    assert not (target / "kernels").exists(), "a top-level 'kernels' would shadow Hugging Face's package"
    probe = (
        "import dist_reattn, dist_reattn.kernels as k, dist_reattn.engine, sys;"
        f"assert dist_reattn.__file__.startswith({str(target)!r}), dist_reattn.__file__;"
        "assert callable(k.score_topk) and 'transformers' not in sys.modules;"
        "print('ok')"
    )
    out = subprocess.run(
        [sys.executable, "-c", probe],
        cwd=tmp_path,
        env={"PYTHONPATH": str(target)},
        capture_output=True,
        text=True,
    )
    assert out.stdout.strip() == "ok", out.stderr
