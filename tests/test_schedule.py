"""Scheduling: cron -> systemd calendar conversion (checked for equivalence by brute force), the crontab
line and the systemd units (parsed back, the crontab command run by a real shell), installing them
without touching the real crontab, and the foreground scheduler firing real jobs in subprocesses."""

from __future__ import annotations

import asyncio
import configparser
import json
import os
import re
import shlex
import sqlite3
import stat
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import yaml
from croniter import croniter

from pipeline.core.errors import ScheduleError
from pipeline.edges.configfile import load_config
from pipeline.edges.ledger import JobLock
from pipeline.ops.schedule import (
    Scheduler,
    SchedulerEvent,
    check_job_config,
    cron_to_calendar,
    crontab_line,
    crontab_marker,
    install_crontab,
    install_systemd_units,
    merge_crontab,
    normalize_cron,
    prepare_schedule,
    read_env_file,
    render_schedule,
    run_job_subprocess,
    scheduler_jobs,
    systemd_units,
    unit_name,
)

from .helpers import make_manifest, read_rows

# --- cron -> systemd OnCalendar ---------------------------------------------------------------------

_DAYS = ["Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun"]


def _component(text: str, low: int, high: int) -> set[int]:
    if text == "*":
        return set(range(low, high + 1))
    values: set[int] = set()
    for item in text.split(","):
        if "/" in item:
            start, step = item.split("/")
            values.update(range(int(start), high + 1, int(step)))
        elif ".." in item:
            first, last = item.split("..")
            values.update(range(int(first), int(last) + 1))
        else:
            values.add(int(item))
    return values


def calendar_matcher(spec: str):
    """A small evaluator of the OnCalendar subset the converter emits: ``[weekdays] *-M-D h:m:s``."""
    parts = spec.split(" ")
    weekdays = set(range(7))
    if len(parts) == 3:
        weekdays = set()
        for item in parts.pop(0).split(","):
            first, _, last = item.partition("..")
            weekdays.update(range(_DAYS.index(first), _DAYS.index(last or first) + 1))
    (year, month, day), (hour, minute, second) = parts[0].split("-"), parts[1].split(":")
    assert year == "*"
    months, days = _component(month, 1, 12), _component(day, 1, 31)
    hours, minutes, seconds = _component(hour, 0, 23), _component(minute, 0, 59), _component(second, 0, 59)

    def date_matches(t: datetime) -> bool:
        return t.weekday() in weekdays and t.month in months and t.day in days

    def matches(t: datetime) -> bool:
        return date_matches(t) and t.hour in hours and t.minute in minutes and t.second in seconds

    return matches, date_matches


def cron_fires(expr: str, start: datetime, end: datetime) -> set[datetime]:
    it = croniter(expr, start - timedelta(seconds=1))
    fires = set()
    while (moment := it.get_next(datetime)) < end:
        fires.add(moment)
    return fires


@pytest.mark.parametrize(("cron", "calendar"), [
    ("0 2 * * *", "*-*-* 02:00:00"),
    ("*/15 9-17 * * mon-fri", "Mon..Fri *-*-* 09..17:00/15:00"),
    ("30 4 1,15 * *", "*-*-01,15 04:30:00"),
    ("0 0 * * 0", "Sun *-*-* 00:00:00"),
    ("0 12 * * 6,7", "Sat,Sun *-*-* 12:00:00"),
    ("15 10 * * 5-7", "Fri..Sun *-*-* 10:15:00"),
    ("5 */3 * jan-mar *", "*-01..03-* 00/3:05:00"),
    ("0-30/10 8 * * *", "*-*-* 08:00,10,20,30:00"),
    ("0 0 1 */3 *", "*-01/3-01 00:00:00"),
    ("0 6 */2 * *", "*-*-01/2 06:00:00"),
    ("7 3 * * 1-5", "Mon..Fri *-*-* 03:07:00"),
    ("0 0 * * 1,3,5", "Mon,Wed,Fri *-*-* 00:00:00"),
    ("@weekly", "Sun *-*-* 00:00:00"),
    ("@monthly", "*-*-01 00:00:00"),
    ("@yearly", "*-01-01 00:00:00"),
    ("@hourly", "*-*-* *:00:00"),
])
def test_cron_to_calendar_fires_at_the_same_times(cron, calendar):
    assert cron_to_calendar(cron) == calendar
    matches, date_matches = calendar_matcher(calendar)
    expr = normalize_cron(cron)
    # every minute of 8 days from a Friday: the time-of-day fields and the weekdays
    start = datetime(2027, 1, 1)
    fires = cron_fires(expr, start, start + timedelta(days=8))
    for minute in range(8 * 24 * 60):
        moment = start + timedelta(minutes=minute)
        assert (moment in fires) == matches(moment), moment
    # every day of two years: the date fields
    start, end = datetime(2027, 1, 1), datetime(2029, 1, 1)
    fire_days = {moment.date() for moment in cron_fires(expr, start, end)}
    for offset in range((end - start).days):
        day = start + timedelta(days=offset)
        assert (day.date() in fire_days) == date_matches(day), day


def test_seconds_field_converts_too():
    calendar = cron_to_calendar("* * * * * */2")
    assert calendar == "*-*-* *:*:00/2"
    matches, _ = calendar_matcher(calendar)
    start = datetime(2027, 1, 1, 23, 58)
    fires = cron_fires("* * * * * */2", start, start + timedelta(minutes=4))
    assert all((start + timedelta(seconds=s) in fires) == matches(start + timedelta(seconds=s)) for s in range(240))


@pytest.mark.parametrize(("cron", "message"), [
    ("0 2 1 * mon", "restricts both day-of-month"),
    ("0 0 L * *", "cannot convert day-of-month"),
    ("0 0 * * 5#2", "cannot convert day-of-week"),
    ("0 0 * * fri-mon", "runs backwards"),
    ("@reboot", "not a schedule"),
    ("61 * * * *", "not valid"),
    ("* * *", "expected 5 fields"),
    ("", "empty"),
])
def test_unconvertible_or_invalid_cron_is_a_clear_error(cron, message):
    with pytest.raises(ScheduleError, match=message):
        cron_to_calendar(cron)


# --- crontab ----------------------------------------------------------------------------------------


@pytest.fixture
def paths(tmp_path: Path) -> dict[str, Path]:
    """Awkward but legal paths: spaces, a percent sign (cron's newline), a dollar (systemd's variables)."""
    root = tmp_path / "my jobs 100% $HOME"
    root.mkdir()
    return {"root": root, "config": root / "night's job.yaml", "log": root / "logs" / "night job.log",
            "env": root / "keys.env"}


def split_cron_line(line: str) -> tuple[list[str], str]:
    fields = line.split(" ", 5)
    return fields[:5], fields[5]


def test_crontab_line_parses_back_and_runs_in_a_real_shell(paths, tmp_path):
    fake_python = tmp_path / "fake python"
    record = tmp_path / "record.json"
    fake_python.write_text(f"#!{sys.executable}\nimport json, os, sys\n"
                           f"json.dump({{'argv': sys.argv[1:], 'cwd': os.getcwd(), 'key': os.environ.get('KEY')}}, "
                           f"open({str(record)!r}, 'w'))\nprint('ran')\n")
    fake_python.chmod(fake_python.stat().st_mode | stat.S_IEXEC)
    paths["env"].write_text("KEY=from-env-file\n")
    line = crontab_line(paths["config"], "0 2 * * *", workdir=paths["root"], python=str(fake_python),
                        log_file=paths["log"], env_file=paths["env"])
    assert "\n" not in line and "100%" not in line  # a bare % would end cron's command
    schedule, command = split_cron_line(line)
    assert schedule == ["0", "2", "*", "*", "*"]
    command = command.replace("\\%", "%")  # what cron does before handing the command to sh
    assert shlex.split(command) == [
        "{", "cd", str(paths["root"]), "&&", "set", "-a", "&&", ".", str(paths["env"]), "&&", "set", "+a", "&&",
        str(fake_python), "-m", "pipeline", "run", str(paths["config"]), "--no-progress", "--exit-line;", "}",
        ">>", str(paths["log"]), "2>&1"]
    paths["log"].parent.mkdir()
    subprocess.run(["sh", "-c", command], check=True, env={"PATH": os.defpath})
    ran = json.loads(record.read_text())
    assert ran == {"argv": ["-m", "pipeline", "run", str(paths["config"]), "--no-progress", "--exit-line"],
                   "cwd": str(paths["root"]), "key": "from-env-file"}
    assert paths["log"].read_text() == "ran\n"


def test_crontab_refuses_seconds_and_newlines(paths):
    with pytest.raises(ScheduleError, match="crontab has no seconds field"):
        crontab_line(paths["config"], "* * * * * */2", workdir=paths["root"], log_file=paths["log"])
    with pytest.raises(ScheduleError, match="line break"):
        crontab_line(Path("a\nb.yaml"), "0 2 * * *", workdir=paths["root"], log_file=paths["log"])
    with pytest.raises(ScheduleError, match="absolute path"):  # cron's PATH would not find it
        crontab_line(paths["config"], "0 2 * * *", workdir=paths["root"], python="python3", log_file=paths["log"])


@pytest.fixture
def fake_crontab(tmp_path: Path) -> dict[str, Any]:
    """A stand-in ``crontab`` program: ``-l`` prints the stored table (or 'no crontab'), ``-`` stores stdin
    and records each write."""
    folder = tmp_path / "crontab"
    folder.mkdir()
    script = folder / "crontab.py"
    script.write_text(
        "import pathlib, sys\n"
        "here = pathlib.Path(__file__).parent\n"
        "table, writes = here / 'table.txt', here / 'writes.log'\n"
        "if sys.argv[1:] == ['-l']:\n"
        "    if not table.exists():\n"
        "        sys.stderr.write('no crontab for tester\\n'); sys.exit(1)\n"
        "    sys.stdout.write(table.read_text())\n"
        "elif sys.argv[1:] == ['-']:\n"
        "    data = sys.stdin.read()\n"
        "    table.write_text(data)\n"
        "    with writes.open('a') as log: log.write(data + '\\x00')\n"
        "else:\n"
        "    sys.exit(2)\n")
    return {"cmd": [sys.executable, str(script)], "table": folder / "table.txt", "writes": folder / "writes.log"}


def test_install_crontab_appends_then_replaces(paths, fake_crontab):
    cmd = fake_crontab["cmd"]
    marker = crontab_marker(paths["config"])
    first = crontab_line(paths["config"], "0 2 * * *", workdir=paths["root"], log_file=paths["log"])
    table = install_crontab(first, marker=marker, crontab_cmd=cmd)  # starting from "no crontab"
    assert table == f"{marker}\n{first}\n" and fake_crontab["table"].read_text() == table

    fake_crontab["table"].write_text("MAILTO=ops@example.com\n" + table + "15 * * * * other-job\n")
    second = crontab_line(paths["config"], "30 3 * * *", workdir=paths["root"], log_file=paths["log"])
    table = install_crontab(second, marker=marker, crontab_cmd=cmd)
    assert table.splitlines() == ["MAILTO=ops@example.com", "15 * * * * other-job", marker, second]
    writes = fake_crontab["writes"].read_text().split("\x00")[:-1]
    assert len(writes) == 2 and writes[-1] == table


def test_install_crontab_failure_is_an_error(fake_crontab, tmp_path):
    broken = tmp_path / "broken.py"
    broken.write_text("import sys\nsys.stderr.write('permission denied\\n')\nsys.exit(1)\n")
    with pytest.raises(ScheduleError, match="permission denied"):
        install_crontab("0 2 * * * true", marker="# m", crontab_cmd=[sys.executable, str(broken)])


def test_merge_crontab_keeps_other_entries():
    current = "# pipeline job: /a.yaml\n0 1 * * * old-a\n# pipeline job: /b.yaml\n0 2 * * * b\n\n"
    assert merge_crontab(current, "5 1 * * * new-a", "# pipeline job: /a.yaml") == \
        "# pipeline job: /b.yaml\n0 2 * * * b\n# pipeline job: /a.yaml\n5 1 * * * new-a\n"


# --- systemd ----------------------------------------------------------------------------------------


def read_unit(text: str) -> configparser.ConfigParser:
    parser = configparser.ConfigParser(interpolation=None, strict=True)
    parser.optionxform = str  # type: ignore[assignment,method-assign]  # systemd keys are case-sensitive
    parser.read_string(text)
    return parser


def systemd_unescape(value: str) -> str:
    return value.replace("%%", "%")


def test_systemd_units_parse_back(paths):
    units = systemd_units(paths["config"], "*/15 9-17 * * mon-fri", workdir=paths["root"],
                          python="/opt/venv/bin/python", log_file=paths["log"], env_file=paths["env"])
    name = unit_name(paths["config"])
    assert name == "pipeline-night-s-job" and set(units) == {f"{name}.service", f"{name}.timer"}

    service = read_unit(units[f"{name}.service"])
    assert service.sections() == ["Unit", "Service"]
    body = service["Service"]
    assert body["Type"] == "oneshot"
    assert systemd_unescape(body["WorkingDirectory"]) == str(paths["root"])
    exec_start = shlex.split(systemd_unescape(body["ExecStart"]).replace("$$", "$"))
    assert exec_start == ["/opt/venv/bin/python", "-m", "pipeline", "run", str(paths["config"]), "--no-progress",
                          "--exit-line"]
    assert systemd_unescape(body["StandardOutput"]) == f"append:{paths['log']}"
    assert body["StandardError"] == body["StandardOutput"]
    assert systemd_unescape(body["EnvironmentFile"]) == str(paths["env"])
    assert float(body["TimeoutStopSec"]) > 30  # longer than run.stop_grace's default

    timer = read_unit(units[f"{name}.timer"])
    assert timer.sections() == ["Unit", "Timer", "Install"]
    assert timer["Timer"]["OnCalendar"] == "Mon..Fri *-*-* 09..17:00/15:00"
    assert timer["Timer"]["Persistent"] == "true"
    assert timer["Timer"]["Unit"] == f"{name}.service"
    assert timer["Install"]["WantedBy"] == "timers.target"
    assert "network-online.target" not in units[f"{name}.service"]  # a user unit cannot wait for it

    system = read_unit(systemd_units(paths["config"], "0 2 * * *", workdir=paths["root"], log_file=paths["log"],
                                     name="captions", system=True)["captions.service"])
    assert system["Unit"]["After"] == "network-online.target"


def test_systemd_refuses_what_it_cannot_express(paths):
    with pytest.raises(ScheduleError, match="restricts both"):
        systemd_units(paths["config"], "0 2 1 * 1", workdir=paths["root"], log_file=paths["log"])
    with pytest.raises(ScheduleError, match="unit name"):
        systemd_units(paths["config"], "0 2 * * *", workdir=paths["root"], log_file=paths["log"], name="a b")


def test_install_systemd_units_into_a_folder(paths, tmp_path):
    units = systemd_units(paths["config"], "0 2 * * *", workdir=paths["root"], log_file=paths["log"])
    folder = tmp_path / "units"
    written = install_systemd_units(units, folder)
    assert sorted(p.name for p in folder.iterdir()) == sorted(units)
    assert {p.name: p.read_text() for p in written} == units
    assert install_systemd_units(units, folder) == written  # installing again replaces


def test_render_schedule_shows_both(paths):
    text = render_schedule(paths["config"], "0 2 * * *", workdir=paths["root"], log_file=paths["log"])
    assert crontab_marker(paths["config"]) in text and "OnCalendar=*-*-* 02:00:00" in text
    assert "systemctl --user daemon-reload" in text
    seconds = render_schedule(paths["config"], "* * * * * */5", workdir=paths["root"], log_file=paths["log"])
    assert "crontab" not in seconds and "OnCalendar=*-*-* *:*:00/5" in seconds


def test_scheduler_jobs_from_the_command_line():
    assert scheduler_jobs(["a.yaml=0 2 * * *", "b.yaml"], default_cron="@hourly") == \
        [(Path("a.yaml"), "0 2 * * *"), (Path("b.yaml"), "0 * * * *")]
    with pytest.raises(ScheduleError, match="no schedule"):
        scheduler_jobs(["b.yaml"])


# --- the scheduler, with a driven clock -------------------------------------------------------------


class DrivenTime:
    """A clock that moves only when the scheduler sleeps: ticks are exact and the test takes no time."""

    def __init__(self, start: datetime) -> None:
        self.now = start

    def clock(self) -> datetime:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.now += timedelta(seconds=seconds)
        await asyncio.sleep(0)


async def test_scheduler_fires_on_time_and_records_lock_skips():
    time = DrivenTime(datetime(2027, 1, 1, 0, 0, 30, tzinfo=UTC))
    calls: list[tuple[str, datetime]] = []

    async def runner(config: Path) -> int:
        calls.append((config.name, time.now))
        return 3 if config.name == "b.yaml" else 0  # b's lock is always held elsewhere

    scheduler = Scheduler([(Path("a.yaml"), "*/5 * * * *"), (Path("b.yaml"), "*/10 * * * *")], runner=runner,
                          clock=time.clock, sleep=time.sleep, max_runs=5)
    events = await scheduler.run()
    at = lambda minute: datetime(2027, 1, 1, 0, minute, tzinfo=UTC)  # noqa: E731
    assert calls == [("a.yaml", at(5)), ("a.yaml", at(10)), ("b.yaml", at(10)), ("a.yaml", at(15)),
                     ("a.yaml", at(20))]
    assert [(e.config.name, e.scheduled_for, e.kind, e.exit_code) for e in events] == [
        ("a.yaml", at(5), "run", 0), ("a.yaml", at(10), "run", 0), ("b.yaml", at(10), "skip", 3),
        ("a.yaml", at(15), "run", 0), ("a.yaml", at(20), "run", 0)]
    assert "lock" in events[2].reason


async def test_scheduler_skips_ticks_while_its_previous_run_is_going():
    time = DrivenTime(datetime(2027, 1, 1, tzinfo=UTC))
    release = asyncio.Event()
    seen: list[SchedulerEvent] = []

    def on_event(event: SchedulerEvent) -> None:
        seen.append(event)
        if sum(e.kind == "skip" for e in seen) == 2:
            release.set()  # the long first run ends after two skipped ticks

    async def runner(config: Path) -> int:
        await release.wait()
        return 0

    scheduler = Scheduler([(Path("slow.yaml"), "* * * * *")], runner=runner, clock=time.clock, sleep=time.sleep,
                          max_runs=2, on_event=on_event)
    events = await scheduler.run()
    assert [(e.kind, e.scheduled_for.minute) for e in events] == [("skip", 2), ("skip", 3), ("run", 1), ("run", 4)]
    assert "still going" in events[0].reason and events is scheduler.events and seen == events


async def test_scheduler_keeps_going_when_a_runner_raises():
    time = DrivenTime(datetime(2027, 1, 1, tzinfo=UTC))
    outcomes = iter([OSError("cannot fork"), 0])

    async def runner(config: Path) -> int:
        outcome = next(outcomes)
        if isinstance(outcome, Exception):
            raise outcome
        return outcome

    events = await Scheduler([(Path("a.yaml"), "0 * * * *")], runner=runner, clock=time.clock, sleep=time.sleep,
                             max_runs=2).run()
    assert [(e.kind, e.reason) for e in events] == [("error", "OSError: cannot fork"), ("run", "")]


async def test_scheduler_stop_event_ends_the_wait():
    time = DrivenTime(datetime(2027, 1, 1, tzinfo=UTC))
    stop = asyncio.Event()

    async def sleep(seconds: float) -> None:
        stop.set()  # stopped while waiting for a tick that is a day away
        await asyncio.Event().wait()

    async def runner(config: Path) -> int:
        raise AssertionError("nothing may run")

    scheduler = Scheduler([(Path("a.yaml"), "@daily")], runner=runner, clock=time.clock, sleep=sleep, stop=stop)
    assert await scheduler.run() == []


# --- the scheduler, for real: subprocess runs of a job on the local endpoint -------------------------


def write_job(folder: Path, rows: int = 3, **sections: dict[str, Any]) -> Path:
    manifest = make_manifest(folder / "images", rows)
    document: dict[str, Any] = {
        "endpoint": {"base_url": "local"},
        "request": {"model": "test-model", "prompt": "Describe {id}."},
        "input": {"manifest": str(manifest)},
        "run": {"concurrency": 2},
        "output": {"path": str(folder / "out" / "captions.parquet")},
    }
    for name, values in sections.items():
        document[name] = {**document.get(name, {}), **values}
    config = folder / "job.yaml"
    config.write_text(yaml.safe_dump(document))
    return config


def ledger_runs(config_path: Path, env: dict[str, str] | None = None) -> list[tuple[str, dict[str, Any]]]:
    ledger = load_config(config_path, env=env).ledger_path
    if not ledger.exists():
        return []
    with sqlite3.connect(ledger) as db:
        try:
            runs = db.execute("SELECT status, summary FROM runs ORDER BY run_id").fetchall()
        except sqlite3.OperationalError:  # the child has created the file but not its tables yet
            return []
    return [(status, json.loads(summary) if summary else {}) for status, summary in runs]


async def test_scheduler_runs_a_real_job_on_a_seconds_schedule(tmp_path):
    config = write_job(tmp_path)
    scheduler = Scheduler([(config, "* * * * * */2")], max_runs=2)
    async with asyncio.timeout(120):  # a safety net for a hang, not a timing assertion
        events = await scheduler.run()
    runs = [e for e in events if e.kind == "run"]
    assert [e.exit_code for e in runs] == [0, 0]
    assert all(e.scheduled_for.second % 2 == 0 and e.scheduled_for.microsecond == 0 for e in events)
    assert runs[0].scheduled_for < runs[1].scheduled_for
    assert all(e.kind == "skip" and "still going" in e.reason for e in events if e.kind != "run")

    history = ledger_runs(config)
    assert [status for status, _ in history] == ["finished", "finished"]
    assert history[0][1]["rows_new"] == 3 and history[0][1]["rows_ok"] == 3
    assert history[1][1]["rows_skipped"] == 3 and history[1][1]["attempts"] == 0
    rows = read_rows(tmp_path / "out" / "captions.parquet")
    assert [(r["id"], r["status"]) for r in rows] == [("row-0", "ok"), ("row-1", "ok"), ("row-2", "ok")]


async def test_scheduler_skips_a_tick_while_another_process_holds_the_lock(tmp_path):
    config = write_job(tmp_path)
    ledger = load_config(config).ledger_path
    with JobLock(ledger.with_name(ledger.name + ".lock")):
        scheduler = Scheduler([(config, "* * * * * *")], max_runs=1)
        async with asyncio.timeout(120):
            events = await scheduler.run()
    assert [(e.kind, e.exit_code) for e in events] == [("skip", 3)]
    assert "holds its lock" in events[0].reason
    assert ledger_runs(config) == [] and not (tmp_path / "out" / "captions.parquet").exists()


async def test_stopping_the_scheduler_stops_the_running_job_cleanly(tmp_path):
    # slow answers (0.2 s per streamed chunk) and no grace: the run is still going when the stop comes
    config = write_job(tmp_path, rows=4, endpoint={"base_url": "local", "local": {"chunk_delay": 0.2}},
                       run={"concurrency": 1, "stop_grace": 0})
    stop = asyncio.Event()
    scheduler = Scheduler([(config, "* * * * * *")], stop=stop)
    task = asyncio.create_task(scheduler.run())
    async with asyncio.timeout(120):
        while not any(status == "running" for status, _ in ledger_runs(config)):  # the child is at work
            assert not task.done()
            await asyncio.sleep(0.05)
        stop.set()
        events = await task
    assert [e.kind for e in events if e.kind != "skip"] == ["error"]
    assert "stopping" in events[-1].reason
    [(status, summary)] = ledger_runs(config)
    assert status == "interrupted" and summary["stop_reason"] == "signal"  # SIGTERM, handled like Ctrl-C


async def test_run_job_subprocess_reports_a_bad_config(tmp_path):
    config = tmp_path / "broken.yaml"
    config.write_text("request: {model: m}\n")
    log_file = tmp_path / "run.log"
    assert await run_job_subprocess(config, log_file=log_file) == 2
    assert "error:" in log_file.read_text()


# --- scheduled the way cron and systemd run it: a bare environment, only the env file -------------------

KEY_NAME = "PIPELINE_SCHEDULE_TEST_KEY"
KEY_VALUE = "sk-sched-test-1234567890abcdef"
EXIT_LINE = r"^(\S+) run_id=(\S+) exit=(\d+) config=(.*)$"


def pipeline_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    """``python -m pipeline ...`` from a shell that does not have the test key (as a user's would not)."""
    env = {name: value for name, value in os.environ.items() if name != KEY_NAME}
    return subprocess.run([sys.executable, "-m", "pipeline", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=120, check=False)


@pytest.fixture
def keyed_job(paths) -> dict[str, Path]:
    """A job whose key comes from ``${KEY}`` and a private env file that sets it, under awkward paths."""
    config = write_job(paths["root"], endpoint={"base_url": "local", "api_key": "${" + KEY_NAME + "}"})
    paths["env"].write_text(f"# the job's keys\n{KEY_NAME}={KEY_VALUE}\n")
    paths["env"].chmod(0o600)
    work = paths["root"] / "work dir"
    work.mkdir()
    return {**paths, "config": config, "work": work, "log": config.parent / "logs" / "job.log"}


def exit_lines(text: str) -> list[tuple[datetime, str, int, str]]:
    """The ``--exit-line`` lines in a log: (time, run id, exit code, config)."""
    found = [re.match(EXIT_LINE, line) for line in text.splitlines()]
    return [(datetime.fromisoformat(m[1]), m[2], int(m[3]), m[4]) for m in found if m]


def assert_ran_and_logged(job: dict[str, Path], runs: int) -> None:
    lines = exit_lines(job["log"].read_text())
    assert [(run_id, code, config) for _, run_id, code, config in lines] == \
        [(str(n), 0, str(job["config"])) for n in range(1, runs + 1)]
    assert all(when.tzinfo is not None for when, *_ in lines)
    assert [status for status, _ in ledger_runs(job["config"], {KEY_NAME: KEY_VALUE})] == ["finished"] * runs
    assert [r["status"] for r in read_rows(job["root"] / "out" / "captions.parquet")] == ["ok"] * 3
    assert KEY_VALUE not in job["log"].read_text()


def test_printed_crontab_line_runs_under_env_i(keyed_job):
    assert not keyed_job["log"].parent.exists()
    printed = pipeline_cli("schedule", str(keyed_job["config"]), "--cron", "0 2 * * *", "--env-file",
                           str(keyed_job["env"]), "--workdir", str(keyed_job["work"]), cwd=keyed_job["root"])
    assert printed.returncode == 0, printed.stderr  # the key is in the env file, not in this shell
    assert keyed_job["log"].parent.is_dir()  # cron's >> creates the file, not its folder
    lines = printed.stdout.splitlines()
    line = lines[lines.index(crontab_marker(keyed_job["config"])) + 1]
    schedule, command = split_cron_line(line)
    assert schedule == ["0", "2", "*", "*", "*"] and KEY_VALUE not in printed.stdout
    command = command.replace("\\%", "%")  # what cron does before handing the command to /bin/sh
    for _ in range(2):
        done = subprocess.run(["env", "-i", "/bin/sh", "-c", command], capture_output=True, text=True,
                              timeout=120, check=False, cwd="/")
        assert done.returncode == 0 and done.stdout == done.stderr == ""  # everything went to the log
    assert_ran_and_logged(keyed_job, runs=2)


def systemd_exec_argv(value: str) -> list[str]:
    return [word.replace("%%", "%").replace("$$", "$") for word in shlex.split(value)]


def test_systemd_exec_start_runs_in_a_bare_environment(keyed_job, tmp_path):
    units = tmp_path / "units"
    installed = pipeline_cli("schedule", str(keyed_job["config"]), "--cron", "*/5 * * * *", "--install", "systemd",
                             "--unit-dir", str(units), "--env-file", str(keyed_job["env"]), "--workdir",
                             str(keyed_job["work"]), cwd=keyed_job["root"])
    assert installed.returncode == 0, installed.stderr
    [service] = units.glob("*.service")
    body = read_unit(service.read_text())["Service"]
    argv = systemd_exec_argv(body["ExecStart"])
    assert Path(argv[0]).is_absolute() and Path(argv[4]).is_absolute()
    workdir = Path(systemd_unescape(body["WorkingDirectory"]))
    log = Path(systemd_unescape(body["StandardOutput"]).removeprefix("append:"))
    assert workdir == keyed_job["work"] and log == keyed_job["log"] and log.parent.is_dir()
    env = read_env_file(Path(systemd_unescape(body["EnvironmentFile"])))  # what systemd hands the job
    with log.open("ab") as output:
        done = subprocess.run(argv, cwd=workdir, env=env, stdin=subprocess.DEVNULL, stdout=output,
                              stderr=subprocess.STDOUT, timeout=120, check=False)
    assert done.returncode == 0, log.read_text()
    assert_ran_and_logged(keyed_job, runs=1)


def test_env_file_open_to_others_is_refused(keyed_job, tmp_path):
    keyed_job["env"].chmod(0o644)
    refused = pipeline_cli("schedule", str(keyed_job["config"]), "--cron", "0 2 * * *", "--env-file",
                           str(keyed_job["env"]), "--install", "systemd", "--unit-dir", str(tmp_path / "units"),
                           cwd=keyed_job["root"])
    assert refused.returncode == 2 and refused.stdout == ""
    assert "chmod 600" in refused.stderr and str(keyed_job["env"]) in refused.stderr
    assert not (tmp_path / "units").exists()


def test_a_variable_only_the_shell_has_is_refused(keyed_job, monkeypatch):
    monkeypatch.setenv(KEY_NAME, KEY_VALUE)  # set here, but cron would not see it: no --env-file
    refused = subprocess.run([sys.executable, "-m", "pipeline", "schedule", str(keyed_job["config"]), "--cron",
                              "0 2 * * *"], capture_output=True, text=True, timeout=120, check=False)
    assert refused.returncode == 2 and KEY_NAME in refused.stderr and "--env-file" in refused.stderr
    assert "does not see this shell's variables" in refused.stderr and KEY_VALUE not in refused.stderr


@pytest.mark.parametrize(("text", "message"), [
    (f"export {KEY_NAME}={KEY_VALUE}\n", "line 1: write .* without 'export'"),
    (f"# keys\n\n{KEY_VALUE}\n", "line 3: expected NAME=value"),
    (f"{KEY_NAME}={KEY_VALUE}$x\n", rf"line 1 \({KEY_NAME}\): .*single quotes"),
    (f'{KEY_NAME}="{KEY_VALUE}`x`"\n', "read differently"),
    (f"A=1\r\n{KEY_NAME}={KEY_VALUE}\r\n", "line 1: Windows line ending"),
])
def test_env_file_syntax_errors_name_the_line_not_the_value(tmp_path, text, message):
    env = tmp_path / "job.env"
    env.write_text(text, newline="")
    env.chmod(0o600)
    with pytest.raises(ScheduleError, match=message) as error:
        read_env_file(env)
    assert KEY_VALUE not in str(error.value)


def test_env_file_values_read_as_sh_and_systemd_read_them(tmp_path):
    env = tmp_path / "job.env"
    env.write_text(f"# comment\n  {KEY_NAME}={KEY_VALUE}\nURL='https://h.example/x?a=1&b=$2'\nQ=\"a b\"\nE=\n")
    env.chmod(0o600)
    values = read_env_file(env)
    assert values == {KEY_NAME: KEY_VALUE, "URL": "https://h.example/x?a=1&b=$2", "Q": "a b", "E": ""}
    source = f"set -a && . {shlex.quote(str(env))} && set +a && env"
    shell = "\n" + subprocess.run(["env", "-i", "/bin/sh", "-c", source], capture_output=True, text=True,
                                   timeout=60, check=True).stdout
    assert {name: shell.split(f"\n{name}=")[1].split("\n")[0] for name in values} == values  # as cron sees them


def test_a_python_that_cannot_import_pipeline_bare_is_refused(keyed_job, tmp_path):
    no_pipeline = tmp_path / "python-without-pipeline"
    no_pipeline.write_text("#!/bin/sh\necho \"ModuleNotFoundError: No module named 'pipeline'\" >&2\nexit 1\n")
    no_pipeline.chmod(0o755)
    with pytest.raises(ScheduleError, match="cannot import pipeline in a scheduled run's bare environment"):
        prepare_schedule(keyed_job["config"], workdir=keyed_job["work"], log_file=keyed_job["log"],
                         env_file=keyed_job["env"], python=str(no_pipeline), shell_env={})
    blocked = tmp_path / "a file"
    blocked.write_text("")
    with pytest.raises(ScheduleError, match="cannot create the log folder"):
        prepare_schedule(keyed_job["config"], workdir=keyed_job["work"], log_file=blocked / "logs" / "job.log",
                         env_file=keyed_job["env"], python=sys.executable, shell_env={})


def test_a_proxy_only_the_shell_has_is_refused(tmp_path):
    """Under cron the job would go direct: refused until the env file has the variable or the config decides."""
    shell = {"HOME": str(tmp_path), "PATH": "/usr/bin:/bin", "HTTPS_PROXY": "http://alice:pw-1234@gw.corp:3128"}
    config = write_job(tmp_path / "job", endpoint={"base_url": "https://api.example.com/v1"})
    with pytest.raises(ScheduleError, match="this shell sets HTTPS_PROXY, which a scheduled run does not see") as error:
        check_job_config(config, None, shell)
    assert "--env-file" in str(error.value) and "endpoint.proxy" in str(error.value)
    assert "pw-1234" not in str(error.value)
    env_file = tmp_path / "job.env"
    env_file.write_text(f"HTTPS_PROXY={shell['HTTPS_PROXY']}\n")
    env_file.chmod(0o600)
    scheduled = check_job_config(config, env_file, shell)  # the env file carries it: accepted
    assert str(scheduled.endpoint.proxy_for("https://api.example.com/v1")) == "http://gw.corp:3128"
    decided = write_job(tmp_path / "direct", endpoint={"base_url": "https://api.example.com/v1", "proxy": "none"})
    assert check_job_config(decided, None, shell).endpoint.proxy_for("https://api.example.com/v1") is None


def test_exit_line_is_written_when_the_run_cannot_start(tmp_path):
    config = write_job(tmp_path)
    ledger = load_config(config).ledger_path
    with JobLock(ledger.with_name(ledger.name + ".lock")):
        locked = subprocess.run([sys.executable, "-m", "pipeline", "run", str(config), "--no-progress",
                                 "--exit-line"], capture_output=True, text=True, timeout=120, check=False)
    assert locked.returncode == 3
    [(_, run_id, code, path)] = exit_lines(locked.stderr)
    assert (run_id, code, path) == ("-", 3, str(config)) and "in progress" in locked.stderr
