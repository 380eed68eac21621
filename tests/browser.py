"""A real headless Chromium driven through its DevTools protocol (a websocket, with aiohttp), for the
gallery's browser test.

Debian's ``chromium`` package, installed by ``scripts/install_browser.sh`` (the README's test command and
``.ci/run`` run it); a missing browser FAILS the test with what to run (no test may skip). The browser is started as a subprocess of its own, found by the "DevTools listening on"
line it prints, and stopped by its pid; every wait is bounded.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import shutil
import signal
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest

#: Seconds any one step may take (start, a command, a page load); a stuck browser fails, never hangs.
STEP_TIMEOUT = 30.0

#: The flags Debian's Chromium needs here: as root (no sandbox), no GPU, and nothing that calls home.
CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-quic",
                  "--disable-default-apps", "--remote-debugging-port=0")


def chromium_binary() -> str:
    """The browser, or a test failure that says how to install it."""
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found is None:
        pytest.fail("chromium is not installed: the browser tests need Debian's chromium package; run the "
                    "first step of the README's test command: sh scripts/install_browser.sh")
    return found


@dataclass
class Page:
    """One tab, attached with a flat session: commands go out with its session id, events come back."""

    browser: Browser
    session: str
    console_errors: list[str] = field(default_factory=list)
    dialogs: list[str] = field(default_factory=list)

    async def call(self, method: str, **params: Any) -> dict[str, Any]:
        return await self.browser.call(method, params, session=self.session)

    async def evaluate(self, expression: str) -> Any:
        """Run ``expression`` in the page and return its value (by value: JSON-able results only)."""
        result = await self.call("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in result:
            raise AssertionError(f"page script failed: {result['exceptionDetails']}")
        return result["result"].get("value")

    async def click(self, selector: str) -> None:
        """A real mouse click (pressed and released) at the middle of the element ``selector`` names."""
        box = await self.evaluate(
            f"(() => {{ const el = document.querySelector({selector!r}); el.scrollIntoView({{block: 'center'}});"
            " const r = el.getBoundingClientRect(); return [r.x + r.width / 2, r.y + r.height / 2]; })()")
        x, y = box
        for kind in ("mousePressed", "mouseReleased"):
            await self.call("Input.dispatchMouseEvent", type=kind, x=x, y=y, button="left", clickCount=1)

    async def type_into(self, selector: str, text: str) -> None:
        """Focus the field and type ``text`` as the keyboard would (an ``input`` event fires)."""
        await self.evaluate(f"document.querySelector({selector!r}).focus()")
        await self.call("Input.insertText", text=text)

    def on_event(self, method: str, params: dict[str, Any]) -> None:
        if method == "Runtime.exceptionThrown":
            details = params["exceptionDetails"]
            self.console_errors.append(str(details.get("exception", {}).get("description") or details.get("text")))
        elif method == "Runtime.consoleAPICalled" and params["type"] in ("error", "assert"):
            self.console_errors.append(" ".join(str(a.get("value", a.get("description"))) for a in params["args"]))
        elif method == "Log.entryAdded" and params["entry"]["level"] == "error":
            self.console_errors.append(f"{params['entry']['source']}: {params['entry']['text']}")
        elif method == "Page.javascriptDialogOpening":
            self.dialogs.append(f"{params['type']}: {params['message']}")
            asyncio.get_running_loop().create_task(self.call("Page.handleJavaScriptDialog", accept=True))


class Browser:
    """Headless Chromium over the DevTools protocol: start, open pages, stop by pid."""

    def __init__(self, profile: Path) -> None:
        self.profile = profile
        self.process: asyncio.subprocess.Process | None = None
        self.stderr: list[str] = []
        self._ids = itertools.count(1)
        self._waiting: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self._events: dict[tuple[str, str], asyncio.Future[dict[str, Any]]] = {}
        self._pages: dict[str, Page] = {}
        self._tasks: list[asyncio.Task[None]] = []
        self._http: aiohttp.ClientSession | None = None
        self._ws: aiohttp.ClientWebSocketResponse | None = None

    async def start(self) -> None:
        self.process = await asyncio.create_subprocess_exec(
            chromium_binary(), *CHROMIUM_FLAGS, f"--user-data-dir={self.profile}", "about:blank",
            stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE)
        url = await asyncio.wait_for(self._devtools_url(), STEP_TIMEOUT)
        self._tasks.append(asyncio.create_task(self._drain_stderr()))
        self._http = aiohttp.ClientSession()
        self._ws = await self._http.ws_connect(url, max_msg_size=0, timeout=aiohttp.ClientWSTimeout(ws_close=5))
        self._tasks.append(asyncio.create_task(self._read()))

    async def _devtools_url(self) -> str:
        assert self.process is not None and self.process.stderr is not None
        while line := (await self.process.stderr.readline()).decode(errors="replace"):
            self.stderr.append(line)
            if line.startswith("DevTools listening on "):
                return line.split(" on ", 1)[1].strip()
        raise AssertionError("chromium exited before it listened for DevTools:\n" + "".join(self.stderr[-20:]))

    async def _drain_stderr(self) -> None:
        """Keep reading its log so a chatty browser never blocks on a full pipe."""
        assert self.process is not None and self.process.stderr is not None
        while line := await self.process.stderr.readline():
            self.stderr.append(line.decode(errors="replace"))

    async def _read(self) -> None:
        assert self._ws is not None
        async for message in self._ws:
            if message.type != aiohttp.WSMsgType.TEXT:
                break
            data = message.json()
            if "id" in data:
                future = self._waiting.pop(data["id"], None)
                if future is not None and not future.done():
                    future.set_result(data)
                continue
            method, params, session = data["method"], data.get("params", {}), data.get("sessionId", "")
            if session in self._pages:
                self._pages[session].on_event(method, params)
            waiter = self._events.pop((session, method), None)
            if waiter is not None and not waiter.done():
                waiter.set_result(params)

    async def call(self, method: str, params: dict[str, Any] | None = None, *, session: str | None = None
                   ) -> dict[str, Any]:
        assert self._ws is not None
        message_id = next(self._ids)
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._waiting[message_id] = future
        message: dict[str, Any] = {"id": message_id, "method": method, "params": params or {}}
        if session:
            message["sessionId"] = session
        await self._ws.send_json(message)
        reply = await asyncio.wait_for(future, STEP_TIMEOUT)
        if "error" in reply:
            raise AssertionError(f"DevTools {method} failed: {reply['error']}")
        return dict(reply["result"])

    def expect(self, session: str, method: str) -> asyncio.Future[dict[str, Any]]:
        """A future for the next ``method`` event of a page; register it before causing the event."""
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._events[(session, method)] = future
        return future

    async def open(self, url: str, width: int = 1280, height: int = 1000) -> Page:
        """A new tab showing ``url``, loaded (its load event fired), with console and dialogs watched."""
        target = await self.call("Target.createTarget", {"url": "about:blank"})
        attached = await self.call("Target.attachToTarget", {"targetId": target["targetId"], "flatten": True})
        page = Page(self, attached["sessionId"])
        self._pages[page.session] = page
        for domain in ("Runtime", "Log", "Page"):
            await page.call(f"{domain}.enable")
        await page.call("Emulation.setDeviceMetricsOverride", width=width, height=height, deviceScaleFactor=1,
                        mobile=False)
        loaded = self.expect(page.session, "Page.loadEventFired")
        await page.call("Page.navigate", url=url)
        await asyncio.wait_for(loaded, STEP_TIMEOUT)
        return page

    async def stop(self) -> None:
        """Close the connection, then end the browser by its pid (TERM, then KILL if it lingers)."""
        if self._ws is not None:
            await self._ws.close()
        if self._http is not None:
            await self._http.close()
        process = self.process
        if process is not None and process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                process.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(process.wait(), STEP_TIMEOUT)
            except TimeoutError:
                process.kill()
                await asyncio.wait_for(process.wait(), STEP_TIMEOUT)
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)


@contextlib.asynccontextmanager
async def chromium(profile: Path) -> AsyncIterator[Browser]:
    browser = Browser(profile)
    try:
        await browser.start()
        yield browser
    finally:
        await browser.stop()
