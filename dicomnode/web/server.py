"""Serving the HTTP side: inside ``dicomnode serve`` (a thread) or alone (``dicomnode web``).

The socket is bound by :meth:`WebServer.bind`, synchronously and before
uvicorn runs: inside the node that happens before the DICOM port opens, so a
busy ``http_port`` (or unreadable TLS files) stops start-up with one line
instead of leaving a node whose dashboard silently never came up. uvicorn then
serves that socket from a thread of its own event loop; it installs no signal
handlers there (the serve process keeps its own), and its loggers stay at
WARNING unless ``log_level`` is DEBUG, so the access log (paths carry index
ids only) is not written at INFO at all.
"""
from __future__ import annotations

import errno
import logging
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable
from types import FrameType
from typing import Any

import uvicorn
from sqlalchemy.exc import SQLAlchemyError

from dicomnode.config import Settings
from dicomnode.index.migrate import SchemaError
from dicomnode.index.studies import Index
from dicomnode.runtime.service import Pipeline
from dicomnode.web.app import create_app
from dicomnode.web.auth import Authenticator
from dicomnode.web.state import WebState

log = logging.getLogger(__name__)

START_TIMEOUT_S = 60.0  # uvicorn's start-up on a loaded machine (normally milliseconds)
STOP_TIMEOUT_S = 30.0
GRACEFUL_S = 5  # open requests get this long to finish at stop; keep-alive connections are closed at once
_UVICORN_LOGGERS = ("uvicorn", "uvicorn.error", "uvicorn.access", "uvicorn.asgi")


class PortInUse(OSError):
    """``http_port`` is taken on ``http_host``: one line that names the setting."""

    def __init__(self, host: str, port: int) -> None:
        super().__init__(errno.EADDRINUSE, "address already in use")
        self.host, self.port = host, port

    def __str__(self) -> str:
        return (f"http_port {self.port} on {self.host} is already in use "
                "(setting http_port; 0 turns the HTTP side off)")


def _bind(host: str, port: int) -> socket.socket:
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise OSError(f"http_host {host!r} is not an address this host has ({exc.strerror})") from None
    family, kind, proto, _, addr = infos[0]
    sock = socket.socket(family, kind, proto)
    try:
        # a restart must not wait for the previous process's TIME_WAIT connections; on Linux this still
        # refuses a port another socket listens on, which is the mistake PortInUse reports
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(addr)
        sock.listen(2048)
    except OSError as exc:
        sock.close()
        if exc.errno == errno.EADDRINUSE:
            raise PortInUse(host, port) from None
        raise OSError(f"http_host {host} http_port {port}: cannot listen: {exc.strerror or exc}") from None
    sock.set_inheritable(False)
    return sock


class WebServer:
    """uvicorn in a thread of the serve process; ``listener`` is the node's StorageSCP (None in ``dicomnode web``).

    ``index``: the node's own Index (shared connection pool); None opens one
    from the settings, closed again by :meth:`stop`. ``nudge``/``requeue``:
    see :class:`~dicomnode.web.state.WebState`. Construction checks the
    credential rule (ValueError, one line); :meth:`bind` takes the port.
    """

    def __init__(self, settings: Settings, *, listener: Any = None, ready: Callable[[], bool] | None = None,
                 nudge: Callable[[], None] | None = None, requeue: Callable[[int, str], None] | None = None,
                 index: Index | None = None) -> None:
        self.settings = settings
        self.authenticator = Authenticator(settings)  # before anything is opened: the cheapest mistake first
        self._own_index = index is None
        self.index = index if index is not None else Index(settings.index_url)
        self.state = WebState(settings, self.index, listener=listener, ready=ready, nudge=nudge, requeue=requeue)
        self.app = create_app(self.state, self.authenticator)
        self.sock: socket.socket | None = None
        self.server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None

    @property
    def scheme(self) -> str:
        return "https" if self.settings.http_tls_cert_file else "http"

    @property
    def url(self) -> str:
        host = self.settings.http_host
        shown = f"[{host}]" if ":" in host else host
        return f"{self.scheme}://{shown}:{self.port}/"

    @property
    def port(self) -> int:
        if self.sock is not None:
            return int(self.sock.getsockname()[1])
        return self.settings.http_port

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def bind(self) -> None:
        """Take the port and load the TLS files now (PortInUse, OSError), so start-up fails here, not later."""
        if self.sock is not None:
            return
        s = self.settings
        debug = s.log_level.upper() == "DEBUG"
        config = uvicorn.Config(
            self.app, log_config=None, log_level="debug" if debug else "warning", access_log=debug,
            ssl_certfile=s.http_tls_cert_file or None, ssl_keyfile=s.http_tls_key_file or None,
            timeout_graceful_shutdown=GRACEFUL_S, server_header=False, proxy_headers=False, lifespan="on",
            loop="asyncio")
        for name in _UVICORN_LOGGERS:
            logging.getLogger(name).setLevel(logging.DEBUG if debug else logging.WARNING)
        try:
            config.load()  # the SSL context: a missing or unreadable certificate fails here
        except (OSError, ValueError) as exc:
            raise OSError(f"http_tls_cert_file/http_tls_key_file: cannot load the HTTP side's TLS certificate: "
                          f"{getattr(exc, 'strerror', None) or exc}") from None
        self.sock = _bind(s.http_host, s.http_port)
        self.server = uvicorn.Server(config)

    def start(self) -> None:
        """Bind (if not yet) and serve in a daemon thread; returns once uvicorn answers (or after a bound)."""
        self.bind()
        assert self.server is not None and self.sock is not None
        self._thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]},
                                        name="dicomnode-web", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + START_TIMEOUT_S
        while not self.server.started and self._thread.is_alive() and time.monotonic() < deadline:
            time.sleep(0.01)
        if self.server.started:
            where = "" if not self.authenticator.open else " (open on loopback: no credentials configured)"
            log.info("HTTP side on %s%s", self.url, where)
        else:
            log.error("the HTTP side did not start on %s; the DICOM side runs on without it", self.url)

    def stop(self) -> None:
        """Stop serving: open requests get ``GRACEFUL_S``, then the thread ends; the socket is closed."""
        if self.server is not None:
            self.server.should_exit = True
        if self._thread is not None:
            self._thread.join(STOP_TIMEOUT_S)
            if self._thread.is_alive() and self.server is not None:
                self.server.force_exit = True
                self._thread.join(STOP_TIMEOUT_S)
            self._thread = None
        if self.sock is not None:
            self.sock.close()
            self.sock = None
        if self._own_index:
            self.index.close()


def run_web(settings: Settings) -> int:
    """``dicomnode web``: the HTTP side alone, until SIGTERM/SIGINT; the exit status.

    2 with one line for a start-up mistake (port in use, beyond loopback
    without credentials, unreachable index); 1 if the server stopped on its
    own; 0 after a signal. With a broker (distributed mode) a retried step is
    queued at once; in embedded mode the node's next reconcile picks it up.
    """
    try:
        server = WebServer(settings, index=None)
    except (ValueError, OSError, SQLAlchemyError, SchemaError) as exc:
        # SQLAlchemy's message spans lines (the statement, a link): its first line of the driver's reason only
        reason = str(getattr(exc, "orig", None) or exc).strip().splitlines()[0]
        print(f"dicomnode web: cannot start: {reason}", file=sys.stderr)
        return 2
    try:
        server.bind()
    except OSError as exc:
        server.stop()
        print(f"dicomnode web: cannot start: {exc}", file=sys.stderr)
        return 2
    if not settings.embedded:
        server.state.requeue = Pipeline(settings, server.index).send
    stop = threading.Event()

    def _handle(signum: int, _frame: FrameType | None) -> None:
        log.info("signal %d: shutting down", signum)
        stop.set()

    signal.signal(signal.SIGTERM, _handle)
    signal.signal(signal.SIGINT, _handle)
    server.start()
    while not stop.wait(1.0):
        if not server.alive:
            log.error("the HTTP side stopped on its own")
            server.stop()
            return 1
    server.stop()
    return 0
