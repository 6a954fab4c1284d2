"""Server-sent events from the upstream: split anywhere by the network, coalesced per read."""

from __future__ import annotations

import asyncio
import json

import pytest

from guard.types import Sampling
from guard.upstream.client import UpstreamClient, UpstreamError, _EventState

WORDS = ["Grüße ", "aus ", "der ", "Küche", "!"]


def event(i: int, text: str, finish: str | None = None) -> bytes:
    body = {"choices": [{"index": 0, "delta": {"content": text}, "finish_reason": finish}], "usage": {"prompt_tokens": 3, "completion_tokens": i + 1}}
    return b"data: " + json.dumps(body).encode() + b"\n\n"


BODY = b"".join(event(i, w, "stop" if i == len(WORDS) - 1 else None) for i, w in enumerate(WORDS)) + b"data: [DONE]\n\n"


def test_events_read_together_become_one_delta_after_their_latest_token_counts():
    state = _EventState("http://u", chat=True)
    deltas = state.read(BODY.split(b"\n"))
    assert [(d.text, d.completion_tokens) for d in deltas] == [("", len(WORDS)), ("".join(WORDS), None)]
    assert deltas[1].finish_reason == "stop" and state.done


def test_a_choice_change_or_a_finish_starts_a_new_delta():
    lines = [
        b'data: {"choices": [{"index": 0, "delta": {"content": "a"}, "finish_reason": "length"}]}',
        b'data: {"choices": [{"index": 0, "delta": {"content": "b"}}]}',
        b'data: {"choices": [{"index": 1, "delta": {"content": "c"}}]}',
        b'data: {"choices": [{"index": 1, "delta": {"content": "d"}}]}',
    ]
    deltas = _EventState("http://u", chat=True).read(lines)
    assert [(d.index, d.text, d.finish_reason) for d in deltas] == [(0, "a", "length"), (0, "b", None), (1, "cd", None)]


@pytest.mark.parametrize("split_every", [1, 7, 50, len(BODY)])
async def test_a_stream_split_anywhere_by_the_network_arrives_whole(split_every):
    """Writes of `split_every` bytes cut lines and UTF-8 characters apart; the text still arrives intact."""

    async def handle(reader, writer):
        head = await reader.readuntil(b"\r\n\r\n")
        length = next(int(line.split(b":")[1]) for line in head.split(b"\r\n") if line.lower().startswith(b"content-length"))
        await reader.readexactly(length)
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ncontent-length: %d\r\n\r\n" % len(BODY))
        for start in range(0, len(BODY), split_every):
            writer.write(BODY[start : start + split_every])
            await writer.drain()
            await asyncio.sleep(0.001)
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    client = UpstreamClient([f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"])
    try:
        deltas = [d async for d in client.generate("m", messages=[], sampling=Sampling(max_tokens=5), stream=True, timeout=10)]
    finally:
        await client.close()
        server.close()
    assert "".join(d.text for d in deltas) == "".join(WORDS)
    assert [d.completion_tokens for d in deltas if d.completion_tokens is not None][-1] == len(WORDS)
    assert [d.finish_reason for d in deltas if d.finish_reason] == ["stop"]


def test_done_before_any_choice_is_an_error():
    with pytest.raises(UpstreamError, match="without any choice"):
        _EventState("http://u", chat=True).read([b"data: [DONE]"])
