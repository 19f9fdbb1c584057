"""The package's layers (pyproject [tool.importlinter], ARCHITECTURE.md) hold: `lint-imports` passes."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

pytest.importorskip("importlinter")


def _lint(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    exe = shutil.which("lint-imports") or str(Path(sys.executable).with_name("lint-imports"))
    env = {**os.environ, "PYTHONPATH": str(ROOT)}  # check this tree, not whatever moesim is installed
    return subprocess.run([exe, "--no-cache", *args], cwd=cwd, env=env, capture_output=True, text=True, check=False)


def test_import_contracts_hold():
    r = _lint()
    assert r.returncode == 0, r.stdout + r.stderr
    assert "5 kept, 0 broken" in r.stdout


def test_a_wrong_arrow_is_caught(tmp_path):
    """The linter sees the real graph: the CLI does import the engine, so forbidding it must fail."""
    cfg = tmp_path / "wrong.toml"
    cfg.write_text('[tool.importlinter]\nroot_package = "moesim"\n\n[[tool.importlinter.contracts]]\n'
                   'name = "cli never imports the engine (false)"\ntype = "forbidden"\n'
                   'source_modules = ["moesim.cli"]\nforbidden_modules = ["moesim.engine"]\n')
    r = _lint(str(cfg))
    assert r.returncode != 0 and "BROKEN" in r.stdout, r.stdout + r.stderr


def _graph():
    """This tree's import graph (grimp)."""
    grimp = pytest.importorskip("grimp")
    sys.path.insert(0, str(ROOT))
    try:
        return grimp.build_graph("moesim", cache_dir=None)
    finally:
        sys.path.remove(str(ROOT))


def test_nothing_inside_imports_the_package_face():
    """`moesim/__init__` is a thin face for users; modules import `moesim.version` etc., never `moesim` itself."""
    assert _graph().find_modules_that_directly_import("moesim") == set()


def test_config_is_the_bottom_layer():
    """config imports only the descriptions a scenario is made of; it names no registry above it."""
    assert _graph().find_modules_directly_imported_by("moesim.config") <= {
        "moesim.errors", "moesim.models", "moesim.yamlsafe", "moesim.hardware.profile", "moesim.hardware.runtime"}


def test_registry_checks_run_with_config_alone(tmp_path):
    """A fresh interpreter that imports only moesim.config still checks predictor and policy names (config loads
    moesim.config_checks by name): an unknown name is an InputError naming the file and the field."""
    code = (
        "import sys\n"
        "from moesim.config import scenario_from_dict\n"
        "from moesim.errors import InputError\n"
        "base = {'model': 'olmoe-1b-7b', 'hardware': 'rtx4090-pcie4', 'trace': 't.parquet',\n"
        "        'cache': {'gpu': {'capacity_gb': 6}}}\n"
        "bad = ({'predictor': 'crystal_ball'}, {'cache': {'gpu': {'capacity_gb': 6, 'policy': 'random_walk'}}})\n"
        "for edit in bad:\n"
        "    try:\n"
        "        scenario_from_dict({**base, **edit}, file='s.yaml')\n"
        "    except InputError as e:\n"
        "        print(e.file, e.field)\n"
        "print('moesim.predictors' in sys.modules)\n"
    )
    r = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(ROOT)},
                       capture_output=True, text=True, check=False)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split("\n")[:3] == ["s.yaml predictor.name", "s.yaml cache.gpu.policy", "True"], r.stdout
