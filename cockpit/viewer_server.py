"""The web server behind ``spyke-cockpit serve``: textual-serve, with viewers that cannot outlive their tab.

textual-serve 1.1.3 starts one app process per websocket (``sh -c COMMAND``, in the server's process
group) and, when the tab goes, sends it a ``quit`` message and waits for it, unbounded; on Ctrl-C the
server waits up to a minute for open tabs and leaves their processes running. Here:

* the command is ``exec``-ed, so the process serve starts *is* the viewer, in a process group of its
  own (with the snapshot prefetch child it may fork);
* a closed tab (cleanly or not: a dropped TCP connection ends the websocket too) stops its viewer with
  ``quit``, then SIGTERM, then SIGKILL to the group, each after a bounded wait;
* stopping serve (SIGINT, SIGTERM, SIGHUP) stops every viewer the same way before the server returns,
  and whatever still runs when :meth:`ViewerServer.serve` returns is killed.

The viewer watches its side too (:mod:`cockpit.viewer.lifeline`): it ends when serve or its pipe goes.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
from typing import Any

from aiohttp import WSCloseCode, web
from aiohttp.web_runner import GracefulExit
from textual_serve.app_service import AppService
from textual_serve.server import Server, to_int

log = logging.getLogger("textual-serve")

QUIT_WAIT = 2.0         # seconds a viewer gets to close after ``quit`` (it draws its last frame)
TERM_WAIT = 1.0         # and after SIGTERM, before SIGKILL
SHUTDOWN_WAIT = 3.0     # what aiohttp waits for open requests when serve stops (its default is 60 s)


def signal_group(pid: int, signum: int) -> None:
    """``signum`` to the viewer's process group (the viewer and any child it forked)."""
    try:
        os.killpg(pid, signum)
    except (ProcessLookupError, PermissionError):
        pass


class ViewerService(AppService):
    """One tab's viewer process: started in its own process group, stopped within a bounded time."""

    def __init__(self, command: str, **kwargs: Any) -> None:
        super().__init__(command, **kwargs)
        self._stopping: asyncio.Task[None] | None = None

    @property
    def pid(self) -> int | None:
        return None if self._process is None else self._process.pid

    async def _open_app_process(self, width: int = 80, height: int = 24) -> asyncio.subprocess.Process:
        self._process = process = await asyncio.create_subprocess_shell(
            self.command, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE, env=self._build_environment(width=width, height=height),
            start_new_session=True)
        assert process.stdin is not None
        self._stdin = process.stdin
        return process

    async def stop(self) -> None:
        """Idempotent and safe to call from several tasks (the tab's handler, the server's shutdown)."""
        if self._stopping is None:
            self._stopping = asyncio.ensure_future(self._stop_once())
        await asyncio.shield(self._stopping)

    async def _stop_once(self) -> None:
        process = self._process
        if self._task is not None:
            try:
                await asyncio.wait_for(super().stop(), QUIT_WAIT)     # ``quit``, then its output to the end
            except (asyncio.TimeoutError, ConnectionError, RuntimeError):
                pass
            self._task = None
        if process is None or process.returncode is not None:
            return
        for signum, wait in ((None, TERM_WAIT), (signal.SIGTERM, TERM_WAIT), (signal.SIGKILL, None)):
            if signum is not None:
                signal_group(process.pid, signum)
            try:
                await asyncio.wait_for(process.wait(), wait)
                return
            except asyncio.TimeoutError:
                continue


class ViewerServer(Server):
    """textual-serve's Server whose viewer processes end with their tab and with the server."""

    def __init__(self, command: str, **kwargs: Any) -> None:
        super().__init__(command, **kwargs)
        self.services: set[ViewerService] = set()
        self.sockets: set[web.WebSocketResponse] = set()
        self.pids: set[int] = set()        # every viewer started, for the last sweep

    async def on_startup(self, app: web.Application) -> None:
        """Quiet: ``spyke-cockpit serve`` prints its own line (the command here is an internal one)."""

    async def on_shutdown(self, app: web.Application) -> None:
        await asyncio.gather(*(service.stop() for service in list(self.services)), return_exceptions=True)
        await asyncio.gather(*(ws.close(code=WSCloseCode.GOING_AWAY, message=b"spyke-cockpit serve stopped")
                               for ws in list(self.sockets)), return_exceptions=True)

    async def handle_websocket(self, request: web.Request) -> web.WebSocketResponse:
        websocket = web.WebSocketResponse(heartbeat=15)
        width = to_int(request.query.get("width", "80"), 80)
        height = to_int(request.query.get("height", "24"), 24)
        await websocket.prepare(request)
        service = ViewerService(self.command, write_bytes=websocket.send_bytes, write_str=websocket.send_str,
                                close=websocket.close, download_manager=self.download_manager, debug=self.debug)
        self.sockets.add(websocket)
        self.services.add(service)
        try:
            await service.start(width, height)
            if service.pid is not None:
                self.pids.add(service.pid)
            await self._process_messages(websocket, service)
        except asyncio.CancelledError:
            pass
        except Exception as error:  # noqa: BLE001 - one tab's failure is logged, the server goes on
            log.exception(error)
        finally:
            try:
                await service.stop()
            finally:
                self.services.discard(service)
                self.sockets.discard(websocket)
                if not websocket.closed:
                    await websocket.close()
        return websocket

    def serve(self, debug: bool = False) -> None:
        self.debug = debug
        self.initialize_logging()
        loop = asyncio.new_event_loop()
        asyncio.set_event_loop(loop)
        for name in ("SIGINT", "SIGTERM", "SIGHUP"):
            if hasattr(signal, name):
                try:
                    loop.add_signal_handler(getattr(signal, name), self.request_exit)
                except (NotImplementedError, RuntimeError):
                    pass
        try:
            web.run_app(self._make_app(), host=self.host, port=self.port, handle_signals=False, loop=loop,
                        shutdown_timeout=SHUTDOWN_WAIT, print=lambda *args: None)
        except (GracefulExit, KeyboardInterrupt):
            pass
        finally:
            self.sweep()

    def sweep(self) -> None:
        """Kill the process group of any viewer still alive (a last resort: stop() has normally ended them)."""
        alive = [pid for pid in self.pids if _running_child(pid)]
        for pid in alive:
            signal_group(pid, signal.SIGKILL)
        for pid in alive:
            try:
                os.waitpid(pid, 0)
            except ChildProcessError:
                pass


def _running_child(pid: int) -> bool:
    try:
        done, _ = os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:       # reaped already (by asyncio's child watcher)
        return False
    return done == 0
