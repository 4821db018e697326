"""The package as a user gets it: a wheel built with ``python -m build``, installed into a fresh venv.

Nothing of the repository is visible to it (it runs from an empty folder): the recipes, accelerate
configs and bundled data must come from the wheel itself. The fresh venv borrows this environment's
third-party packages through a path entry (so the test needs no network), never its ``nspo_trl``.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest
from testing_utils import RENDEZVOUS_VARIABLES

from nspo_trl.cli.packaged import shipped_accelerate_configs, shipped_recipes

REPO = Path(__file__).resolve().parent.parent


def run(command: list[str], cwd: Path, timeout: int = 600) -> subprocess.CompletedProcess:
    # a user's shell: not this process's venv, nor the rendezvous an earlier in-process test left in os.environ
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", *RENDEZVOUS_VARIABLES)}
    result = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, f"{' '.join(command)} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """``bin/`` of a fresh venv holding the wheel built from a copy of the tracked files."""
    root = tmp_path_factory.mktemp("wheel")
    source = root / "source"
    tracked = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True, check=True).stdout
    for name in filter(None, tracked.decode().split("\0")):
        target = source / name
        target.parent.mkdir(parents=True, exist_ok=True)
        if (REPO / name).is_symlink():
            target.symlink_to(os.readlink(REPO / name))
        elif (REPO / name).is_file():
            shutil.copy2(REPO / name, target)
    run([sys.executable, "-m", "build", "--wheel", "--no-isolation", "--outdir", str(root / "dist")], source)
    (wheel,) = (root / "dist").glob("nspo_trl-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    for name in [*shipped_recipes(), "smoke"]:
        assert f"nspo_trl/recipes/{name}.yaml" in names
    for name in shipped_accelerate_configs():
        assert f"nspo_trl/accelerate_configs/{name}.yaml" in names
    assert "nspo_trl/resources/overrefusal_train_prompts.jsonl" in names
    assert not [n for n in names if n.startswith(("tests/", "benchmarks/", "recipes/"))]

    venv = root / "venv"
    run([sys.executable, "-m", "venv", str(venv)], root)
    run([str(venv / "bin" / "python"), "-m", "pip", "install", "-q", "--no-deps", "--no-index", str(wheel)], root)
    purelib = run([str(venv / "bin" / "python"), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                  root).stdout.strip()  # fmt: skip
    # the third-party packages of this environment (torch, trl, ...), after the venv's own site-packages
    (Path(purelib) / "zz_borrowed_dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    return venv / "bin"


def test_the_installed_package_is_the_wheel(installed, tmp_path):
    where = run([str(installed / "python"), "-c", "import nspo_trl; print(nspo_trl.__file__)"], tmp_path).stdout
    assert where.strip().startswith(str(installed.parent)), where


@pytest.mark.slow
def test_every_shipped_recipe_dry_runs_from_the_wheel(installed, tmp_path):
    for name in shipped_recipes():
        result = run([str(installed / "nspo-trl"), "train", name, "--dry-run"], tmp_path)
        assert "effective batch on 1 process(es)" in result.stdout, (name, result.stdout[-2000:])
    listing = run([str(installed / "nspo-trl"), "recipes"], tmp_path).stdout
    assert all(name in listing for name in shipped_recipes())


def test_the_default_job_runs_from_the_wheel(installed, tmp_path):
    """``nspo-trl train`` with no argument: the smoke recipe, trained, with its summary written."""
    run([str(installed / "nspo-trl"), "train", "--max_steps", "4", "--output_dir", "out"], tmp_path)
    summary = json.loads((tmp_path / "out" / "nspo_summary.json").read_text())
    assert summary["steps"] == 4 and summary["leakage"]["fit"] < 0.05
