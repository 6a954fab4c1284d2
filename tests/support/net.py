"""Loopback helpers for tests: free ports, and an HTTP server that takes bursts of connections."""

import socket
from http.server import ThreadingHTTPServer


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class BurstHTTPServer(ThreadingHTTPServer):
    # The default listen backlog (5) drops a burst of simultaneous connections, which then wait a
    # second or more for a SYN retransmit: a test's timing would measure the kernel, not guard.
    request_queue_size = 128
