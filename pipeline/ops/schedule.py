"""Running jobs unattended: a crontab line, a systemd service + timer pair, and a foreground scheduler for
containers that have neither.

Why all three: cron is everywhere; systemd timers catch up on runs missed while the machine was off
(``Persistent=true``) and keep logs and exit statuses; a container (Kubernetes, docker compose) usually has
no init system, so ``pipeline scheduler`` fires the jobs itself. In every case a run is a separate
``python -m pipeline run CONFIG`` process, so the job lock is the one thing that keeps two runs of a job
apart, whichever scheduler started them: a tick that finds the lock held is skipped (exit code 3), not
queued.

Nothing here writes the API key anywhere: the generated commands name the config file, and the config
reads ``${OPENAI_API_KEY}`` from the environment; cron and systemd can load that environment from a file
(``env_file``) that stays private to its owner.

Cron starts a job in $HOME with a bare environment (HOME, LOGNAME, SHELL, PATH=/usr/bin:/bin) and mails or
drops what it cannot run, so ``prepare_schedule`` checks, before anything is printed or installed, what
would otherwise only fail at 2 a.m.: the config loads with nothing but the env file's variables, the env
file is private and in a syntax sh and systemd read alike, the Python imports ``pipeline`` from the
working folder without the shell's PYTHONPATH, and the log folder exists. Each run then ends its log with
one ``exit_line`` (time, run id, exit code), so the log says that the job ran and how it ended.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import shlex
import signal
import stat
import subprocess
import sys
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from croniter import croniter

from pipeline.core.errors import ConfigError, ExitCode, ScheduleError
from pipeline.core.proxy import NO_PROXY_VARIABLES, PROXY_VARIABLES
from pipeline.edges.configfile import load_config
from pipeline.edges.files import atomic_write_text

if TYPE_CHECKING:
    from pipeline.core.config import Config

log = logging.getLogger("pipeline.ops.schedule")


#: Cron's shorthands, spelled out so that they convert exactly (``@weekly`` is Sunday in cron but Monday
#: in systemd's own ``weekly``).
MACROS = {
    "@yearly": "0 0 1 1 *", "@annually": "0 0 1 1 *", "@monthly": "0 0 1 * *", "@weekly": "0 0 * * 0",
    "@daily": "0 0 * * *", "@midnight": "0 0 * * *", "@hourly": "0 * * * *",
}
_MONTHS = {name: i for i, name in enumerate(
    ("jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec"), start=1)}
_DAYS = {name: i for i, name in enumerate(("sun", "mon", "tue", "wed", "thu", "fri", "sat"))}
_SYSTEMD_DAYS = ("Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun")  # systemd's order, Monday first


# --- cron expressions -------------------------------------------------------------------------------


def normalize_cron(cron: str, *, allow_seconds: bool = True) -> str:
    """A validated cron expression with macros spelled out: 5 fields, or 6 where the 6th is seconds (the
    croniter extension; cron itself has no seconds). Raises ScheduleError with the reason."""
    text = " ".join(cron.split())
    if not text:
        raise ScheduleError("cron expression is empty")
    if text.lower() == "@reboot":
        raise ScheduleError("@reboot is not a schedule; use a systemd service or your init system")
    text = MACROS.get(text.lower(), text)
    fields = text.split(" ")
    if len(fields) not in (5, 6) or (len(fields) == 6 and not allow_seconds):
        expected = "5 fields (minute hour day-of-month month day-of-week)" + (
            ", or 6 with seconds last" if allow_seconds else "; crontab has no seconds field")
        raise ScheduleError(f"cron expression {cron!r}: expected {expected}, got {len(fields)}")
    if not croniter.is_valid(text):
        raise ScheduleError(f"cron expression {cron!r} is not valid (minute hour day-of-month month day-of-week)")
    return text


def _values(field: str, low: int, high: int, names: Mapping[str, int], what: str, cron: str) -> list[int]:
    """The values a cron field selects, for the syntax every cron understands: ``*``, numbers, names,
    lists ``a,b``, ranges ``a-b`` and steps ``*/n`` / ``a-b/n`` / ``a/n``."""

    def number(token: str) -> int:
        value = names.get(token.lower()) if not token.isdigit() else int(token)
        if value is None:
            raise ScheduleError(f"cron expression {cron!r}: cannot convert {what} {field!r} to a systemd "
                                "calendar (only *, numbers, names, lists, ranges and steps are supported)")
        return value

    selected: set[int] = set()
    for item in field.split(","):
        base, _, step_text = item.partition("/")
        step = int(step_text) if step_text.isdigit() and int(step_text) > 0 else None
        if step_text and step is None:
            raise ScheduleError(f"cron expression {cron!r}: bad step in {what} {field!r}")
        if base == "*":
            start, end = low, high
        elif "-" in base:
            first, _, last = base.partition("-")
            start, end = number(first), number(last)
        else:
            start = number(base)
            end = high if step else start
        if start > end:  # wrapping ranges (fri-mon) are a croniter extension; spell them as lists instead
            raise ScheduleError(f"cron expression {cron!r}: range {base!r} in {what} runs backwards; "
                                "write it as a list (e.g. 5-6,0-1)")
        selected.update(range(start, end + 1, step or 1))
    if min(selected) < low or max(selected) > high:
        raise ScheduleError(f"cron expression {cron!r}: {what} {field!r} is outside {low}..{high}")
    return sorted(selected)


def _calendar_numbers(values: Sequence[int], low: int, high: int, width: int = 2) -> str:
    """Compact systemd spelling: ``*``, ``start/step`` for a step that runs to the end, else a list with
    runs of three or more as ``a..b``."""
    if list(values) == list(range(low, high + 1)):
        return "*"
    if len(values) >= 2:
        step = values[1] - values[0]
        if step > 1 and list(values) == list(range(values[0], high + 1, step)):
            return f"{values[0]:0{width}d}/{step}"
    parts: list[str] = []
    run: list[int] = []
    for value in [*values, None]:
        if run and (value is None or value != run[-1] + 1):
            parts += [f"{run[0]:0{width}d}..{run[-1]:0{width}d}"] if len(run) >= 3 else \
                     [f"{v:0{width}d}" for v in run]
            run = []
        if value is not None:
            run.append(value)
    return ",".join(parts)


def _calendar_weekdays(cron_days: Sequence[int]) -> str:
    """Cron's day numbers (0 and 7 are Sunday) as systemd's ``Mon..Fri`` / ``Sat,Sun``; '' for every day."""
    days = sorted({(d - 1) % 7 for d in cron_days})  # cron 1 = Monday -> 0, cron 0/7 = Sunday -> 6
    if days == list(range(7)):
        return ""
    parts: list[str] = []
    run: list[int] = []
    for day in [*days, None]:
        if run and (day is None or day != run[-1] + 1):
            parts += [f"{_SYSTEMD_DAYS[run[0]]}..{_SYSTEMD_DAYS[run[-1]]}"] if len(run) >= 3 else \
                     [_SYSTEMD_DAYS[d] for d in run]
            run = []
        if day is not None:
            run.append(day)
    return ",".join(parts)


def cron_to_calendar(cron: str) -> str:
    """A cron expression as a systemd ``OnCalendar=`` value that fires at exactly the same times.

    Supports what every cron supports (``*``, numbers, month and day names, lists, ranges, steps, the
    ``@daily``-style macros, and croniter's optional 6th seconds field). Raises ScheduleError for the rest
    (``L``, ``W``, ``#``, ``?``, ``H``), and when both day-of-month and day-of-week are restricted: cron
    then fires when *either* matches, systemd only when *both* do, so no single OnCalendar is equivalent.
    """
    text = normalize_cron(cron)
    fields = text.split(" ")
    minute, hour, dom, month, dow = fields[:5]
    second = fields[5] if len(fields) == 6 else "0"
    if dom != "*" and dow != "*":
        raise ScheduleError(
            f"cron expression {cron!r} restricts both day-of-month ({dom}) and day-of-week ({dow}); cron fires "
            "when either matches but systemd needs both, so set one of them to '*' (or use two schedules)")
    weekdays = _calendar_weekdays(_values(dow, 0, 7, _DAYS, "day-of-week", cron))
    date = "*-{}-{}".format(_calendar_numbers(_values(month, 1, 12, _MONTHS, "month", cron), 1, 12),
                            _calendar_numbers(_values(dom, 1, 31, {}, "day-of-month", cron), 1, 31))
    clock = ":".join(_calendar_numbers(_values(f, 0, high, {}, what, cron), 0, high) for f, high, what in (
        (hour, 23, "hour"), (minute, 59, "minute"), (second, 59, "second")))
    return f"{weekdays} {date} {clock}".strip()


# --- crontab ----------------------------------------------------------------------------------------


def _no_newlines(**values: object) -> None:
    for name, value in values.items():
        if value is not None and ("\n" in str(value) or "\r" in str(value)):
            raise ScheduleError(f"{name} may not contain a line break: {str(value)!r}")


def job_command(config_path: Path, *, python: str = sys.executable, extra_args: Sequence[str] = ()) -> list[str]:
    """The argv of one unattended run: no progress bar, a closing ``exit_line`` in the log, everything else
    from the config."""
    return [python, "-m", "pipeline", "run", str(config_path), "--no-progress", "--exit-line", *extra_args]


def _absolute_python(python: str) -> str:
    """Cron's PATH is /usr/bin:/bin and systemd wants a path in ExecStart=: the interpreter must be absolute."""
    if not python or not Path(python).is_absolute():
        raise ScheduleError(f"the Python that runs the job must be an absolute path, got {python!r}")
    return python


def crontab_marker(config_path: Path) -> str:
    """The comment line put above a job's crontab line, so that installing again replaces it."""
    return f"# pipeline job: {Path(config_path).absolute()}"


def crontab_line(config_path: Path, cron: str, *, workdir: Path, python: str = sys.executable, log_file: Path,
                 env_file: Path | None = None, extra_args: Sequence[str] = ()) -> str:
    """One crontab line: ``{ cd <workdir> && <python> -m pipeline run <config> ...; } >> <log> 2>&1``.

    Paths are absolute (cron starts in $HOME with a bare PATH), every word is shell-quoted, and ``%`` is
    escaped because cron turns a bare ``%`` into a newline. The whole group goes to the log, so a failing
    ``cd`` or env file is recorded there too, not lost in cron's mail. With ``env_file`` the job first
    sources it (``set -a`` exports what it sets), which is how a key reaches the job without being in the
    crontab. The log's folder must exist (``prepare_schedule`` creates it).
    """
    _no_newlines(config=config_path, workdir=workdir, python=python, log_file=log_file, env_file=env_file)
    schedule = normalize_cron(cron, allow_seconds=False)
    quote = shlex.quote
    steps = [f"cd {quote(str(Path(workdir).absolute()))}"]
    if env_file is not None:
        steps.append(f"set -a && . {quote(str(Path(env_file).absolute()))} && set +a")
    steps.append(" ".join(quote(arg) for arg in job_command(Path(config_path).absolute(),
                                                             python=_absolute_python(python), extra_args=extra_args)))
    command = "{ " + " && ".join(steps) + f"; }} >> {quote(str(Path(log_file).absolute()))} 2>&1"
    return f"{schedule} " + command.replace("%", "\\%")


def merge_crontab(current: str, line: str, marker: str) -> str:
    """``current`` with the job's previous entry (marker + the line after it) replaced by the new one."""
    kept: list[str] = []
    lines = current.splitlines()
    index = 0
    while index < len(lines):
        if lines[index].strip() == marker:
            index += 2  # the marker and the job line it labels
            continue
        kept.append(lines[index])
        index += 1
    while kept and not kept[-1].strip():
        kept.pop()
    return "\n".join([*kept, marker, line]) + "\n"


def install_crontab(line: str, *, marker: str, crontab_cmd: Sequence[str] = ("crontab",)) -> str:
    """Add (or replace) the job in the user's crontab through ``crontab -l`` / ``crontab -``; returns the
    new crontab. ``crontab_cmd`` is the program to use (tests pass a stand-in that records its input)."""
    listed = subprocess.run([*crontab_cmd, "-l"], capture_output=True, text=True, check=False)
    if listed.returncode == 0:
        current = listed.stdout
    elif "no crontab" in (listed.stderr + listed.stdout).lower():
        current = ""
    else:
        raise ScheduleError(f"{' '.join(crontab_cmd)} -l failed ({listed.returncode}): {listed.stderr.strip()}")
    updated = merge_crontab(current, line, marker)
    written = subprocess.run([*crontab_cmd, "-"], input=updated, capture_output=True, text=True, check=False)
    if written.returncode != 0:
        raise ScheduleError(f"{' '.join(crontab_cmd)} - failed ({written.returncode}): {written.stderr.strip()}")
    return updated


# --- systemd ----------------------------------------------------------------------------------------

_UNIT_NAME = re.compile(r"[^A-Za-z0-9:_.\\-]")
_PLAIN_ARG = re.compile(r"[A-Za-z0-9_@%+=:,./-]+")


def unit_name(config_path: Path) -> str:
    """``pipeline-<config stem>``, with characters systemd does not allow in unit names replaced."""
    return "pipeline-" + _UNIT_NAME.sub("-", Path(config_path).stem)


def _specifiers(text: str) -> str:
    """systemd expands ``%x`` specifiers in most settings; a literal ``%`` is ``%%``."""
    return text.replace("%", "%%")


def _exec_arg(arg: str) -> str:
    """One ``ExecStart=`` word: ``%`` and ``$`` escaped (specifiers, variables), quoted when needed."""
    text = _specifiers(arg).replace("$", "$$")
    if _PLAIN_ARG.fullmatch(text):
        return text
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def systemd_units(config_path: Path, cron: str, *, workdir: Path, python: str = sys.executable, log_file: Path,
                  name: str | None = None, env_file: Path | None = None, extra_args: Sequence[str] = (),
                  system: bool = False, stop_timeout: float = 90.0) -> dict[str, str]:
    """``{<name>.service: ..., <name>.timer: ...}`` running the job on the cron schedule.

    The service is ``Type=oneshot`` (one run per activation, so a timer never starts a second one while
    the first is running), appends stdout and stderr to ``log_file``, and gives the run ``stop_timeout``
    seconds after SIGTERM to finish in-flight requests (keep it above ``run.stop_grace``). The timer has
    ``Persistent=true``: a run missed while the machine was off happens at the next boot. ``system=True``
    writes units for the system manager (waits for the network); the default is a user unit.
    """
    _no_newlines(config=config_path, workdir=workdir, python=python, log_file=log_file, env_file=env_file,
                 name=name)
    calendar = cron_to_calendar(cron)
    config = Path(config_path).absolute()
    name = name or unit_name(config)
    if _UNIT_NAME.search(name):
        raise ScheduleError(f"unit name {name!r} may only contain letters, digits and :_.\\-")
    log_path = _specifiers(str(Path(log_file).absolute()))
    exec_start = " ".join(_exec_arg(arg) for arg in job_command(config, python=_absolute_python(python),
                                                                 extra_args=extra_args))
    unit = [f"Description=pipeline job {_specifiers(str(config))}"]
    if system:
        unit += ["Wants=network-online.target", "After=network-online.target"]
    service = ["Type=oneshot", f"WorkingDirectory={_specifiers(str(Path(workdir).absolute()))}",
               f"ExecStart={exec_start}", f"StandardOutput=append:{log_path}",
               f"StandardError=append:{log_path}", f"TimeoutStopSec={stop_timeout:g}"]
    if env_file is not None:
        service.append(f"EnvironmentFile={_specifiers(str(Path(env_file).absolute()))}")
    timer = [f"OnCalendar={calendar}", "Persistent=true", f"Unit={name}.service"]
    cron_text = _specifiers(" ".join(cron.split()))
    return {
        f"{name}.service": _ini([("Unit", unit), ("Service", service)]),
        f"{name}.timer": _ini([("Unit", [f"Description=schedule of {name} (cron: {cron_text})"]),
                               ("Timer", timer), ("Install", ["WantedBy=timers.target"])]),
    }


def _ini(sections: Sequence[tuple[str, Sequence[str]]]) -> str:
    return "\n".join(f"[{title}]\n" + "\n".join(lines) + "\n" for title, lines in sections)


def default_unit_dir() -> Path:
    """Where ``systemctl --user`` looks for units the user wrote."""
    return Path.home() / ".config" / "systemd" / "user"


def install_systemd_units(units: Mapping[str, str], unit_dir: Path | None = None) -> list[Path]:
    """Write the unit files (atomically; an existing pair is replaced); returns their paths."""
    folder = unit_dir if unit_dir is not None else default_unit_dir()
    paths = []
    for filename, text in units.items():
        path = folder / filename
        atomic_write_text(path, text)
        paths.append(path)
    return paths


def systemd_enable_hint(units: Mapping[str, str], *, system: bool = False) -> str:
    """The commands that load and start the timer after ``install_systemd_units`` (printed, not run)."""
    timer = next(name for name in units if name.endswith(".timer"))
    ctl = "systemctl" if system else "systemctl --user"
    hint = f"{ctl} daemon-reload && {ctl} enable --now {timer}"
    if not system:
        hint += "   # and once: loginctl enable-linger $USER (so it runs while you are logged out)"
    return hint


# --- foreground scheduler ---------------------------------------------------------------------------


async def run_job_subprocess(config_path: Path, *, python: str = sys.executable, extra_args: Sequence[str] = (),
                             cwd: Path | None = None, log_file: Path | None = None,
                             term_grace: float = 90.0) -> int:
    """Run ``python -m pipeline run CONFIG --no-progress`` as a child process; returns its exit code
    (negative: killed by that signal).

    A separate process per run keeps a hung or crashing job away from the scheduler's own loop, and
    makes the job lock real: a run that finds the previous one still going exits 3. If this coroutine
    is cancelled (the scheduler is stopping) the child gets SIGTERM, which it handles like Ctrl-C, and
    ``term_grace`` seconds to commit its finished work before it is killed.
    """
    output = open(log_file, "ab") if log_file is not None else None  # noqa: SIM115 - closed below
    try:
        process = await asyncio.create_subprocess_exec(
            *job_command(Path(config_path), python=python, extra_args=extra_args), cwd=cwd,
            stdin=subprocess.DEVNULL, stdout=output, stderr=subprocess.STDOUT if output else None)
        try:
            return await process.wait()
        except asyncio.CancelledError:
            if process.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    process.send_signal(signal.SIGTERM)
                try:
                    await asyncio.wait_for(process.wait(), term_grace)
                except TimeoutError:
                    with contextlib.suppress(ProcessLookupError):
                        process.kill()
                    await process.wait()
            raise
    finally:
        if output is not None:
            output.close()


EventKind = Literal["run", "skip", "error"]


@dataclass(frozen=True, slots=True)
class SchedulerEvent:
    """What happened at one tick of one job: it ran (with its exit code), was skipped, or could not run."""

    config: Path
    scheduled_for: datetime
    kind: EventKind
    exit_code: int | None = None
    reason: str = ""


@dataclass(frozen=True, slots=True)
class ScheduledJob:
    config: Path
    cron: str

    def next_after(self, moment: datetime) -> datetime:
        return croniter(self.cron, moment).get_next(datetime)


def _local_now() -> datetime:
    """Aware local time, with the zone's rules (not a fixed offset), so DST changes move the ticks as cron
    would."""
    from dateutil import tz

    return datetime.now(tz.tzlocal())


JobRunner = Callable[[Path], Awaitable[int]]


class Scheduler:
    """A foreground loop firing each job on its cron expression (5 fields, or 6 with seconds last).

    Each fire awaits ``runner(config_path)`` (by default ``run_job_subprocess``) as its own task, so a long
    run never delays another job's tick. A tick is skipped, and recorded as such, when the job's previous
    run from this scheduler is still going, or when the run exits 3 because another process holds the
    job's lock. Ticks missed while a tick was late are not made up (cron does not either).

    ``clock`` and ``sleep`` are injectable so tests can drive time; ``max_runs`` (runner calls) or the
    ``stop`` event end the loop. After ``max_runs`` the loop waits for the runs it started; on ``stop`` it
    cancels them (the child gets SIGTERM and finishes cleanly, resumable).
    """

    def __init__(self, jobs: Sequence[tuple[Path, str]], *, runner: JobRunner = run_job_subprocess,
                 clock: Callable[[], datetime] = _local_now,
                 sleep: Callable[[float], Awaitable[None]] = asyncio.sleep, max_runs: int | None = None,
                 stop: asyncio.Event | None = None,
                 on_event: Callable[[SchedulerEvent], None] | None = None) -> None:
        if not jobs:
            raise ScheduleError("no jobs to schedule")
        self.jobs = [ScheduledJob(Path(path), normalize_cron(cron)) for path, cron in jobs]
        self.runner = runner
        self.clock = clock
        self.sleep = sleep
        self.max_runs = max_runs
        self.stop = stop if stop is not None else asyncio.Event()
        self.on_event = on_event
        self.events: list[SchedulerEvent] = []
        self.runs_started = 0

    def _record(self, event: SchedulerEvent) -> None:
        self.events.append(event)
        if event.kind == "run":
            level = logging.INFO if event.exit_code == 0 else logging.WARNING
            log.log(level, "%s: run for %s exited %s", event.config, event.scheduled_for.isoformat(),
                    event.exit_code)
        else:
            log.warning("%s: %s for %s: %s", event.config, event.kind, event.scheduled_for.isoformat(),
                        event.reason)
        if self.on_event is not None:
            self.on_event(event)

    async def _fire(self, job: ScheduledJob, due: datetime) -> None:
        try:
            code = await self.runner(job.config)
        except asyncio.CancelledError:
            self._record(SchedulerEvent(job.config, due, "error", None, "cancelled: the scheduler is stopping"))
            raise
        except Exception as exc:  # one job's failure to start must not stop the others
            self._record(SchedulerEvent(job.config, due, "error", None, f"{type(exc).__name__}: {exc}"))
            return
        if code == ExitCode.LOCKED:
            self._record(SchedulerEvent(job.config, due, "skip", code, "another run of the job holds its lock"))
        else:
            self._record(SchedulerEvent(job.config, due, "run", code))

    async def _wait(self, seconds: float) -> bool:
        """Sleep ``seconds`` unless stopped first; True if stopped."""
        sleeper = asyncio.ensure_future(self.sleep(seconds))
        stopper = asyncio.ensure_future(self.stop.wait())
        try:
            await asyncio.wait({sleeper, stopper}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (sleeper, stopper):
                task.cancel()
            await asyncio.gather(sleeper, stopper, return_exceptions=True)
        return self.stop.is_set()

    async def run(self) -> list[SchedulerEvent]:
        """Fire jobs until ``max_runs`` runs have started (then wait for them) or ``stop`` is set (then
        cancel them); returns every event."""
        due = {index: job.next_after(self.clock()) for index, job in enumerate(self.jobs)}
        running: dict[int, asyncio.Task[None]] = {}
        async with asyncio.TaskGroup() as group:
            while not self.stop.is_set() and (self.max_runs is None or self.runs_started < self.max_runs):
                index = min(due, key=lambda i: due[i])
                delay = (due[index] - self.clock()).total_seconds()
                if delay > 0:
                    if await self._wait(delay):
                        break
                    continue
                job, tick = self.jobs[index], due[index]
                due[index] = job.next_after(max(tick, self.clock()))
                previous = running.get(index)
                if previous is not None and not previous.done():
                    self._record(SchedulerEvent(job.config, tick, "skip", None,
                                                "the previous run from this scheduler is still going"))
                    continue
                self.runs_started += 1
                running[index] = group.create_task(self._fire(job, tick))
            if self.stop.is_set():
                for task in running.values():
                    task.cancel()
        return self.events


def scheduler_jobs(specs: Sequence[str], default_cron: str | None = None) -> list[tuple[Path, str]]:
    """Parse ``CONFIG`` / ``CONFIG=CRON`` command-line items (``--cron`` gives the default schedule)."""
    jobs = []
    for spec in specs:
        path, sep, cron = spec.partition("=")
        if not sep:
            if default_cron is None:
                raise ScheduleError(f"{spec}: no schedule; write CONFIG='0 2 * * *' or pass --cron")
            cron = default_cron
        jobs.append((Path(path), normalize_cron(cron)))
    return jobs


def render_schedule(config_path: Path, cron: str, *, workdir: Path, python: str = sys.executable,
                    log_file: Path, name: str | None = None, env_file: Path | None = None,
                    extra_args: Sequence[str] = ()) -> str:
    """What ``pipeline schedule`` prints: the crontab line and the two systemd units, each headed by a
    comment saying where it goes. The crontab part is left out for 6-field (seconds) expressions."""
    units = systemd_units(config_path, cron, workdir=workdir, python=python, log_file=log_file, name=name,
                          env_file=env_file, extra_args=extra_args)
    parts = []
    if len(normalize_cron(cron).split(" ")) == 5:
        line = crontab_line(config_path, cron, workdir=workdir, python=python, log_file=log_file,
                            env_file=env_file, extra_args=extra_args)
        parts.append(f"# crontab (crontab -e):\n{crontab_marker(config_path)}\n{line}\n")
    parts.insert(0, f"# log: {Path(log_file).absolute()} (one line per run: time, run id, exit code)\n")
    for filename, text in units.items():
        parts.append(f"# {default_unit_dir() / filename}\n{text}")
    parts.append(f"# then: {systemd_enable_hint(units)}\n")
    return "\n".join(parts)


def default_log_file(config_path: Path, log_dir: Path | None = None) -> Path:
    """``<config folder>/logs/<config stem>.log`` unless a folder is given: one file per job."""
    config = Path(config_path).absolute()
    return (log_dir if log_dir is not None else config.parent / "logs") / f"{config.stem}.log"


#: A reminder for the printed schedule: cron and systemd do not see the shell's exported keys.
ENVIRONMENT_NOTE = ("# cron and systemd do not see variables exported in your shell: put OPENAI_API_KEY=... "
                    "in a file only you can read (chmod 600) and pass it as the env file")



# --- what a scheduled run finds: checked before anything is printed or installed -----------------------

#: The variables cron gives a job (systemd's are alike); the env file's are added to them, and a scheduled
#: run sees nothing else of the shell that ran ``pipeline schedule``.
BARE_ENV_NAMES = ("HOME", "LOGNAME", "USER", "SHELL", "PATH")
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_ENV_PLAIN = re.compile(r"[A-Za-z0-9_./:@%+,=-]*")
_ENV_QUOTED = re.compile("'[^']*'|\"[^\"$`\\\\]*\"")  # '...', or "..." without $ ` \\


def check_env_file_mode(path: Path) -> None:
    """An env file holds keys: it must be a file that only its owner can read or write (cron sources it,
    so a file others can write is also a way to run their code as you)."""
    try:
        info = path.stat()
    except OSError as exc:
        raise ScheduleError(f"--env-file {path}: {exc.strerror or exc}") from None
    if not stat.S_ISREG(info.st_mode):
        raise ScheduleError(f"--env-file {path}: not a regular file")
    if info.st_mode & 0o077:
        raise ScheduleError(f"--env-file {path}: group or others can read or write it (mode "
                            f"{stat.S_IMODE(info.st_mode):04o}); it holds keys: chmod 600 {shlex.quote(str(path))}")


def _env_value(value: str, where: str) -> str:
    if _ENV_PLAIN.fullmatch(value):
        return value
    if _ENV_QUOTED.fullmatch(value):
        return value[1:-1]
    raise ScheduleError(f"{where}: the value has characters that sh (cron) and systemd read differently; "
                        "put it in single quotes")


def read_env_file(path: Path) -> dict[str, str]:
    """The ``NAME=value`` lines of an env file, in the syntax that cron's ``sh`` (which sources it) and
    systemd's ``EnvironmentFile=`` read the same way: blank lines, ``#`` comments, values plain or in
    quotes without ``$``, backquote or backslash. Anything else is refused by line number (never quoting
    the line: it may hold a key), since the two would hand the job different values."""
    check_env_file_mode(path)
    try:
        text = path.read_bytes().decode("utf-8")  # not read_text: its newline translation would hide CR LF
    except OSError as exc:
        raise ScheduleError(f"--env-file {path}: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise ScheduleError(f"--env-file {path}: not UTF-8 text") from None
    values: dict[str, str] = {}
    for number, raw in enumerate(text.split("\n"), start=1):
        where = f"--env-file {path}, line {number}"
        if raw.endswith("\r"):
            raise ScheduleError(f"{where}: Windows line ending (CR LF); save the file with LF line endings")
        line = raw.strip(" \t")
        if not line or line.startswith("#"):
            continue
        name, sep, value = line.partition("=")
        if sep and name.startswith("export ") and _ENV_NAME.fullmatch(name[7:].strip()):
            raise ScheduleError(f"{where}: write {name[7:].strip()}=... without 'export' "
                                "(systemd's EnvironmentFile= does not accept it)")
        if not sep or not _ENV_NAME.fullmatch(name):
            raise ScheduleError(f"{where}: expected NAME=value")
        values[name] = _env_value(value, f"{where} ({name})")
    return values


def bare_environment(shell_env: Mapping[str, str]) -> dict[str, str]:
    """The few variables cron and systemd give every job, taken from ``shell_env``."""
    return {name: shell_env[name] for name in BARE_ENV_NAMES if name in shell_env}


def check_job_config(config_path: Path, env_file: Path | None, shell_env: Mapping[str, str]) -> Config:
    """The job's config as a scheduled run will load it: with the env file's variables, not the shell's."""
    env = {**bare_environment(shell_env), **(read_env_file(env_file) if env_file is not None else {})}
    where = f"the env file {env_file}" if env_file is not None else "an env file (--env-file FILE, chmod 600)"
    try:
        config = load_config(config_path, env=env)
    except ConfigError as exc:
        if "environment variable" not in str(exc):
            raise
        raise ScheduleError(f"{exc}; a scheduled run does not see this shell's variables: put it in {where}") \
            from None
    check_proxy_variables(config_path, config, env, shell_env, where)
    return config


def check_proxy_variables(config_path: Path, config: Config, env: Mapping[str, str], shell_env: Mapping[str, str],
                          where: str) -> None:
    """A job that reaches its endpoint through this shell's proxy would go direct under cron (and fail, or
    bypass the proxy): refuse to schedule it until the variables are in the env file or the config decides."""
    names = [*dict.fromkeys(n for group in PROXY_VARIABLES.values() for n in group), *NO_PROXY_VARIABLES]
    missing = [name for name in names if shell_env.get(name) and name not in env]
    if not missing:
        return
    in_shell = load_config(config_path, env={**env, **{name: shell_env[name] for name in missing}}).endpoint
    if (in_shell.proxy, in_shell.no_proxy) != (config.endpoint.proxy, config.endpoint.no_proxy):
        raise ScheduleError(f"this shell sets {', '.join(missing)}, which a scheduled run does not see: put "
                            f"{'them' if len(missing) > 1 else 'it'} in {where}, or set endpoint.proxy in the config "
                            "(a URL, or none to go direct)")


def check_python_imports_pipeline(python: str, workdir: Path, env: Mapping[str, str]) -> None:
    """Run ``python -c 'import pipeline'`` as cron would (bare environment, in ``workdir``): a package that
    imports here only thanks to PYTHONPATH or the current folder would fail every night otherwise."""
    try:
        done = subprocess.run([python, "-c", "import pipeline"], cwd=workdir, env=dict(env), capture_output=True,
                              text=True, timeout=120, check=False, stdin=subprocess.DEVNULL)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise ScheduleError(f"cannot run {python} in {workdir}: {exc}") from None
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or [f"exit code {done.returncode}"])[-1]
        raise ScheduleError(f"{python} cannot import pipeline in a scheduled run's bare environment (in "
                            f"{workdir}): {last}; install pipeline into that Python's environment")


def make_log_folder(log_file: Path) -> None:
    """Create the log's folder: cron's ``>>`` and systemd's ``append:`` create the file, not its folder."""
    folder = log_file.parent
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ScheduleError(f"cannot create the log folder {folder}: {exc.strerror or exc}; "
                            "pass --log-file PATH in a folder you can write") from None


def prepare_schedule(config_path: Path, *, workdir: Path, log_file: Path, env_file: Path | None, python: str,
                     shell_env: Mapping[str, str]) -> dict[str, Any]:
    """Check that a scheduled run of the job can start in cron's or systemd's bare environment, and create
    its log folder; returns the absolute ``workdir``, ``python``, ``log_file`` and ``env_file`` to pass to
    ``crontab_line`` / ``systemd_units`` / ``render_schedule``. Raises ScheduleError with what to fix."""
    where: dict[str, Any] = {
        "workdir": Path(workdir).absolute(), "python": _absolute_python(python),
        "log_file": Path(log_file).absolute(), "env_file": Path(env_file).absolute() if env_file else None}
    if not where["workdir"].is_dir():
        raise ScheduleError(f"--workdir {workdir}: not a folder")
    check_job_config(Path(config_path), where["env_file"], shell_env)
    check_python_imports_pipeline(where["python"], where["workdir"], bare_environment(shell_env))
    make_log_folder(where["log_file"])
    return where


def exit_line(config_path: Path, run_id: int | None, exit_code: int, *, when: datetime) -> str:
    """The line a run started with ``--exit-line`` writes last: ``<ISO time> run_id=<id or -> exit=<code>
    config=<path>``, so a schedule's log shows every run, even one that stopped before it had a run id
    (a bad config, a held lock)."""
    return f"{when.isoformat(timespec='seconds')} run_id={run_id or '-'} exit={exit_code} config={config_path}"
