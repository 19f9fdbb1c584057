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
    assert "4 kept, 0 broken" in r.stdout


def test_a_wrong_arrow_is_caught(tmp_path):
    """The linter sees the real graph: the CLI does import the engine, so forbidding it must fail."""
    cfg = tmp_path / "wrong.toml"
    cfg.write_text('[tool.importlinter]\nroot_package = "moesim"\n\n[[tool.importlinter.contracts]]\n'
                   'name = "cli never imports the engine (false)"\ntype = "forbidden"\n'
                   'source_modules = ["moesim.cli"]\nforbidden_modules = ["moesim.engine"]\n')
    r = _lint(str(cfg))
    assert r.returncode != 0 and "BROKEN" in r.stdout, r.stdout + r.stderr


def test_nothing_inside_imports_the_package_face():
    """`moesim/__init__` is a thin face for users; modules import `moesim.version` etc., never `moesim` itself."""
    grimp = pytest.importorskip("grimp")
    sys.path.insert(0, str(ROOT))
    try:
        graph = grimp.build_graph("moesim", cache_dir=None)
    finally:
        sys.path.remove(str(ROOT))
    assert graph.find_modules_that_directly_import("moesim") == set()
