"""Smoke test of the benchmark harness: ``scripts/bench.py --quick --scenario a`` runs end to end.

It starts the fake endpoint, runs the pipeline's real CLI and the baselines as subprocesses, and checks
every output row's content. Only the shape of the report is asserted here: never a timing.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _table_rows(output: str, title_prefix: str) -> dict[str, str]:
    """The rows (client name -> line) of the table whose title starts with ``title_prefix``."""
    lines = output.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(title_prefix))
    rows = {}
    for line in lines[start + 3:]:  # title, header, rule
        if not line.strip() or line.startswith("  "):
            break
        rows[line.split("|")[0].strip()] = line
    return rows


def test_quick_scenario_a_runs_and_verifies_content(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "bench.py"), "--quick", "--scenario", "a", "--out", str(tmp_path)],
        cwd=ROOT, capture_output=True, text=True, timeout=180,
    )
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output
    rows = _table_rows(proc.stdout, "(a) CPU-bound")
    assert "pipeline" in rows and "naive" in rows, output
    if importlib.util.find_spec("openai") is not None:
        assert "sdk" in rows, output
    else:
        assert "sdk" not in rows and "sdk baseline not run" in proc.stdout, output
    for client, line in rows.items():
        assert line.rstrip().endswith("ok"), f"{client}: {line}"  # the content-verified column
    assert "content verification: passed" in proc.stdout, output


def test_quick_scenario_f_runs_both_clients_and_reports_both_cores(tmp_path: Path) -> None:
    """Scenario (f), more streams (scripts/bench_streams.py), at its --quick size: the pipeline and the naive
    script in one table, each with the endpoint's CPU beside the client's, every row verified."""
    proc = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "bench.py"), "--quick", "--scenario", "f", "--clients",
         "pipeline,naive", "--out", str(tmp_path)],
        cwd=ROOT, capture_output=True, text=True, timeout=180,
    )
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output
    rows = _table_rows(proc.stdout, "(f) more streams")
    assert set(rows) == {"pipeline", "naive"}, output
    for client, line in rows.items():
        cells = [cell.strip() for cell in line.split("|")]
        assert cells[1] == "64" and cells[-1] == "ok", f"{client}: {line}"
        assert cells[9].endswith("%") and cells[10].replace(".", "").isdigit(), f"{client}: {line}"  # endpoint CPU
    assert "content verification: passed" in proc.stdout, output
