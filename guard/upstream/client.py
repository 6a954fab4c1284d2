"""Async client for vLLM's OpenAI-compatible API, over one or more servers.

One pooled httpx client; endpoints are health-checked in the background and
requests go to the healthy endpoint with the fewest requests in flight.
Timeouts come from the caller (the gRPC deadline); cancelling the awaiting
task closes the HTTP request, and vLLM aborts the generation when its client
goes away.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Sequence
from dataclasses import dataclass
from typing import Any, Literal, overload

import httpx

from guard import metrics
from guard.types import Choice, Completion, Message, Sampling, StreamDelta

log = logging.getLogger(__name__)


class UpstreamError(Exception):
    """The upstream answered, but not with a usable response."""


class UpstreamUnavailable(UpstreamError):
    """No upstream endpoint could be reached."""


class UpstreamTimeout(UpstreamError):
    """The request's deadline passed while waiting for the upstream."""


class UpstreamRejected(UpstreamError):
    """The upstream refused the request itself (HTTP 4xx), e.g. a prompt longer than the model's context."""


@dataclass
class Endpoint:
    url: str
    healthy: bool = True
    in_flight: int = 0
    consecutive_failures: int = 0


class _Attempts:
    """Endpoints to try for one request, best first, each at most once, within the request's deadline."""

    def __init__(self, client: UpstreamClient, timeout: float | None) -> None:
        self._client = client
        self._deadline = None if timeout is None else time.monotonic() + timeout
        self.tried: set[str] = set()
        self.last_error: Exception | None = None

    def __iter__(self):
        while (endpoint := self._client._pick(self.tried)) is not None:
            self.tried.add(endpoint.url)
            remaining = None if self._deadline is None else self._deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                raise UpstreamTimeout("deadline exceeded before the upstream answered")
            yield endpoint, remaining

    def remaining(self) -> float | None:
        return None if self._deadline is None else max(0.0, self._deadline - time.monotonic())

    def exhausted(self) -> UpstreamUnavailable:
        return UpstreamUnavailable(f"no upstream reachable (tried {', '.join(sorted(self.tried))}): {self.last_error}")


def _sampling_body(sampling: Sampling) -> dict[str, Any]:
    body: dict[str, Any] = {"n": sampling.n}
    if sampling.max_tokens is not None:
        body["max_tokens"] = sampling.max_tokens
    if sampling.temperature is not None:
        body["temperature"] = sampling.temperature
    if sampling.top_p is not None:
        body["top_p"] = sampling.top_p
    if sampling.seed is not None:
        body["seed"] = sampling.seed
    if sampling.stop:
        body["stop"] = list(sampling.stop)
    return body


def _messages_body(messages: Sequence[Message]) -> list[dict[str, str]]:
    return [{"role": m.role, "content": m.content} for m in messages]


class UpstreamClient:
    def __init__(
        self,
        urls: Sequence[str],
        *,
        api_key: str | None = None,
        max_connections: int = 256,
        connect_timeout: float = 5.0,
        health_interval: float = 5.0,
        default_timeout: float = 600.0,
    ) -> None:
        if not urls:
            raise ValueError("at least one upstream URL is required")
        self.endpoints = [Endpoint(url.rstrip("/")) for url in urls]
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._http = httpx.AsyncClient(
            headers=headers,
            limits=httpx.Limits(max_connections=max_connections, max_keepalive_connections=max_connections),
            timeout=httpx.Timeout(default_timeout, connect=connect_timeout),
        )
        self._connect_timeout = connect_timeout
        self._health_interval = health_interval
        self._default_timeout = default_timeout
        self._health_task: asyncio.Task | None = None

    async def start(self) -> None:
        await self.check_health()
        self._health_task = asyncio.create_task(self._health_loop(), name="upstream-health")

    async def close(self) -> None:
        if self._health_task is not None:
            self._health_task.cancel()
            try:
                await self._health_task
            except asyncio.CancelledError:
                pass
            self._health_task = None
        await self._http.aclose()

    # -- endpoint selection -------------------------------------------------

    async def check_health(self) -> None:
        await asyncio.gather(*(self._probe(ep) for ep in self.endpoints))

    async def _probe(self, endpoint: Endpoint) -> None:
        try:
            response = await self._http.get(f"{endpoint.url}/health", timeout=self._connect_timeout)
            healthy = response.status_code == 200
        except httpx.HTTPError:
            healthy = False
        if healthy != endpoint.healthy:
            log.warning("upstream %s is now %s", endpoint.url, "healthy" if healthy else "unhealthy")
        endpoint.healthy = healthy
        if healthy:
            endpoint.consecutive_failures = 0
        metrics.UPSTREAM_HEALTHY.labels(endpoint=endpoint.url).set(1 if healthy else 0)

    async def _health_loop(self) -> None:
        while True:
            await asyncio.sleep(self._health_interval)
            await self.check_health()

    def _pick(self, exclude: set[str]) -> Endpoint | None:
        candidates = [ep for ep in self.endpoints if ep.url not in exclude]
        healthy = [ep for ep in candidates if ep.healthy]
        # All marked unhealthy may just mean the last probe raced a restart: try anyway.
        pool = healthy or candidates
        return min(pool, key=lambda ep: ep.in_flight) if pool else None

    @property
    def any_healthy(self) -> bool:
        return any(ep.healthy for ep in self.endpoints)

    # -- requests ------------------------------------------------------------

    def _timeout(self, timeout: float | None) -> httpx.Timeout:
        total = self._default_timeout if timeout is None else max(timeout, 0.001)
        return httpx.Timeout(total, connect=min(self._connect_timeout, total))

    async def _post_json(self, path: str, body: dict[str, Any], timeout: float | None) -> tuple[dict[str, Any], str]:
        """POST to the best endpoint; on a connection failure try the next one."""
        attempts = _Attempts(self, timeout)
        for endpoint, remaining in attempts:
            endpoint.in_flight += 1
            started = time.perf_counter()
            try:
                response = await self._http.post(f"{endpoint.url}{path}", json=body, timeout=self._timeout(remaining))
            except httpx.TimeoutException as exc:
                if isinstance(exc, httpx.ConnectTimeout):
                    self._mark_failed(endpoint)
                    attempts.last_error = exc
                    continue
                raise UpstreamTimeout(f"upstream {endpoint.url} did not answer in time") from exc
            except httpx.TransportError as exc:
                # Refused / reset before a response: safe to retry elsewhere, nothing was generated for us.
                self._mark_failed(endpoint)
                attempts.last_error = exc
                continue
            finally:
                endpoint.in_flight -= 1
                metrics.UPSTREAM_REQUEST_SECONDS.labels(endpoint=endpoint.url, path=path).observe(
                    time.perf_counter() - started
                )
            return self._decode(response, endpoint.url), endpoint.url
        raise attempts.exhausted()

    def _mark_failed(self, endpoint: Endpoint) -> None:
        endpoint.consecutive_failures += 1
        endpoint.healthy = False
        metrics.UPSTREAM_ERRORS.labels(endpoint=endpoint.url, kind="connect").inc()
        metrics.UPSTREAM_HEALTHY.labels(endpoint=endpoint.url).set(0)

    @staticmethod
    def _decode(response: httpx.Response, url: str) -> dict[str, Any]:
        if response.status_code != 200:
            metrics.UPSTREAM_ERRORS.labels(endpoint=url, kind=f"http_{response.status_code // 100}xx").inc()
            error = UpstreamRejected if 400 <= response.status_code < 500 else UpstreamError
            raise error(f"upstream {url} returned HTTP {response.status_code}: {_error_message(response)}")
        try:
            payload = response.json()
        except ValueError as exc:
            metrics.UPSTREAM_ERRORS.labels(endpoint=url, kind="invalid_response").inc()
            raise UpstreamError(f"upstream {url} returned a body that is not JSON: {response.text[:200]!r}") from exc
        if not isinstance(payload, dict):
            metrics.UPSTREAM_ERRORS.labels(endpoint=url, kind="invalid_response").inc()
            raise UpstreamError(f"upstream {url} returned JSON that is not an object")
        return payload

    @overload
    def generate(
        self,
        model: str,
        *,
        prompt: str | None = None,
        messages: Sequence[Message] | None = None,
        sampling: Sampling,
        stream: Literal[False],
        timeout: float | None = None,
        continue_final_message: bool = False,
    ) -> Awaitable[Completion]: ...

    @overload
    def generate(
        self,
        model: str,
        *,
        prompt: str | None = None,
        messages: Sequence[Message] | None = None,
        sampling: Sampling,
        stream: Literal[True],
        timeout: float | None = None,
        continue_final_message: bool = False,
    ) -> AsyncIterator[StreamDelta]: ...

    def generate(
        self,
        model: str,
        *,
        prompt: str | None = None,
        messages: Sequence[Message] | None = None,
        sampling: Sampling,
        stream: bool,
        timeout: float | None = None,
        continue_final_message: bool = False,
    ) -> Awaitable[Completion] | AsyncIterator[StreamDelta]:
        """Generate from chat `messages` (/v1/chat/completions) or a raw `prompt` (/v1/completions).

        stream=False: awaitable, the whole Completion (all `sampling.n` choices).
        stream=True: an async iterator of StreamDelta as vLLM generates; closing it early
        (`aclose()`) closes the HTTP request, and vLLM aborts the generation.
        `continue_final_message`: the last message is an unfinished assistant turn to extend
        (vLLM extension; a raw prompt is always continued).
        """
        if (prompt is None) == (messages is None):
            raise ValueError("generate() takes exactly one of prompt and messages")
        chat = messages is not None
        body: dict[str, Any] = {"model": model, **_sampling_body(sampling)}
        if messages is not None:
            body["messages"] = _messages_body(messages)
            if continue_final_message:
                body["continue_final_message"] = True
                body["add_generation_prompt"] = False
            if sampling.logprobs is not None:
                body["logprobs"] = True
                body["top_logprobs"] = sampling.logprobs
        else:
            body["prompt"] = prompt
            if sampling.logprobs is not None:
                body["logprobs"] = sampling.logprobs
        path = "/v1/chat/completions" if chat else "/v1/completions"
        if not stream:
            return self._generate_unary(path, body, timeout, chat=chat)
        body["stream"] = True
        # Usage on every event (vLLM extension), so a stream closed early still knows its token counts.
        body["stream_options"] = {"include_usage": True, "continuous_usage_stats": True}
        return self._generate_stream(path, body, timeout, chat=chat)

    async def _generate_unary(self, path: str, body: dict[str, Any], timeout: float | None, *, chat: bool) -> Completion:
        payload, url = await self._post_json(path, body, timeout)
        return _parse_completion(payload, url, chat=chat)

    async def _generate_stream(
        self, path: str, body: dict[str, Any], timeout: float | None, *, chat: bool
    ) -> AsyncIterator[StreamDelta]:
        """Server-sent events as deltas.

        Connection failures before the first byte fail over to another endpoint;
        once text has flowed, an error is raised to the caller.
        """
        attempts = _Attempts(self, timeout)
        for endpoint, remaining in attempts:
            request = self._http.build_request("POST", f"{endpoint.url}{path}", json=body, timeout=self._timeout(remaining))
            endpoint.in_flight += 1
            started = time.perf_counter()
            try:
                try:
                    response = await self._http.send(request, stream=True)
                except (httpx.ConnectError, httpx.ConnectTimeout, httpx.RemoteProtocolError) as exc:
                    self._mark_failed(endpoint)
                    attempts.last_error = exc
                    continue
                except httpx.TimeoutException as exc:
                    raise UpstreamTimeout(f"upstream {endpoint.url} did not answer in time") from exc
                try:
                    if response.status_code != 200:
                        await response.aread()
                        self._decode(response, endpoint.url)
                    events = _parse_sse(response, endpoint.url, chat=chat)
                    while True:
                        # httpx's timeout bounds each read, not the whole stream: the deadline does.
                        try:
                            async with asyncio.timeout(attempts.remaining()):
                                delta = await anext(events)
                        except StopAsyncIteration:
                            break
                        except TimeoutError as exc:
                            raise UpstreamTimeout(f"upstream {endpoint.url} did not finish before the deadline") from exc
                        yield delta
                except httpx.TimeoutException as exc:
                    raise UpstreamTimeout(f"upstream {endpoint.url} stopped answering in time") from exc
                except httpx.TransportError as exc:
                    metrics.UPSTREAM_ERRORS.labels(endpoint=endpoint.url, kind="stream_broken").inc()
                    raise UpstreamError(f"upstream {endpoint.url} dropped the stream: {exc}") from exc
                finally:
                    # Closing mid-stream (client cancelled, or a filter blocked) drops the connection;
                    # vLLM then aborts the request.
                    await response.aclose()
                    metrics.UPSTREAM_REQUEST_SECONDS.labels(endpoint=endpoint.url, path=path).observe(
                        time.perf_counter() - started
                    )
                return
            finally:
                endpoint.in_flight -= 1
        raise attempts.exhausted()

    async def models(self) -> list[str]:
        endpoint = self._pick(set())
        assert endpoint is not None
        try:
            response = await self._http.get(f"{endpoint.url}/v1/models", timeout=self._connect_timeout)
        except httpx.HTTPError as exc:
            raise UpstreamUnavailable(f"upstream {endpoint.url} unreachable: {exc}") from exc
        payload = self._decode(response, endpoint.url)
        return [str(item.get("id")) for item in payload.get("data", [])]


def _error_message(response: httpx.Response) -> str:
    """vLLM puts the useful part in {"error": {"message": ...}} (older: {"message": ...})."""
    try:
        payload = response.json()
        error = payload.get("error", payload)
        return str(error.get("message", error) if isinstance(error, dict) else error)[:500]
    except ValueError:
        return response.text[:500]


def _parse_completion(payload: dict[str, Any], url: str, *, chat: bool) -> Completion:
    """Lenient: vLLM adds fields beyond OpenAI's; only what guard needs is required."""
    try:
        choices = []
        for raw in payload["choices"]:
            if chat:
                text = (raw.get("message") or {}).get("content") or ""
                lp = raw.get("logprobs") or {}
                token_logprobs = tuple(t["logprob"] for t in lp.get("content") or []) or None
                # [{token, logprob, bytes}, ...] per position
                top_logprobs = tuple(
                    {str(alt["token"]): float(alt["logprob"]) for alt in t.get("top_logprobs") or []}
                    for t in lp.get("content") or []
                ) or None
            else:
                text = raw.get("text") or ""
                lp = raw.get("logprobs") or {}
                token_logprobs = tuple(x for x in (lp.get("token_logprobs") or []) if x is not None) or None
                # {token: logprob} per position (None where the server has none, e.g. an echoed first token)
                top_logprobs = tuple(
                    {str(token): float(logprob) for token, logprob in (alts or {}).items()}
                    for alts in lp.get("top_logprobs") or []
                ) or None
            choices.append(
                Choice(
                    index=int(raw.get("index", len(choices))),
                    text=str(text),
                    finish_reason=raw.get("finish_reason"),
                    token_logprobs=token_logprobs,
                    top_logprobs=top_logprobs,
                )
            )
        usage = payload.get("usage") or {}
        choices.sort(key=lambda c: c.index)
        return Completion(
            choices=tuple(choices),
            prompt_tokens=int(usage.get("prompt_tokens") or 0),
            completion_tokens=int(usage.get("completion_tokens") or 0),
            model=str(payload.get("model", "")),
            upstream_url=url,
        )
    except (KeyError, TypeError, ValueError) as exc:
        metrics.UPSTREAM_ERRORS.labels(endpoint=url, kind="invalid_response").inc()
        raise UpstreamError(f"upstream {url} returned an unexpected completion shape: {exc!r}") from exc


async def _parse_sse(response: httpx.Response, url: str, *, chat: bool) -> AsyncIterator[StreamDelta]:
    content_type = response.headers.get("content-type", "")
    if not content_type.startswith("text/event-stream"):
        metrics.UPSTREAM_ERRORS.labels(endpoint=url, kind="invalid_response").inc()
        raise UpstreamError(f"upstream {url} answered a stream request with {content_type or 'no content type'}, not events")
    async for line in response.aiter_lines():
        if not line.startswith("data:"):
            continue
        data = line[5:].strip()
        if data == "[DONE]":
            return
        try:
            event = json.loads(data)
        except ValueError as exc:
            metrics.UPSTREAM_ERRORS.labels(endpoint=url, kind="invalid_response").inc()
            raise UpstreamError(f"upstream {url} sent an event that is not JSON: {data[:200]!r}") from exc
        usage = event.get("usage") or {}
        # Token counts (with continuous usage: on every event) count the event's text too, so they come first.
        if usage:
            yield StreamDelta(
                index=0,
                text="",
                prompt_tokens=int(usage.get("prompt_tokens") or 0),
                completion_tokens=int(usage.get("completion_tokens") or 0),
                upstream_url=url,
            )
        for raw in event.get("choices") or []:
            text = ((raw.get("delta") or {}).get("content") or "") if chat else (raw.get("text") or "")
            yield StreamDelta(index=int(raw.get("index", 0)), text=text, finish_reason=raw.get("finish_reason"))
    # vLLM ends every stream with [DONE]; without it the answer may be cut short.
    metrics.UPSTREAM_ERRORS.labels(endpoint=url, kind="stream_broken").inc()
    raise UpstreamError(f"upstream {url} ended the stream without [DONE]")
