"""The import-linter contracts in pyproject.toml: kept by the package, and broken by a crossing import.

The second test is what makes the first one worth having: a copy of the package with one import that
crosses a layer must fail the same contracts, so a contract that silently matched nothing would show here.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LINT_IMPORTS = Path(sys.executable).with_name("lint-imports")


def lint_imports(project: Path) -> subprocess.CompletedProcess[str]:
    """Run the contracts of ``project/pyproject.toml`` on ``project/pipeline`` (that copy, not the installed one)."""
    env = {**os.environ, "PYTHONPATH": str(project)}
    return subprocess.run([str(LINT_IMPORTS), "--no-cache"], cwd=project, env=env, capture_output=True,
                          text=True, timeout=120, check=False)


def test_the_package_keeps_every_contract() -> None:
    result = lint_imports(ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Contracts: 5 kept, 0 broken." in result.stdout


CROSSINGS = [
    # (module edited, import added, contract reported broken, the chain it reports)
    ("core/sse.py", "import pipeline.edges.ledger", "cli/api above ops above run above edges above core",
     "pipeline.core.sse -> pipeline.edges.ledger"),
    ("edges/manifest.py", "import pipeline.server", "the embedded endpoint is started by cli/api only",
     "pipeline.edges.manifest -> pipeline.server"),
    ("core/tokens.py", "import aiohttp", "core does no I/O (no network, database, file or image libraries)",
     "pipeline.core.tokens -> aiohttp"),
    ("ops/export.py", "import sqlite3", "ledger SQL lives in edges/ledger.py only", "pipeline.ops.export -> sqlite3"),
    ("run/local.py", "import ray", "Ray is imported by its engine only (pipeline/run/rayengine.py)",
     "pipeline.run.local -> ray"),
]


@pytest.mark.parametrize(("module", "line", "contract", "chain"), CROSSINGS, ids=[c[0] for c in CROSSINGS])
def test_a_crossing_import_breaks_its_contract(tmp_path: Path, module: str, line: str, contract: str,
                                               chain: str) -> None:
    shutil.copytree(ROOT / "pipeline", tmp_path / "pipeline", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    edited = tmp_path / "pipeline" / module
    edited.write_text(edited.read_text(encoding="utf-8") + f"\n{line}  # noqa\n", encoding="utf-8")

    result = lint_imports(tmp_path)

    assert result.returncode == 1, result.stdout + result.stderr
    broken = result.stdout.split("Broken contracts", 1)[1]
    assert f"{contract}\n" in broken and chain in broken, result.stdout


def test_no_function_in_the_package_is_over_60_lines(tmp_path: Path) -> None:
    """House rule: short functions. The checker itself must catch a long one, or its silence means nothing."""
    checker = [sys.executable, str(ROOT / "scripts" / "check_function_length.py")]
    kept = subprocess.run([*checker, str(ROOT / "pipeline")], capture_output=True, text=True, timeout=60)
    assert kept.returncode == 0, kept.stdout
    long_one = tmp_path / "long.py"
    long_one.write_text("def long():\n" + "    x = 1\n" * 61)
    caught = subprocess.run([*checker, str(long_one)], capture_output=True, text=True, timeout=60)
    assert caught.returncode == 1 and "long is 62 lines" in caught.stdout
