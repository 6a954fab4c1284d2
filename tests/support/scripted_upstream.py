"""An OpenAI-style completions server that answers from a script (for guard-model verdicts)."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler

from tests.support.net import BurstHTTPServer


class ScriptedUpstream:
    """An OpenAI-style /v1/completions that answers from a script and records request bodies."""

    def __init__(self, answer):  # answer(body) -> (text, top_logprobs dict | None)
        self.bodies: list[dict] = []
        owner = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def do_GET(self):
                body = b'{"data": [{"id": "scripted-guard"}]}' if self.path == "/v1/models" else b""
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_POST(self):
                request = json.loads(self.rfile.read(int(self.headers.get("Content-Length") or 0)))
                owner.bodies.append(request)
                text, top = answer(request)
                logprobs = None if top is None else {"tokens": [text], "token_logprobs": [-0.1], "top_logprobs": [top]}
                body = json.dumps({"model": request["model"], "choices": [
                    {"index": 0, "text": text, "finish_reason": "stop", "logprobs": logprobs}],
                    "usage": {"prompt_tokens": 5, "completion_tokens": 1}}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        self._server = BurstHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._server.shutdown()
        self._server.server_close()
