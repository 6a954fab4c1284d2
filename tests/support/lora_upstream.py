"""A vLLM stand-in that serves LoRA adapters the way vLLM's API shows them (for routing and validation tests).

/v1/models lists the base model and the adapters (with `parent` and `root`); /v1/load_lora_adapter exists only
when `runtime_loading` is on (vLLM: VLLM_ALLOW_RUNTIME_LORA_UPDATING=True) and answers with vLLM's errors;
completions answer "<model> says hi" for a served model and vLLM's 404 otherwise, recording each request's model.
"""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler
from pathlib import Path

from tests.support.net import BurstHTTPServer


class LoRAUpstream:
    def __init__(self, base: str = "base-model", adapters: dict[str, str] | None = None, *, runtime_loading: bool = True) -> None:
        self.base = base
        self.adapters: dict[str, str] = dict(adapters or {})  # name -> root (the path vLLM loaded it from)
        self.runtime_loading = runtime_loading
        self.loads: list[dict] = []  # bodies of load requests
        self.models_asked: list[str] = []  # the model of each completion request
        owner = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def _send(self, status: int, payload) -> None:
                body = payload.encode() if isinstance(payload, str) else json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self):
                if self.path == "/health":
                    self._send(200, {})
                elif self.path == "/v1/models":
                    data = [{"id": owner.base, "object": "model", "root": "/models/base", "parent": None}]
                    data += [{"id": name, "object": "model", "root": root, "parent": owner.base} for name, root in owner.adapters.items()]
                    self._send(200, {"object": "list", "data": data})
                else:
                    self._send(404, {"detail": "Not Found"})

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length") or 0)) or b"{}")
                if self.path == "/v1/load_lora_adapter" and owner.runtime_loading:
                    owner.loads.append(body)
                    self._send(*owner.load(body["lora_name"], body["lora_path"]))
                elif self.path in ("/v1/completions", "/v1/chat/completions"):
                    model = body.get("model")
                    owner.models_asked.append(model)
                    if model != owner.base and model not in owner.adapters:
                        error = {"message": f"The model `{model}` does not exist.", "type": "NotFoundError", "code": 404}
                        self._send(404, {"error": error})
                        return
                    text = f"{model} says hi"
                    choice = {"index": 0, "finish_reason": "stop"}
                    choice.update({"message": {"role": "assistant", "content": text}} if "chat" in self.path else {"text": text})
                    self._send(200, {"model": model, "choices": [choice], "usage": {"prompt_tokens": 3, "completion_tokens": 3}})
                else:
                    self._send(404, {"detail": "Not Found"})

        self._server = BurstHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)

    def load(self, name: str, path: str) -> tuple[int, object]:
        """vLLM's answers (vllm 0.32, measured)."""
        if name in self.adapters:
            message = f"The lora adapter '{name}' has already been loaded. If you want to load the adapter in place, set 'load_inplace' to True."
            return 400, {"error": {"message": message, "type": "InvalidUserInput", "code": 400}}
        if not (Path(path) / "adapter_config.json").exists():
            return 404, {"error": {"message": f"Loading lora {name} failed: No adapter found for {path}", "type": "NotFoundError", "code": 404}}
        self.adapters[name] = path
        return 200, f"Success: LoRA adapter '{name}' added successfully."

    def __enter__(self) -> LoRAUpstream:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._server.shutdown()
        self._server.server_close()
