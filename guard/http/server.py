"""Runs the HTTP door's ASGI app with uvicorn inside guard's own event loop.

uvicorn's `Server.serve()` would install its own SIGINT/SIGTERM handlers; guard owns the
signals (one drain for both doors), so the server's start, main loop and shutdown are driven here.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import ssl
from pathlib import Path

import uvicorn

log = logging.getLogger(__name__)


class HttpServer:
    def __init__(
        self,
        app,
        host: str,
        port: int,
        grace_seconds: float,
        *,
        tls_cert: Path | None = None,
        tls_key: Path | None = None,
        tls_client_ca: Path | None = None,
        reuse_port: bool = False,
    ) -> None:
        self.config = uvicorn.Config(
            app,
            lifespan="off",
            log_level="warning",
            access_log=False,
            timeout_graceful_shutdown=max(1, round(grace_seconds)),
            ssl_certfile=str(tls_cert) if tls_cert else None,
            ssl_keyfile=str(tls_key) if tls_key else None,
            ssl_ca_certs=str(tls_client_ca) if tls_client_ca else None,
            ssl_cert_reqs=ssl.CERT_REQUIRED if tls_client_ca else ssl.CERT_NONE,
        )
        self.host = host
        self.requested_port = port
        self.reuse_port = reuse_port
        self.port = 0
        self._server: uvicorn.Server | None = None
        self._socket: socket.socket | None = None
        self._main: asyncio.Task | None = None

    async def start(self) -> int:
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        # IPPROTO_TCP, not 0: asyncio sets TCP_NODELAY only on sockets that say they are TCP; without it a
        # response body written after its headers waits ~40 ms for the client's delayed ACK.
        sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if self.reuse_port:  # workers of one supervisor share the port; the kernel spreads connections
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        try:
            sock.bind((self.host, self.requested_port))
        except OSError as exc:
            sock.close()
            raise RuntimeError(f"cannot bind HTTP port {self.host}:{self.requested_port}: {exc}") from exc
        sock.listen(2048)
        sock.setblocking(False)
        self._socket = sock
        self.port = sock.getsockname()[1]
        self.config.load()
        server = uvicorn.Server(self.config)
        server.lifespan = self.config.lifespan_class(self.config)
        await server.startup(sockets=[sock])
        self._server = server
        self._main = asyncio.create_task(server.main_loop(), name="http-main-loop")
        return self.port

    async def stop(self) -> None:
        """Stops accepting, lets in-flight requests finish (up to the grace period), then returns."""
        if self._server is None:
            return
        self._server.should_exit = True
        if self._main is not None:
            await self._main
        await self._server.shutdown(sockets=[self._socket] if self._socket else None)
        self._server = None
