"""A deliberately broken OpenAI-style upstream, for fault injection only.

Real behaviour is tested against a real vLLM; this server exists to produce
the failures a real one produces rarely: hanging, dropping the connection,
answering garbage or HTTP 500.
"""

from __future__ import annotations

import json
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

MODES = ("hang", "drop", "garbage", "error500", "stream_garbage", "stream_truncated", "slow_ok")


# Fits a completion, a chat completion and (as one event) a stream of either.
SLOW_OK_BODY = (
    b'{"model": "fault-model", "choices": [{"index": 0, "text": "late but fine", "finish_reason": "stop",'
    b' "message": {"role": "assistant", "content": "late but fine"}, "delta": {"content": "late but fine"}}],'
    b' "usage": {"prompt_tokens": 3, "completion_tokens": 3}}'
)


class FaultUpstream:
    def __init__(self, mode: str = "hang", hang_seconds: float = 30.0) -> None:
        assert mode in MODES, mode
        self.mode = mode
        self.hang_seconds = hang_seconds
        self.requests: list[str] = []
        self.disconnects = threading.Event()
        owner = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def _send(self, status: int, body: bytes, content_type: str = "application/json") -> None:
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self):
                if self.path == "/health":
                    self._send(200, b"")
                elif self.path == "/v1/models":
                    self._send(200, b'{"data": [{"id": "fault-model"}]}')
                else:
                    self._send(404, b"{}")

            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                streamed = bool(json.loads(body or b"{}").get("stream"))
                owner.requests.append(self.path)
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

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def __enter__(self) -> FaultUpstream:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._server.shutdown()
        self._server.server_close()
