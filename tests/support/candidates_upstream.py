"""An OpenAI-style upstream that answers `n` scripted candidates, and scores them as a remote reward would.

best_of_n asks for n choices in one call; this server answers choice i with `texts[i % len(texts)]`, for
completions and chat completions alike (not streamed: best_of_n needs whole answers). It is also a vLLM
pooling server's `/score` (a policy's `reward: {type: remote, url: <this>, model: rm}`), scoring each text with
`scores[text]` (0.0 for a text not listed), so which candidate wins is known in advance.
"""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler

from tests.support.net import BurstHTTPServer


class CandidatesUpstream:
    def __init__(self, texts: list[str], scores: dict[str, float] | None = None) -> None:
        self.texts = list(texts)
        self.scores = dict(scores or {})
        self.bodies: list[dict] = []
        owner = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def _send(self, status: int, payload: dict | None) -> None:
                body = b"" if payload is None else json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self):
                if self.path == "/health":
                    self._send(200, None)
                elif self.path == "/v1/models":
                    self._send(200, {"data": [{"id": "candidates-model"}]})
                else:
                    self._send(404, {})

            def do_POST(self):
                request = json.loads(self.rfile.read(int(self.headers.get("Content-Length") or 0)) or b"{}")
                owner.bodies.append(request)
                if self.path == "/score":
                    rows = [{"index": i, "score": owner.scores.get(text, 0.0)} for i, text in enumerate(request["text_2"])]
                    self._send(200, {"data": rows})
                    return
                chat = self.path.endswith("/chat/completions")
                texts = [owner.texts[i % len(owner.texts)] for i in range(int(request.get("n") or 1))]
                choices = [
                    {"index": i, "finish_reason": "stop", **({"message": {"role": "assistant", "content": t}} if chat else {"text": t})}
                    for i, t in enumerate(texts)
                ]
                usage = {"prompt_tokens": 4, "completion_tokens": 2 * len(texts)}
                self._send(200, {"model": request.get("model", "candidates-model"), "choices": choices, "usage": usage})

        self._server = BurstHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)

    def __enter__(self) -> CandidatesUpstream:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._server.shutdown()
        self._server.server_close()
