"""A deliberately broken OpenAI-style upstream, for fault injection only.

Real behaviour is tested against a real vLLM; this server exists to produce
the failures a real one produces rarely: hanging, dropping the connection,
answering garbage, HTTP errors, or resetting a stream halfway.
"""

from __future__ import annotations

import json
import socket
import struct
import threading
import time
from http.server import BaseHTTPRequestHandler

from tests.support.net import BurstHTTPServer

MODES = (
    "hang", "drop", "garbage", "error500", "stream_garbage", "stream_truncated", "slow_ok",
    "status",  # answers `status` with `body` and `headers`
    "empty_choices",  # a completion (or stream) without any choice
    "stream_reset",  # `events` text events, a pause to let them be read, then a TCP reset
    "trickle",  # a stream of `events` text events, one per `hang_seconds`, like a model generating; notes a disconnect
)


# Fits a completion, a chat completion and (as one event) a stream of either.
SLOW_OK_BODY = (
    b'{"model": "fault-model", "choices": [{"index": 0, "text": "late but fine", "finish_reason": "stop",'
    b' "message": {"role": "assistant", "content": "late but fine"}, "delta": {"content": "late but fine"}}],'
    b' "usage": {"prompt_tokens": 3, "completion_tokens": 3}}'
)
EMPTY_BODY = b'{"model": "fault-model", "choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 0}}'


def piece_event(i: int) -> bytes:
    """One stream event carrying `piece {i} ` as a completion's text and a chat delta."""
    text = f"piece {i} "
    choice = {"index": 0, "text": text, "delta": {"content": text}, "finish_reason": None}
    return b"data: " + json.dumps({"model": "fault-model", "choices": [choice]}).encode() + b"\n\n"


class FaultUpstream:
    def __init__(self, mode: str = "hang", hang_seconds: float = 30.0) -> None:
        assert mode in MODES, mode
        self.mode = mode
        self.hang_seconds = hang_seconds
        self.requests: list[str] = []
        self.request_ids: list[str | None] = []  # each request's X-Request-Id header
        self.disconnects = threading.Event()
        self.health_status = 200
        self.status, self.body, self.headers = 503, b'{"error": {"message": "overloaded"}}', {}
        self.events = 3
        self.sent_events = 0
        owner = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def _send(self, status: int, body: bytes, content_type: str = "application/json", headers=None) -> None:
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                for name, value in (headers or {}).items():
                    self.send_header(name, value)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self):
                if self.path == "/health":
                    self._send(owner.health_status, b"")
                elif self.path == "/v1/models":
                    self._send(200, b'{"data": [{"id": "fault-model"}]}')
                else:
                    self._send(404, b"{}")

            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                streamed = bool(json.loads(body or b"{}").get("stream"))
                owner.requests.append(self.path)
                owner.request_ids.append(self.headers.get("X-Request-Id"))
                mode = owner.mode
                if mode == "hang":
                    # Hold the request open; notice when the client gives up.
                    deadline = time.monotonic() + owner.hang_seconds
                    self.connection.settimeout(0.05)
                    while time.monotonic() < deadline:
                        try:
                            if self.connection.recv(1, socket.MSG_PEEK) == b"":
                                owner.disconnects.set()
                                return
                        except (TimeoutError, BlockingIOError):
                            continue
                        except OSError:
                            owner.disconnects.set()
                            return
                    self._send(200, b"{}")
                elif mode == "drop":
                    self.connection.shutdown(socket.SHUT_RDWR)
                    self.close_connection = True
                elif mode == "garbage":
                    self._send(200, b"<html>definitely not json", "text/html")
                elif mode == "error500":
                    self._send(500, b'{"error": {"message": "engine dead"}}')
                elif mode == "slow_ok":
                    time.sleep(owner.hang_seconds)
                    if streamed:
                        self._send(200, b"data: " + SLOW_OK_BODY + b"\n\ndata: [DONE]\n\n", "text/event-stream")
                    else:
                        self._send(200, SLOW_OK_BODY)
                elif mode == "stream_garbage":
                    self._send(200, b"data: {not json}\n\n", "text/event-stream")
                elif mode == "stream_truncated":
                    self._send(200, b"data: " + SLOW_OK_BODY + b"\n\n", "text/event-stream")  # no [DONE]
                elif mode == "status":
                    self._send(owner.status, owner.body, headers=owner.headers)
                elif mode == "empty_choices":
                    if streamed:
                        self._send(200, b"data: " + EMPTY_BODY + b"\n\ndata: [DONE]\n\n", "text/event-stream")
                    else:
                        self._send(200, EMPTY_BODY)
                elif mode == "trickle":
                    self.send_response(200)
                    self.send_header("Content-Type", "text/event-stream")
                    self.send_header("Transfer-Encoding", "chunked")
                    self.end_headers()
                    try:
                        for i in range(owner.events):
                            event = piece_event(i)
                            self.wfile.write(b"%x\r\n%s\r\n" % (len(event), event))
                            self.wfile.flush()
                            owner.sent_events = i + 1
                            time.sleep(owner.hang_seconds)
                        done = b"data: [DONE]\n\n"
                        self.wfile.write(b"%x\r\n%s\r\n0\r\n\r\n" % (len(done), done))
                        self.wfile.flush()
                    except OSError:
                        owner.disconnects.set()  # the client closed the stream: a generation would stop here
                        self.close_connection = True
                elif mode == "stream_reset":
                    self.send_response(200)
                    self.send_header("Content-Type", "text/event-stream")
                    self.send_header("Transfer-Encoding", "chunked")
                    self.end_headers()
                    for i in range(owner.events):
                        event = piece_event(i)
                        self.wfile.write(b"%x\r\n%s\r\n" % (len(event), event))
                    self.wfile.flush()
                    # Unread data is discarded when a reset arrives: let the client read the events first.
                    time.sleep(0.3)
                    self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                    self.connection.close()
                    self.close_connection = True

        self._server = BurstHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)

    def __enter__(self) -> FaultUpstream:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._server.shutdown()
        self._server.server_close()
