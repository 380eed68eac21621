"""A real two-node Ray cluster for the tests, on loopback addresses other than 127.0.0.1.

Ray 2.60 rewrites a literal ``127.0.0.1`` or ``localhost`` (node IP, ``--address``, ``ray.init``) to the
host's outward address, which tests must never use; other loopback addresses are taken literally. So the
head listens on 127.0.0.2 and the second node on 127.0.0.3 (the embedded endpoint stays on 127.0.0.1).
Each node is its own ``ray start --block`` process in its own session, with every port set explicitly
(two raylets share the host), a short ``--temp-dir`` (socket paths must stay under 108 characters) and one
CPU; ``stop`` ends exactly those processes and what they started, with bounded waits.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HEAD_IP, SECOND_IP = "127.0.0.2", "127.0.0.3"
#: How long a node may take to listen (the head starts GCS, raylet and agents; ~5 s on a busy core).
START_TIMEOUT = 90.0
#: Health checks patient enough for 2 busy cores: Ray marks a node whose raylet misses its checks dead and
#: then ends every driver on it (the pytest worker itself); the defaults (3 s timeouts) are too tight there.
#: A slow raylet has 30 s to answer each check, five in a row; a lost one refuses at once, so it is found
#: dead in about 5 x 2 s (the lost-node test waits for that before Ray moves its actors).
PATIENT = {"RAY_health_check_timeout_ms": "30000", "RAY_health_check_period_ms": "2000",
           "RAY_health_check_failure_threshold": "5", "RAY_gcs_rpc_server_reconnect_timeout_s": "300"}
#: Ports for the worker processes each node may start, drivers included (one each). Generous: a port is
#: free again only once its worker has exited, and with 24 a CI run once found none left for the next
#: driver ("No available ports"), which ends the pytest worker that called ``ray.init``.
WORKER_PORTS = 200
#: Seconds a node gets to stop on SIGTERM before it and its processes are killed.
STOP_GRACE = 5.0


def free_ports(host: str, count: int) -> list[int]:
    """``count`` distinct ports free on ``host`` now (held together while picked, so never the same twice)."""
    sockets = []
    try:
        for _ in range(count):
            sock = socket.socket()
            sock.bind((host, 0))
            sockets.append(sock)
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def _free_range(host: str, size: int) -> int:
    """The first port of ``size`` consecutive ports free on ``host`` (for the workers' port range)."""
    for start in range(21000, 60000, size):
        try:
            with contextlib.ExitStack() as held:
                for port in range(start, start + size):
                    sock = held.enter_context(socket.socket())
                    sock.bind((host, port))
            return start
        except OSError:
            continue
    raise RuntimeError(f"no {size} consecutive free ports on {host}")


def _parents() -> dict[int, int]:
    """pid -> parent pid of every process now (from /proc; processes that end meanwhile are left out)."""
    parents = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                stat = (entry / "stat").read_text()
                parents[int(entry.name)] = int(stat.rpartition(")")[2].split()[1])
    return parents


def descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (Ray's workers and agents start sessions of their own, so a process
    group does not hold them: the parent links do)."""
    children: dict[int, list[int]] = {}
    for child, parent in _parents().items():
        children.setdefault(parent, []).append(child)
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def command_line(pid: int) -> bytes:
    """What ``pid`` calls itself (Ray titles a worker ``ray::MapWorker(...)``); empty when it is gone."""
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


class RayNode:
    """One ``ray start --block`` process (a head, or a node joining ``head``)."""

    def __init__(self, ip: str, workdir: Path, head: str | None = None) -> None:
        self.ip = ip
        self.temp_dir = Path(tempfile.mkdtemp(prefix="ray", dir="/tmp"))  # short: socket paths
        ports = free_ports(ip, 8)
        self.port = ports[0]
        self.address = f"{ip}:{self.port}" if head is None else head
        first_worker = _free_range(ip, WORKER_PORTS)
        command = [str(Path(sys.executable).with_name("ray")), "start", "--block", "--node-ip-address", ip,
                   "--num-cpus", "1", "--object-store-memory", str(80 * 1024 * 1024), "--disable-usage-stats",
                   "--temp-dir", str(self.temp_dir), "--node-manager-port", str(ports[1]),
                   "--object-manager-port", str(ports[2]), "--dashboard-agent-grpc-port", str(ports[3]),
                   "--dashboard-agent-listen-port", str(ports[4]), "--metrics-export-port", str(ports[5]),
                   "--runtime-env-agent-port", str(ports[6]), "--min-worker-port", str(first_worker),
                   "--max-worker-port", str(first_worker + WORKER_PORTS - 1)]
        if head is None:
            command += ["--head", "--port", str(self.port), "--include-dashboard", "false",
                        "--dashboard-port", str(ports[7])]
        else:
            command += ["--address", head]
        self.manager_port = ports[1]
        self._log = open(workdir / f"ray-{ip}.log", "ab")  # noqa: SIM115 - closed in stop(); a replaced node appends
        env = {**os.environ, **PATIENT, "RAY_USAGE_STATS_ENABLED": "0", "PYTHONUNBUFFERED": "1"}
        env.pop("RAY_ADDRESS", None)
        self.process = subprocess.Popen(command, stdout=self._log, stderr=subprocess.STDOUT, env=env)

    def wait_listening(self, port: int) -> None:
        """Until ``port`` on this node accepts a connection (bounded; fails fast if the node exits)."""
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"ray node {self.ip} exited with {self.process.returncode}; see {self._log.name}")
            with contextlib.suppress(OSError), socket.create_connection((self.ip, port), timeout=1):
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"ray node {self.ip} not listening on {port} after {START_TIMEOUT:g}s")
            with contextlib.suppress(subprocess.TimeoutExpired):  # the pause between polls watches the process
                self.process.wait(timeout=0.2)

    def stop(self) -> None:
        """SIGTERM to the ``ray start --block`` process (it stops what it started), then SIGKILL to any of
        its descendants (noted before) still there; bounded waits. After jobs have run, a head often takes
        longer than 20 s to stop on SIGTERM (a bare cluster's stops in ~2 s); it gets ``STOP_GRACE`` and is
        then killed with everything below it, which ends it just the same."""
        below = descendants(self.process.pid)
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=STOP_GRACE)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)
        for pid in below:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
        self._log.close()
        shutil.rmtree(self.temp_dir, ignore_errors=True)

    def lose(self) -> None:
        """A machine lost at once: SIGKILL to the ``ray start --block`` process and to every process below
        it together (noted first: once their parent is gone they are no longer found below it)."""
        below = descendants(self.process.pid)
        for pid in (self.process.pid, *below):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
        self.process.wait(timeout=10)
        self._log.close()
        shutil.rmtree(self.temp_dir, ignore_errors=True)


class RayCluster:
    """A head on 127.0.0.2 and a second node on 127.0.0.3, one CPU each; ``address`` for ``ray.address``."""

    def __init__(self, workdir: Path) -> None:
        self.nodes: list[RayNode] = []
        self._workdir = workdir
        try:
            head = RayNode(HEAD_IP, workdir)
            self.nodes.append(head)
            head.wait_listening(head.port)
            head.wait_listening(head.manager_port)
            self.address = head.address
            second = RayNode(SECOND_IP, workdir, head=self.address)
            self.nodes.append(second)
            second.wait_listening(second.manager_port)
        except BaseException:
            self.stop()
            raise

    def replace_second(self) -> None:
        """A fresh second node in place of one that was lost (the next tests get two nodes again)."""
        lost = self.nodes.pop()
        if lost.process.poll() is None:
            lost.stop()
        second = RayNode(SECOND_IP, self._workdir, head=self.address)
        self.nodes.append(second)
        second.wait_listening(second.manager_port)

    def stop(self) -> None:
        for node in reversed(self.nodes):
            node.stop()
