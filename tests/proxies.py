"""Test helpers for proxies and TLS: a real forward proxy (proxy.py, in a subprocess) and real certificates.

``ForwardProxy`` runs the ``proxy.py`` package on 127.0.0.1 with the plugins of tests/proxy_plugins.py:
private host names only the proxy resolves, refused or dropped CONNECTs, basic auth (proxy.py's own
``--basic-auth``), TLS between client and proxy, and a log of what went through. ``tls_material`` makes a
private CA with server and client certificates (trustme), and ``tls_endpoint`` serves the embedded
endpoint over https with them, optionally requiring a client certificate (mTLS).

Why a subprocess and not proxy.py in-process: proxy.py forks acceptor processes and installs signal
handlers; a separate process the test starts and stops by pid keeps the test process clean.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

import trustme

from pipeline.server import LocalEndpoint

REPO_ROOT = Path(__file__).resolve().parent.parent
#: The private name the proxy (and the test certificates) know and DNS does not (.test is reserved).
PRIVATE_HOST = "api.via-proxy.test"
SERVER_NAMES = (PRIVATE_HOST, "localhost", "127.0.0.1")
CLIENT_NAME = "client.pipeline.test"
START_TIMEOUT_S = 15.0
STOP_TIMEOUT_S = 5.0


@dataclass(frozen=True)
class ProxyEntry:
    """One request the proxy saw: ``target`` is ``host:port`` for CONNECT, the absolute URL otherwise.

    ``status`` is what the client got: 200 for an established tunnel, the upstream status for a
    forwarded request, 403/407/502 from the proxy itself, None when the connection was closed unanswered.
    Entries are written before the client gets its answer, except a 502 for an upstream that refused or
    could not be reached (not an unknown name): that one is written when the proxy closes the client
    connection, so read it with ``wait_for_requests``.
    """

    method: str
    target: str
    status: int | None


class ForwardProxy:
    """proxy.py as a forward proxy on 127.0.0.1 (free port), started and stopped by pid.

    Use as ``with ForwardProxy(...) as proxy:`` or ``async with`` (which starts it in a thread so the
    test's event loop, and the endpoint on it, keep running).
    """

    def __init__(
        self,
        *,
        basic_auth: str | None = None,
        tls: bool = False,
        host_map: Mapping[str, tuple[str, int]] | None = None,
        refuse_connect_ports: Iterable[int] = (),
        close_connect_ports: Iterable[int] = (),
        workdir: Path | None = None,
        start_timeout: float = START_TIMEOUT_S,
    ) -> None:
        self.basic_auth = basic_auth
        self.tls = tls
        self.host_map = {name.lower(): (str(ip), int(port)) for name, (ip, port) in (host_map or {}).items()}
        self.refuse_connect_ports = sorted(set(refuse_connect_ports))
        self.close_connect_ports = sorted(set(close_connect_ports))
        self.start_timeout = start_timeout
        #: The CA that signed the proxy's certificate (``tls=True``); ``ca.cert_pem.write_to_path(...)``.
        self.ca: trustme.CA | None = trustme.CA() if tls else None
        self._workdir = workdir
        self._tempdir: tempfile.TemporaryDirectory[str] | None = None
        self._process: subprocess.Popen[bytes] | None = None
        self._port: int | None = None

    # --- where it is ------------------------------------------------------------------------------

    @property
    def port(self) -> int:
        if self._port is None:
            raise RuntimeError("ForwardProxy is not started")
        return self._port

    @property
    def pid(self) -> int:
        if self._process is None:
            raise RuntimeError("ForwardProxy is not started")
        return self._process.pid

    @property
    def url(self) -> str:
        """``http://127.0.0.1:PORT`` (``https://`` with ``tls=True``), without credentials."""
        return f"{'https' if self.tls else 'http'}://127.0.0.1:{self.port}"

    def url_with_credentials(self, userinfo: str | None = None) -> str:
        """The URL with ``user:pass@`` (default: the proxy's own ``basic_auth``), as HTTPS_PROXY holds it."""
        userinfo = userinfo if userinfo is not None else self.basic_auth
        if not userinfo:
            return self.url
        return f"{'https' if self.tls else 'http'}://{userinfo}@127.0.0.1:{self.port}"

    def write_ca_pem(self, path: Path) -> Path:
        """Write the CA of the proxy's certificate (``tls=True``) as PEM; returns ``path``."""
        if self.ca is None:
            raise RuntimeError("ForwardProxy(tls=False) has no CA")
        self.ca.cert_pem.write_to_path(str(path))
        return path

    # --- what went through ------------------------------------------------------------------------

    def requests(self) -> list[ProxyEntry]:
        """Every request that reached the proxy, in order (see ProxyEntry)."""
        log = self._folder / "requests.jsonl"
        if not log.exists():
            return []
        lines = log.read_text(encoding="utf-8").splitlines()
        return [ProxyEntry(**json.loads(line)) for line in lines if line.strip()]

    def wait_for_requests(self, count: int, timeout: float = 5.0) -> list[ProxyEntry]:
        """The log once it has at least ``count`` entries (bounded): for entries written at close."""
        deadline = time.monotonic() + timeout
        while len(entries := self.requests()) < count:
            if time.monotonic() > deadline:
                raise AssertionError(f"the proxy logged {len(entries)} requests, not {count}: {entries}")
            time.sleep(0.02)
        return entries

    def log_text(self) -> str:
        """proxy.py's own log (warnings and errors), for failure messages."""
        path = self._folder / "proxy.log"
        return path.read_text(encoding="utf-8", errors="replace") if path.exists() else ""

    # --- start and stop ---------------------------------------------------------------------------

    def start(self) -> ForwardProxy:
        if self._process is not None:
            raise RuntimeError("ForwardProxy is already started")
        if self._workdir is None:
            self._tempdir = tempfile.TemporaryDirectory(prefix="forward-proxy-")
        self._folder.mkdir(parents=True, exist_ok=True)
        port_file = self._folder / "port"
        port_file.unlink(missing_ok=True)
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT),
                                                                         os.environ.get("PYTHONPATH")]))}
        self._process = subprocess.Popen(
            [sys.executable, "-m", "proxy", *self._arguments(port_file)],
            cwd=self._folder, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
            stderr=open(self._folder / "stderr.log", "wb"), start_new_session=True)  # noqa: SIM115
        try:
            self._port = self._wait_until_listening(port_file)
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        """SIGTERM to our pid's process group (it and its acceptor child), bounded wait, then SIGKILL.

        proxy.py runs in its own session, so its group holds exactly the processes it started. Signalling
        the acceptor too makes the stop take milliseconds instead of proxy.py's one-second join.
        """
        process, self._process = self._process, None
        if process is not None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(process.pid, signal.SIGTERM)
            try:
                process.wait(timeout=STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=STOP_TIMEOUT_S)
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(process.pid, signal.SIGKILL)  # proxy.py's forked acceptors, if any outlived it
        if self._tempdir is not None:
            self._tempdir.cleanup()
            self._tempdir = None

    def __enter__(self) -> ForwardProxy:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()

    async def __aenter__(self) -> ForwardProxy:
        import asyncio

        return await asyncio.to_thread(self.start)

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        import asyncio

        await asyncio.to_thread(self.stop)

    # --- internals --------------------------------------------------------------------------------

    @property
    def _folder(self) -> Path:
        if self._workdir is not None:
            return self._workdir
        if self._tempdir is None:
            raise RuntimeError("ForwardProxy is not started")
        return Path(self._tempdir.name)

    def _arguments(self, port_file: Path) -> list[str]:
        """proxy.py's flags: one acceptor in-process-ish, no dashboard/web server/events, quiet log."""
        config = self._folder / "harness.json"
        config.write_text(json.dumps({
            "host_map": self.host_map, "refuse_connect_ports": self.refuse_connect_ports,
            "close_connect_ports": self.close_connect_ports, "log": str(self._folder / "requests.jsonl"),
        }), encoding="utf-8")
        args = ["--hostname", "127.0.0.1", "--port", "0", "--port-file", str(port_file),
                "--num-acceptors", "1", "--num-workers", "1", "--timeout", "30",
                "--log-level", "WARNING", "--log-file", str(self._folder / "proxy.log"),
                "--data-dir", str(self._folder / "data"), "--ca-cert-dir", str(self._folder / "certs"),
                "--cache-dir", str(self._folder / "cache"),
                "--plugins", "tests.proxy_plugins.HarnessPlugin", "--harness-config", str(config)]
        if self.basic_auth:
            args += ["--basic-auth", self.basic_auth, "--auth-plugin", "tests.proxy_plugins.RecordingAuthPlugin"]
        if self.ca is not None:
            leaf = self.ca.issue_cert(*SERVER_NAMES)
            leaf.cert_chain_pems[0].write_to_path(str(self._folder / "proxy-cert.pem"))
            for blob in leaf.cert_chain_pems[1:]:
                blob.write_to_path(str(self._folder / "proxy-cert.pem"), append=True)
            leaf.private_key_pem.write_to_path(str(self._folder / "proxy-key.pem"))
            args += ["--cert-file", str(self._folder / "proxy-cert.pem"),
                     "--key-file", str(self._folder / "proxy-key.pem")]
        return args

    def _wait_until_listening(self, port_file: Path) -> int:
        """Poll (bounded) for the port file proxy.py writes once bound, then for a TCP connect."""
        assert self._process is not None
        deadline = time.monotonic() + self.start_timeout
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                raise RuntimeError(f"proxy.py exited with {self._process.returncode}: {self._stderr()}")
            port = _read_port(port_file)
            if port is not None and _accepts(port, self._probe_context()):
                return port
            time.sleep(0.02)
        raise RuntimeError(f"proxy.py did not listen within {self.start_timeout} s: {self._stderr()}")

    def _probe_context(self) -> ssl.SSLContext | None:
        """A TLS proxy is ready when it completes a handshake (a bare connect would only make it log one)."""
        if self.ca is None:
            return None
        context = ssl.create_default_context()
        self.ca.configure_trust(context)
        return context

    def _stderr(self) -> str:
        path = self._folder / "stderr.log"
        text = path.read_text(errors="replace") if path.exists() else ""
        return (text + self.log_text())[-2000:]


def _read_port(port_file: Path) -> int | None:
    try:
        first = port_file.read_text().split()
    except FileNotFoundError:
        return None
    return int(first[0]) if first else None


def _accepts(port: int, context: ssl.SSLContext | None) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5) as sock:
            if context is not None:
                context.wrap_socket(sock, server_hostname="127.0.0.1").close()
            return True
    except OSError:
        return False


# --- TLS material and the https endpoint -----------------------------------------------------------


@dataclass(frozen=True)
class TlsMaterial:
    """A private CA, a server certificate for SERVER_NAMES and a client certificate, as PEM files."""

    ca: trustme.CA
    ca_pem: Path
    server_cert: Path  # the leaf then its chain
    server_key: Path
    client_cert: Path
    client_key: Path

    def server_context(self, *, require_client_cert: bool = False) -> ssl.SSLContext:
        """For ``LocalEndpoint.start(ssl_context=...)``; mTLS asks for a client cert signed by the CA."""
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(self.server_cert, self.server_key)
        if require_client_cert:
            context.verify_mode = ssl.CERT_REQUIRED
            context.load_verify_locations(cafile=self.ca_pem)
        return context

    def client_context(self, *, with_client_cert: bool = False) -> ssl.SSLContext:
        """Trusts only the private CA; presents the client certificate when asked."""
        context = ssl.create_default_context(cafile=str(self.ca_pem))
        if with_client_cert:
            context.load_cert_chain(self.client_cert, self.client_key)
        return context


def tls_material(folder: Path) -> TlsMaterial:
    """Write ca.pem, server.pem/server.key and client.pem/client.key under ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    ca = trustme.CA()
    paths = {name: folder / name for name in ("ca.pem", "server.pem", "server.key", "client.pem", "client.key")}
    ca.cert_pem.write_to_path(str(paths["ca.pem"]))
    for leaf, cert, key in ((ca.issue_cert(*SERVER_NAMES), "server.pem", "server.key"),
                            (ca.issue_cert(CLIENT_NAME), "client.pem", "client.key")):
        leaf.private_key_pem.write_to_path(str(paths[key]))
        for index, blob in enumerate(leaf.cert_chain_pems):
            blob.write_to_path(str(paths[cert]), append=index > 0)
    return TlsMaterial(ca, paths["ca.pem"], paths["server.pem"], paths["server.key"],
                       paths["client.pem"], paths["client.key"])


@contextlib.asynccontextmanager
async def tls_endpoint(material: TlsMaterial, *, require_client_cert: bool = False,
                       api_key: str | None = None) -> AsyncIterator[LocalEndpoint]:
    """The embedded endpoint on ``https://127.0.0.1:PORT/v1`` with the material's server certificate."""
    endpoint = LocalEndpoint(api_key=api_key)
    await endpoint.start(ssl_context=material.server_context(require_client_cert=require_client_cert))
    try:
        yield endpoint
    finally:
        await endpoint.stop()
