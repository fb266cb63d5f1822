"""Running the app with uvicorn: in the foreground (the CLI) or in a background thread (tests, benchmarks)."""
from __future__ import annotations

import contextlib
import errno
import ipaddress
import socket
import threading
import time
from typing import Iterator

LOOPBACK_NAMES = ("127.0.0.1", "localhost", "[::1]", "::1")


def is_loopback(host: str) -> bool:
    """True for 127.0.0.0/8, ::1 and 'localhost'."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_token(token: str | None) -> None:
    """ValueError for a token no request could send: empty (e.g. `FASTDIFF_TOKEN= fastdiff serve`), or with
    spaces or control characters. None (no token) is fine."""
    if token is None:
        return
    if not token:
        raise ValueError("--token (or FASTDIFF_TOKEN) is empty: every request would be refused; give a token, "
                         "or unset FASTDIFF_TOKEN to serve without one")
    if token != token.strip() or not token.isprintable() or any(c.isspace() for c in token):
        raise ValueError("--token (or FASTDIFF_TOKEN) must not contain spaces or control characters")


def check_bind(host: str, token: str | None) -> str | None:
    """The warning to print for host, or None; ValueError when a non-loopback host has no token."""
    if is_loopback(host):
        return None
    if not token:
        raise ValueError(f"--host {host} exposes the server beyond this machine: pass --token (or set "
                         "FASTDIFF_TOKEN); every request must then carry it")
    return (f"warning: serving on {host}: reachable from other machines; every request needs the token "
            "(plain HTTP: use it on trusted networks only, or behind a TLS proxy)")


def bind(host: str, port: int) -> socket.socket:
    """A socket bound to host:port for `serve`, so that a port in use is refused before anything else is done."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host.strip("[]"), port, type=socket.SOCK_STREAM,
                                                            flags=socket.AI_PASSIVE)[0]
    except socket.gaierror as e:
        raise ValueError(f"--host {host}: cannot resolve it ({e.strerror})") from None
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn: rebinding over TIME_WAIT is fine
    try:
        sock.bind(address)
    except OSError as e:
        sock.close()
        if e.errno == errno.EADDRINUSE:
            raise ValueError(f"--port {port}: address already in use") from None
        raise ValueError(f"--host {host} --port {port}: cannot bind ({e.strerror or e})") from None
    return sock


def _server(app, config):
    """A uvicorn Server that cancels the app's jobs as soon as shutdown begins, before uvicorn waits for open
    connections: long polls then answer at once with `cancelled` (instead of being cut off after the grace
    period) and the running batch stops at its next step."""
    import uvicorn

    class Server(uvicorn.Server):
        async def shutdown(self, sockets=None) -> None:
            batcher = getattr(getattr(app, "state", None), "batcher", None)
            if batcher is not None:
                batcher.cancel()
            await super().shutdown(sockets)

    return Server(config)


def serve(app, host: str = "127.0.0.1", port: int = 7860, log_level: str = "warning",
          sock: socket.socket | None = None) -> None:
    """Serve until Ctrl-C (uvicorn; the app's lifespan stops the worker and cancels unfinished jobs) on `sock`,
    default bind(host, port)."""
    import uvicorn

    sock = sock or bind(host, port)
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, access_log=False,
                            timeout_graceful_shutdown=5)
    try:
        _server(app, config).run(sockets=[sock])
    except KeyboardInterrupt:  # as uvicorn.run: Ctrl-C is the way to stop
        pass
    finally:
        sock.close()


@contextlib.contextmanager
def background(app, host: str = "127.0.0.1", port: int = 0, timeout: float = 30.0) -> Iterator[str]:
    """Serve app in a thread on host:port (0: a free port); yields the base URL, stops on exit (bounded)."""
    import uvicorn

    sock = bind(host, port)
    port = sock.getsockname()[1]
    config = uvicorn.Config(app, host=host, port=port, log_level="warning", access_log=False,
                            timeout_graceful_shutdown=5, lifespan="on")
    server = _server(app, config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="fastdiff-serve", daemon=True)
    thread.start()
    deadline = time.monotonic() + timeout
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            server.should_exit = True
            sock.close()
            raise RuntimeError(f"the server did not start within {timeout:.0f} s")
        time.sleep(0.02)
    try:
        yield f"http://{host}:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout)
        sock.close()
