"""An OpenAI-compatible upstream that answers at once, so a benchmark times only what sits in front of it.

    python -m benchmarks.instant_upstream --port 9000 [--tokens 16]

Serves GET /health, GET /v1/models, POST /v1/chat/completions and /v1/completions (unary, and
SSE when the body asks to stream: one event per token, usage on each, then [DONE]) with a canned
answer of `--tokens` tokens, or of `max_tokens` when the body asks for fewer (so chunked
generation, as speculative rejection does it, sees chunks of the length it asked for).
HTTP/1.1 keep-alive on uvloop with httptools' parser (both ship with uvicorn), so it costs a few
tens of microseconds per request and is not what a benchmark measures. It reads `"stream": true`,
`"n"` and `"max_tokens"` from the body by substring, not by parsing JSON: it is a benchmark
fixture, not a server.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import json
import re

import httptools

MODEL = "instant"
_N = re.compile(rb'"n":\s*(\d+)')
_MAX_TOKENS = re.compile(rb'"max_tokens":\s*(\d+)')


def _answers(tokens: int) -> dict[tuple[bool, bool, int], bytes]:
    """(chat, stream, n) -> the whole HTTP response, built once."""
    words = [f"word{i} " for i in range(tokens)]
    text = "".join(words)
    usage = {"prompt_tokens": 12, "completion_tokens": tokens, "total_tokens": 12 + tokens}
    out = {}
    for chat in (True, False):
        for n in (1, 2, 4, 8, 16, 32):
            def choice(i: int, content: str, finish, delta: bool) -> dict:
                if not chat:
                    return {"index": i, "text": content, "finish_reason": finish, "logprobs": None}
                key = "delta" if delta else "message"
                return {"index": i, key: {"role": "assistant", "content": content}, "finish_reason": finish}

            body = json.dumps(
                {"id": "x", "object": "chat.completion" if chat else "text_completion", "model": MODEL,
                 "choices": [choice(i, text, "length", False) for i in range(n)], "usage": usage}
            ).encode()
            out[(chat, False, n)] = _http(body, b"application/json")
            events = []
            for k, word in enumerate(words):
                step_usage = {"prompt_tokens": 12, "completion_tokens": k + 1, "total_tokens": 13 + k}
                finish = "length" if k == tokens - 1 else None
                for i in range(n):
                    event = {"id": "x", "model": MODEL, "choices": [choice(i, word, finish, True)], "usage": step_usage}
                    events.append(b"data: " + json.dumps(event).encode() + b"\n\n")
            events.append(b"data: [DONE]\n\n")
            out[(chat, True, n)] = _chunked(b"".join(events))
    return out


def _http(body: bytes, content_type: bytes) -> bytes:
    return (
        b"HTTP/1.1 200 OK\r\ncontent-type: " + content_type + b"\r\ncontent-length: " + str(len(body)).encode()
        + b"\r\n\r\n" + body
    )


def _chunked(body: bytes) -> bytes:
    head = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n"
    return head + f"{len(body):x}\r\n".encode() + body + b"\r\n0\r\n\r\n"


class _Connection(asyncio.Protocol):
    def __init__(self, answers, tokens: int) -> None:
        self.answers = answers  # token count -> _answers(token count)
        self.tokens = tokens
        self.parser = httptools.HttpRequestParser(self)
        self.url = b""
        self.body: list[bytes] = []

    def connection_made(self, transport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            self.transport.close()

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_body(self, body: bytes) -> None:
        self.body.append(body)

    def on_message_complete(self) -> None:
        url, body = self.url, b"".join(self.body)
        self.url, self.body = b"", []
        if url.startswith(b"/v1/chat/completions") or url.startswith(b"/v1/completions"):
            match = _N.search(body)
            n = int(match.group(1)) if match else 1
            stream = b'"stream": true' in body or b'"stream":true' in body
            match = _MAX_TOKENS.search(body)
            tokens = max(1, min(self.tokens, int(match.group(1)))) if match else self.tokens
            answer = self.answers(tokens).get((url.startswith(b"/v1/chat"), stream, n))
            if answer is None:
                answer = _http(b'{"error": {"message": "n not canned"}}', b"application/json").replace(b"200 OK", b"400 Bad Request")
        elif url.startswith(b"/v1/models"):
            answer = _http(json.dumps({"object": "list", "data": [{"id": MODEL, "object": "model"}]}).encode(), b"application/json")
        elif url.startswith(b"/health"):
            answer = _http(b"", b"text/plain")
        else:
            answer = _http(b"{}", b"application/json").replace(b"200 OK", b"404 Not Found")
        self.transport.write(answer)


async def serve(port: int, tokens: int, host: str = "127.0.0.1") -> None:
    # Built on first use per length: a shorter max_tokens is rare, and --tokens is built at once.
    answers = functools.lru_cache(maxsize=None)(_answers)
    answers(tokens)
    server = await asyncio.get_running_loop().create_server(lambda: _Connection(answers, tokens), host, port, backlog=1024)
    async with server:
        await server.serve_forever()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--tokens", type=int, default=16, help="tokens in every answer")
    args = parser.parse_args()
    import uvloop

    uvloop.run(serve(args.port, args.tokens))


if __name__ == "__main__":
    main()
