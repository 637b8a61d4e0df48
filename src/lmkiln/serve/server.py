"""Running the app with uvicorn: safe binding, the socket bound before the banner, drain on SIGTERM.

Binding anything but a loopback address exposes the model to the network, so it needs an API key.
On SIGTERM (or Ctrl-C) the scheduler stops accepting (new requests get 503), uvicorn stops
listening and waits for the requests in flight to finish, then the scheduler thread ends.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Callable
from typing import TYPE_CHECKING

from lmkiln.errors import LmkilnError

if TYPE_CHECKING:  # importing it loads torch; `check_bind` answers before that
    from lmkiln.infer.batching import BatchScheduler


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name: it may resolve to anything
        return False


def check_bind(host: str, api_key: str | None) -> None:
    if not is_loopback(host) and not api_key:
        raise LmkilnError(
            f"--host {host} exposes the model beyond this machine; set a key with --api-key KEY "
            f"(or LMKILN_API_KEY) to bind it, or keep the default 127.0.0.1"
        )


def bind(host: str, port: int) -> socket.socket:
    """A listening socket on host:port (port 0 picks a free one)."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as err:
        raise LmkilnError(f"--host {host}: cannot resolve it ({err.strerror})") from None
    family, kind, proto, _, address = infos[0]
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
    except OSError as err:
        sock.close()
        raise LmkilnError(f"cannot listen on {host}:{port}: {err.strerror}; pick another --port") from None
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def run(
    app,
    scheduler: BatchScheduler,
    sock: socket.socket,
    drain_seconds: float = 60.0,
    on_started: Callable[[], None] | None = None,
    on_stopped: Callable[[], None] | None = None,
) -> None:
    """Serve `app` on `sock` until SIGTERM/SIGINT, then drain (at most `drain_seconds` per phase).

    uvicorn raises the signal again once it has shut down, so a SIGTERM still ends the process
    as a SIGTERM would (after the drain); `on_stopped` runs before that.
    """
    import uvicorn

    class DrainingServer(uvicorn.Server):
        def handle_exit(self, sig, frame) -> None:
            scheduler.stop_accepting()  # requests on open connections get 503 from here on
            super().handle_exit(sig, frame)

        async def startup(self, sockets=None) -> None:
            await super().startup(sockets=sockets)
            if on_started is not None and self.started:
                on_started()

        async def shutdown(self, sockets=None) -> None:
            await super().shutdown(sockets=sockets)  # connections closed, lifespan (scheduler) drained
            if on_stopped is not None:
                on_stopped()

    config = uvicorn.Config(
        app,
        log_level="warning",
        access_log=False,
        timeout_graceful_shutdown=drain_seconds,
        lifespan="on",
    )
    DrainingServer(config).run(sockets=[sock])
