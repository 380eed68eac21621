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
        # the ramp as the endpoint saw it, and where the window lost stream-time
        ramp = next((line for line in proc.stdout.splitlines() if line.startswith(f"  {client} @64: ramp: ")), "")
        assert "requests 1/512 at +0.00/+" in ramp and "connections 1 at " in ramp, output
        assert "first token out at +" in ramp and "stream-time idle: ramp " in ramp, output
    assert "content verification: passed" in proc.stdout, output


def test_idle_shares_split_the_served_shortfall_into_ramp_turnarounds_and_tail() -> None:
    """Two streams, 1 s answers: the second starts 0.5 s late, waits 0.25 s between its answers, and ends
    alone; the idle stream-time of each phase is exactly what the served rate lost."""
    spec = importlib.util.spec_from_file_location("bench_streams", ROOT / "scripts" / "bench_streams.py")
    module = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    assert module.idle_shares([0, 0, 1, 1], [1, 1, 2, 2], 0, 2, 2) == (0.0, 0.0, 0.0)  # no stream ever idle
    arrived, done = [0.0, 0.5, 1.0, 1.75], [1.0, 1.5, 2.0, 2.75]
    ramp, turnarounds, tail = module.idle_shares(arrived, done, 0.0, 2.75, 2)
    total = 2 * 2.75
    assert (ramp, turnarounds, tail) == (0.5 / total, 0.25 / total, 0.75 / total)
    served_of_ideal = (len(done) / 2.75) / 2  # rows / window, against 2 streams x 1 answer per second
    assert abs((1 - ramp - turnarounds - tail) - served_of_ideal) < 1e-9
