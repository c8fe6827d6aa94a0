"""The in-process runner: :class:`~dsdkit.serving.app.DsdApp` on uvicorn, in this process, on one machine (the
``serve`` extra; no Ray).

Beyond uvicorn's defaults: a connection must deliver its request headers within ``header_timeout_s`` of its first
byte (uvicorn bounds their size, not their time), the socket is bound here (a port in use is a one-line error), and
SIGTERM and Ctrl-C stop the server the same way: no new connections, requests in progress get a few seconds to
finish, then the engine is closed and :func:`serve_local` returns (exit 0).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import signal
import socket
import threading
from collections.abc import Callable

from ..runtime.errors import ConfigError, MissingDependencyError, install_hint
from .app import DsdApp

__all__ = ["serve_local", "bind_socket", "make_server"]

logger = logging.getLogger(__name__)

#: Seconds requests in progress get to finish after SIGTERM or Ctrl-C (a second Ctrl-C stops at once).
GRACE_S = 5


def _uvicorn():
    try:
        import uvicorn
        from uvicorn.protocols.http.h11_impl import H11Protocol
    except ImportError:
        raise MissingDependencyError(
            "dsdkit serve needs uvicorn, which is not installed: it comes with the 'serve' extra "
            f"({install_hint('serve')})"
        ) from None
    return uvicorn, H11Protocol


def bind_socket(host: str, port: int) -> socket.socket:
    """A listening TCP socket on ``host:port`` (port 0: any free port), or a one-line :class:`ConfigError`."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise ConfigError(f"`host` {host}: not an address of this machine ({exc.strerror})", field="host") from None
    family, kind, proto, _, address = infos[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6 and host in ("::", ""):
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        sock.bind(address)
        sock.listen(2048)
    except OSError as exc:
        sock.close()
        why = "the port is in use (another server?)" if exc.errno == errno.EADDRINUSE else exc.strerror
        raise ConfigError(f"cannot listen on {host}:{port}: {why}; give another `port`", field="port") from None
    sock.setblocking(False)
    return sock


def _protocol_class(base, header_timeout_s: float):
    """uvicorn's h11 protocol with a deadline on request headers: from a connection's first byte (or its opening)
    to its complete request head; past it the connection is closed. One deadline per request, not re-armed by each
    trickled byte, so a client that sends a byte a second still leaves on time."""
    import h11

    class HeaderDeadlineProtocol(base):
        _head_timer: asyncio.TimerHandle | None = None

        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            self._arm()

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            if self.conn.their_state is h11.IDLE:  # between requests on a kept-alive connection: a new head starts
                self._arm()

        def connection_lost(self, exc) -> None:
            if self._head_timer is not None:
                self._head_timer.cancel()
                self._head_timer = None
            super().connection_lost(exc)

        def _arm(self) -> None:
            if self._head_timer is None:
                self._head_timer = self.loop.call_later(header_timeout_s, self._head_deadline)

        def _head_deadline(self) -> None:
            self._head_timer = None
            if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
                logger.info("dsdkit serve: closed a connection whose request headers took over %g s", header_timeout_s)
                self.transport.close()

    return HeaderDeadlineProtocol


def make_server(app: DsdApp, on_ready: Callable[[], None] | None = None, verbose: bool = False):
    """The uvicorn ``Server`` for ``app`` (not started): its own signal handling (SIGTERM as Ctrl-C, no signal
    raised again after the shutdown), ``on_ready`` called once it listens."""
    uvicorn, h11_protocol = _uvicorn()
    config = app.config
    uv_config = uvicorn.Config(
        app,
        http=_protocol_class(h11_protocol, config.header_timeout_s),
        lifespan="on",
        log_config=None,  # dsdkit's logging, not uvicorn's (no colours, no second format)
        access_log=verbose,
        proxy_headers=False,  # the client is who connected; nothing here trusts X-Forwarded-* headers
        server_header=False,
        timeout_keep_alive=5,
        timeout_graceful_shutdown=GRACE_S,
        h11_max_incomplete_event_size=16 * 1024,  # request line and headers
    )

    class Server(uvicorn.Server):
        async def startup(self, sockets=None) -> None:
            await super().startup(sockets=sockets)
            if self.started and on_ready is not None:
                on_ready()

        @contextlib.contextmanager
        def capture_signals(self):
            if threading.current_thread() is not threading.main_thread():
                yield
                return
            handled = (signal.SIGINT, signal.SIGTERM)
            previous = {sig: signal.signal(sig, self.handle_exit) for sig in handled}
            try:
                yield
            finally:
                for sig, handler in previous.items():
                    signal.signal(sig, handler)
            # Unlike uvicorn's own, the signal is not raised again: stopping on request is the normal way out.

    return Server(uv_config)


def serve_local(
    app: DsdApp,
    host: str = "127.0.0.1",
    port: int = 8000,
    on_ready: Callable[[str], None] | None = None,
    verbose: bool = False,
) -> None:
    """Serve ``app`` at ``http://host:port/`` until SIGTERM or Ctrl-C; closes the app's engine when done.

    ``on_ready(url)`` is called once the socket listens and the app has started (``port`` 0: the URL holds the
    port chosen).
    """
    _configure_uvicorn_logging(verbose)
    sock = bind_socket(host, port)
    url = _url(host, sock.getsockname()[1])
    server = make_server(app, on_ready=(lambda: on_ready(url)) if on_ready else None, verbose=verbose)
    try:
        asyncio.run(server.serve(sockets=[sock]))
    finally:
        sock.close()
        app.close()
    logger.info("dsdkit serve: stopped")


def _url(host: str, port: int) -> str:
    shown = "127.0.0.1" if host in ("0.0.0.0", "") else "[::1]" if host == "::" else host
    if ":" in shown and not shown.startswith("["):
        shown = f"[{shown}]"
    return f"http://{shown}:{port}/"


def _configure_uvicorn_logging(verbose: bool) -> None:
    """uvicorn's messages go where dsdkit's go (the CLI's handler), warnings only unless ``verbose``."""
    ours = logging.getLogger("dsdkit")
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        log = logging.getLogger(name)
        log.setLevel(logging.INFO if verbose else logging.WARNING)
        if ours.handlers:
            log.handlers[:] = list(ours.handlers)
            log.propagate = False
