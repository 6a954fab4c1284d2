"""Async client for vLLM's OpenAI-compatible API, over one or more servers.

One pooled aiohttp session (measured: a third of httpx's CPU per request, see
benchmarks/proxy_cost.py); endpoints are health-checked in the background and
requests go to the healthy endpoint with the fewest requests in flight. An
endpoint that keeps failing (connection errors, HTTP 5xx, broken streams,
timeouts before its first byte) is ejected for a while (resilience.Breaker).
A failure before anything reached the caller is retried, on another endpoint
when there is one, within the request's deadline and a client-wide retry
budget. Timeouts come from the caller (the gRPC deadline); cancelling the
awaiting task closes the HTTP request, and vLLM aborts the generation when its
client goes away.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from email.utils import parsedate_to_datetime
from typing import Any, Literal, Protocol, overload

import aiohttp
import orjson

from guard.errors import ResourceExhausted
from guard.types import Choice, Completion, Message, Sampling, StreamDelta
from guard.upstream.resilience import Breaker, RetryBudget

log = logging.getLogger(__name__)


class UpstreamError(Exception):
    """The upstream answered, but not with a usable response."""

    kind = "error"  # what UpstreamObserver.failed reports


class UpstreamUnavailable(UpstreamError):
    """No upstream endpoint could be reached."""

    kind = "connect"


class UpstreamTimeout(UpstreamError):
    """The request's deadline passed while waiting for the upstream."""

    kind = "timeout"


class UpstreamRejected(UpstreamError):
    """The upstream refused the request itself (HTTP 4xx), e.g. a prompt longer than the model's context."""

    kind = "http_4xx"


class UpstreamMisconfigured(UpstreamError):
    """The upstream refused guard's own setup (its credentials, its model name): the operator must act, not the client."""

    kind = "http_4xx"


class UpstreamRateLimited(UpstreamError, ResourceExhausted):
    """The upstream answered HTTP 429; `retry_after` seconds is its hint (1 s when it gave none)."""

    kind = "http_4xx"


class UpstreamServerError(UpstreamError):
    """The upstream answered HTTP 5xx."""

    kind = "http_5xx"


class UpstreamInvalidResponse(UpstreamError):
    """The upstream's answer is not what vLLM sends: not JSON, no choices, an unknown finish reason."""

    kind = "invalid_response"


class UpstreamStreamBroken(UpstreamError):
    """The upstream's stream broke off: the connection dropped, or it ended without [DONE]."""

    kind = "stream_broken"


class AdapterLoadError(UpstreamError):
    """vLLM did not load a LoRA adapter; `route_missing`: it does not allow loading adapters at run time."""

    def __init__(self, message: str, *, route_missing: bool = False) -> None:
        super().__init__(message)
        self.route_missing = route_missing


@dataclass(frozen=True)
class ServedModel:
    """One entry of vLLM's /v1/models: a base model (`parent` None), or a LoRA adapter on `parent` loaded from `root`."""

    id: str
    parent: str | None = None
    root: str | None = None


class UpstreamObserver(Protocol):
    """Where the client reports what metrics need; guard.metrics.UpstreamMetrics records them."""

    def requested(self, endpoint: str, path: str, seconds: float) -> None:
        """One attempt on `endpoint` ended after `seconds` (a stream: when it ended or was closed)."""

    def failed(self, endpoint: str, kind: str) -> None:
        """One attempt failed; `kind` is the UpstreamError's."""

    def retried(self, outcome: str) -> None:
        """A retry was made ("retried") or refused by the retry budget ("budget_exhausted")."""

    def ejected(self, endpoint: str) -> None:
        """The endpoint was ejected after consecutive failures."""

    def usable(self, endpoint: str, usable: bool) -> None:
        """Whether requests go to the endpoint now (healthy and not ejected)."""


class NullUpstreamObserver:
    def requested(self, endpoint: str, path: str, seconds: float) -> None:
        pass

    def failed(self, endpoint: str, kind: str) -> None:
        pass

    def retried(self, outcome: str) -> None:
        pass

    def ejected(self, endpoint: str) -> None:
        pass

    def usable(self, endpoint: str, usable: bool) -> None:
        pass


# Failures of the request or of the caller's deadline, not of the endpoint: another try cannot help.
_FINAL = (UpstreamRejected, UpstreamMisconfigured, UpstreamRateLimited, UpstreamTimeout)


@dataclass
class Endpoint:
    url: str
    breaker: Breaker = field(default_factory=Breaker)
    healthy: bool = True  # its last /health probe passed, and no connection to it failed since
    in_flight: int = 0


class _Attempts:
    """The tries of one request: the best endpoint first, then retries while the deadline,
    `max_attempts` and the client's retry budget allow; an endpoint not yet tried goes at once,
    a repeated one after a jittered backoff."""

    def __init__(self, client: UpstreamClient, timeout: float | None) -> None:
        self._client = client
        self._deadline = None if timeout is None else time.monotonic() + timeout
        self.tried: list[str] = []
        self.last_error: UpstreamError | None = None
        client._budget.requested()

    async def next(self) -> tuple[Endpoint, float | None]:
        """The endpoint to try now and the time left; raises the request's failure when no try is left."""
        client = self._client
        endpoint = client._pick(set(self.tried))
        if self.tried:
            if len(self.tried) >= client._max_attempts:
                raise self.failure()
            delay = client._retry_delay(len(self.tried)) if endpoint.url in self.tried else 0.0
            remaining = self.remaining()
            if remaining is not None and delay >= remaining:
                raise self.failure()
            if not client._budget.try_retry():
                client.observer.retried("budget_exhausted")
                raise self.failure("retry budget exhausted")
            client.observer.retried("retried")
            if delay:
                await asyncio.sleep(delay)
                endpoint = client._pick(set(self.tried))
            log.debug("retrying on %s after: %s", endpoint.url, self.last_error)
        remaining = self.remaining()
        if remaining is not None and remaining <= 0:
            raise UpstreamTimeout("deadline exceeded before the upstream answered")
        self.tried.append(endpoint.url)
        return endpoint, remaining

    def remaining(self) -> float | None:
        return None if self._deadline is None else max(0.0, self._deadline - time.monotonic())

    def failure(self, why: str = "") -> UpstreamError:
        error = self.last_error
        assert error is not None
        note = f" (not retried: {why})" if why else ""
        if isinstance(error, UpstreamUnavailable):
            tried = ", ".join(dict.fromkeys(self.tried))
            return UpstreamUnavailable(f"no upstream reachable (tried {tried}): {error}{note}")
        if not note:
            return error
        noted = type(error)(f"{error}{note}")
        noted.__cause__ = error
        return noted


class _Attempt:
    """One try on one endpoint: counts it in flight, times it, and gives the endpoint's breaker one verdict."""

    def __init__(self, client: UpstreamClient, endpoint: Endpoint, path: str) -> None:
        self._client = client
        self.endpoint = endpoint
        self._path = path
        self.received = False  # the endpoint's answer began (a stream's first event)
        self._judged = False

    def __enter__(self) -> _Attempt:
        self._trial = self.endpoint.breaker.sent()
        self.endpoint.in_flight += 1
        self._started = time.perf_counter()
        return self

    def judge(self, error: UpstreamError) -> UpstreamError:
        self._judged = True
        self._client.observer.failed(self.endpoint.url, error.kind)
        if isinstance(error, (UpstreamRejected, UpstreamMisconfigured)):
            self._client._succeeded(self.endpoint)  # it answered: alive, whatever it thought of the request
        elif isinstance(error, UpstreamRateLimited) or (isinstance(error, UpstreamTimeout) and self.received):
            self.endpoint.breaker.released(self._trial)  # busy, or the deadline was short: no verdict
        else:
            self._client._failed(self.endpoint, error, trial=self._trial)
        return error

    def __exit__(self, exc_type, exc, tb) -> None:
        self.endpoint.in_flight -= 1
        self._client.observer.requested(self.endpoint.url, self._path, time.perf_counter() - self._started)
        if self._judged:
            return
        if exc is None or self.received:
            self._client._succeeded(self.endpoint)  # done, or a flowing stream its caller closed
        else:
            self.endpoint.breaker.released(self._trial)  # the caller went away before an answer


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
        breaker: Callable[[], Breaker] = Breaker,
        retry_budget: RetryBudget | None = None,
        max_attempts: int = 3,
        retry_backoff: tuple[float, float] = (0.05, 1.0),
        observer: UpstreamObserver | None = None,
    ) -> None:
        """`breaker` makes each endpoint's Breaker; `max_attempts` counts the first try; a retry
        on an endpoint already tried waits a random time up to base·2^(retry-1), capped
        (`retry_backoff` = (base, cap) seconds)."""
        if not urls:
            raise ValueError("at least one upstream URL is required")
        self.endpoints = [Endpoint(url.rstrip("/"), breaker()) for url in urls]
        self.observer: UpstreamObserver = observer or NullUpstreamObserver()
        self._headers = {"Content-Type": "application/json"}
        if api_key:
            self._headers["Authorization"] = f"Bearer {api_key}"
        self._max_connections = max_connections
        self._session: aiohttp.ClientSession | None = None  # made on first use, inside the event loop
        self._connect_timeout = connect_timeout
        self._health_interval = health_interval
        self._default_timeout = default_timeout
        self._budget = retry_budget or RetryBudget()
        self._max_attempts = max_attempts
        self._retry_backoff = retry_backoff
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
        if self._session is not None:
            await self._session.close()
            self._session = None

    @property
    def _http(self) -> aiohttp.ClientSession:
        if self._session is None:
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=self._max_connections, limit_per_host=0),
                headers=self._headers,
                # vLLM neither compresses nor sets cookies: skip the work of expecting either.
                cookie_jar=aiohttp.DummyCookieJar(),
                auto_decompress=False,
                skip_auto_headers=("Accept-Encoding", "User-Agent"),
            )
        return self._session

    # -- endpoint selection -------------------------------------------------

    async def check_health(self) -> None:
        await asyncio.gather(*(self._probe(ep) for ep in self.endpoints))

    async def _probe(self, endpoint: Endpoint) -> None:
        try:
            async with self._http.get(f"{endpoint.url}/health", timeout=aiohttp.ClientTimeout(total=self._connect_timeout)) as response:
                await response.read()
                healthy = response.status == 200
        except (aiohttp.ClientError, TimeoutError):
            healthy = False
        if healthy != endpoint.healthy:
            log.warning("upstream %s is now %s", endpoint.url, "healthy" if healthy else "unhealthy")
        endpoint.healthy = healthy
        # After an ejection's backoff the probe can be its trial.
        readmitted = endpoint.breaker.probed(healthy)
        if readmitted:
            log.warning("upstream %s passed /health after its ejection: back, on probation", endpoint.url)
        elif readmitted is False:
            self._ejected(endpoint, "it failed /health after its ejection")
        self._publish(endpoint)

    async def _health_loop(self) -> None:
        while True:
            await asyncio.sleep(self._health_interval)
            await self.check_health()

    def _pick(self, tried: set[str]) -> Endpoint:
        """Never an ejected endpoint while another is available; among the rest, untried first, then
        healthy, then least busy. All ejected: the one whose ejection ends soonest (a request is
        always tried: an ejection is a guess, and the deadline decides when to give up)."""

        def rank(endpoint: Endpoint) -> tuple:
            ejected = endpoint.breaker.ejected
            soonest = endpoint.breaker.ejected_until if ejected else 0.0
            return ejected, endpoint.url in tried, not endpoint.healthy, soonest, endpoint.in_flight

        return min(self.endpoints, key=rank)

    @property
    def any_healthy(self) -> bool:
        return any(ep.healthy for ep in self.endpoints)

    def _retry_delay(self, retry: int) -> float:
        base, cap = self._retry_backoff
        return random.uniform(0.0, min(cap, base * 2 ** (retry - 1)))

    def _succeeded(self, endpoint: Endpoint) -> None:
        if endpoint.breaker.ejected_until is not None:
            log.warning("upstream %s answered its trial request: back", endpoint.url)
        endpoint.breaker.succeeded()
        self._publish(endpoint)

    def _failed(self, endpoint: Endpoint, error: UpstreamError, *, trial: bool = False) -> None:
        # `healthy` stays the /health probe's verdict (what readiness reports); one dropped connection
        # must not flip guard to NOT_SERVING. The breaker decides whether requests go there.
        if endpoint.breaker.failed(trial):
            self._ejected(endpoint, f"{endpoint.breaker.failures} consecutive failures, the last: {error}")
        self._publish(endpoint)

    def _ejected(self, endpoint: Endpoint, why: str) -> None:
        log.warning("upstream %s ejected for %.1f s after %s", endpoint.url, endpoint.breaker.ejection_seconds, why)
        self.observer.ejected(endpoint.url)

    def _publish(self, endpoint: Endpoint) -> None:
        # Not usable while ejected or awaiting its trial, too (guard sends it nothing then).
        self.observer.usable(endpoint.url, endpoint.healthy and endpoint.breaker.ejected_until is None)

    # -- requests ------------------------------------------------------------

    def _timeout(self, timeout: float | None) -> aiohttp.ClientTimeout:
        """The deadline bounds the whole exchange, a stream included; without one, each read waits at most
        `default_timeout` (a generation may take that long between tokens only if something is wrong)."""
        if timeout is None:
            return aiohttp.ClientTimeout(connect=self._connect_timeout, sock_read=self._default_timeout)
        total = max(timeout, 0.001)
        return aiohttp.ClientTimeout(total=total, connect=min(self._connect_timeout, total))

    async def _post(
        self,
        path: str,
        body: dict[str, Any],
        headers: dict[str, str] | None,
        timeout: float | None,
        parse: Callable[[dict[str, Any], str], Completion],
    ) -> Completion:
        """POST to the best endpoint and parse its JSON answer; failures of the endpoint are retried."""
        attempts = _Attempts(self, timeout)
        payload = orjson.dumps(body)
        while True:
            endpoint, remaining = await attempts.next()
            url = endpoint.url
            with _Attempt(self, endpoint, path) as attempt:
                try:
                    async with self._http.post(f"{url}{path}", data=payload, headers=headers, timeout=self._timeout(remaining)) as response:
                        raw = await response.read()
                    return parse(self._decode(response.status, response.headers, raw, url, path, body.get("model")), url)
                except (aiohttp.ClientError, TimeoutError) as exc:
                    error = _transport_error(exc, url)
                    if isinstance(error, UpstreamTimeout):
                        raise attempt.judge(error) from exc
                except UpstreamError as exc:
                    error = exc
                attempt.judge(error)
            if isinstance(error, _FINAL):
                raise error
            attempts.last_error = error

    @staticmethod
    def _decode(
        status: int, headers: Mapping[str, str], raw: bytes, url: str, path: str, model: str | None = None
    ) -> dict[str, Any]:
        if status != 200:
            reason = f"HTTP {status}: {_error_message(raw)}"
            if status in (401, 403):
                raise UpstreamMisconfigured(
                    f"upstream {url} refused guard's upstream credentials ({reason}); guard's operator must fix its API key"
                )
            if status == 404:
                what = f"model {model!r}" if model else path
                raise UpstreamMisconfigured(f"upstream {url} does not serve {what} ({reason})")
            if status == 429:
                wait = _retry_after(headers)
                raise UpstreamRateLimited(f"upstream {url} is rate limiting ({reason}); retry after {wait:g} s", retry_after=wait)
            if 400 <= status < 500:
                raise UpstreamRejected(f"upstream {url} returned {reason}")
            raise UpstreamServerError(f"upstream {url} returned {reason}")
        try:
            payload = orjson.loads(raw)
        except ValueError as exc:
            raise UpstreamInvalidResponse(f"upstream {url} returned a body that is not JSON: {raw[:200]!r}") from exc
        if not isinstance(payload, dict):
            raise UpstreamInvalidResponse(f"upstream {url} returned JSON that is not an object")
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
        request_id: str | None = None,
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
        request_id: str | None = None,
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
        request_id: str | None = None,
    ) -> Awaitable[Completion] | AsyncIterator[StreamDelta]:
        """Generate from chat `messages` (/v1/chat/completions) or a raw `prompt` (/v1/completions).

        stream=False: awaitable, the whole Completion (all `sampling.n` choices).
        stream=True: an async iterator of StreamDelta as vLLM generates; closing it early
        (`aclose()`) closes the HTTP request, and vLLM aborts the generation.
        `continue_final_message`: the last message is an unfinished assistant turn to extend
        (vLLM extension; a raw prompt is always continued).
        `request_id` goes to vLLM as X-Request-Id (its logs and request id; it adds a suffix of its own).
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
        headers = {"X-Request-Id": request_id} if request_id else None
        if not stream:
            return self._generate_unary(path, body, headers, timeout, chat=chat)
        body["stream"] = True
        # Usage on every event (vLLM extension), so a stream closed early still knows its token counts.
        body["stream_options"] = {"include_usage": True, "continuous_usage_stats": True}
        return self._generate_stream(path, body, headers, timeout, chat=chat)

    async def _generate_unary(
        self, path: str, body: dict[str, Any], headers: dict[str, str] | None, timeout: float | None, *, chat: bool
    ) -> Completion:
        return await self._post(path, body, headers, timeout, lambda payload, url: _parse_completion(payload, url, chat=chat))

    async def _generate_stream(
        self, path: str, body: dict[str, Any], headers: dict[str, str] | None, timeout: float | None, *, chat: bool
    ) -> AsyncIterator[StreamDelta]:
        """Server-sent events as deltas.

        A failure before any text was yielded is retried like a unary request's (token counts
        may repeat: the caller keeps the latest); once text has flowed, it is raised.
        """
        attempts = _Attempts(self, timeout)
        payload = orjson.dumps(body)
        while True:
            endpoint, remaining = await attempts.next()
            texted = False
            with _Attempt(self, endpoint, path) as attempt:
                try:
                    events = self._events(attempt, path, payload, headers, body.get("model"), remaining, chat=chat)
                    async with contextlib.aclosing(events) as deltas:
                        async for delta in deltas:
                            texted = texted or bool(delta.text)
                            yield delta
                    return
                except UpstreamError as exc:
                    error = attempt.judge(exc)
            if texted or isinstance(error, _FINAL):
                raise error
            attempts.last_error = error

    async def _events(
        self,
        attempt: _Attempt,
        path: str,
        payload: bytes,
        headers: dict[str, str] | None,
        model: str | None,
        remaining: float | None,
        *,
        chat: bool,
    ) -> AsyncIterator[StreamDelta]:
        """One endpoint's stream; every failure is an UpstreamError. The deadline bounds the whole stream."""
        url = attempt.endpoint.url
        try:
            response = await self._http.post(f"{url}{path}", data=payload, headers=headers, timeout=self._timeout(remaining))
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise _transport_error(exc, url) from exc
        try:
            if response.status != 200:
                self._decode(response.status, response.headers, await response.read(), url, path, model)
            async with contextlib.aclosing(_parse_sse(response, url, chat=chat)) as events:
                async for delta in events:
                    attempt.received = True
                    yield delta
        except TimeoutError as exc:
            raise UpstreamTimeout(f"upstream {url} did not finish before the deadline") from exc
        except aiohttp.ClientError as exc:
            raise UpstreamStreamBroken(f"upstream {url} dropped the stream: {str(exc) or repr(exc)}") from exc
        finally:
            # Read to its end, the connection goes back to the pool; closed mid-stream (client cancelled,
            # or a filter blocked), it is dropped, and vLLM aborts the request.
            if response.content.at_eof():
                response.release()
            else:
                response.close()

    async def models(self) -> list[str]:
        """The names one endpoint serves, base models first (the first is guard's default model; LoRA adapters come after)."""
        models = await self.models_at(self._pick(set()).url)
        return [model.id for model in sorted(models, key=lambda model: model.parent is not None)]

    async def models_at(self, url: str) -> list[ServedModel]:
        """What the endpoint at `url` serves (vLLM's /v1/models): base models, and LoRA adapters with their parent."""
        try:
            async with self._http.get(f"{url}/v1/models", timeout=aiohttp.ClientTimeout(total=self._connect_timeout)) as response:
                raw = await response.read()
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise UpstreamUnavailable(f"upstream {url} unreachable: {str(exc) or repr(exc)}") from exc
        payload = self._decode(response.status, response.headers, raw, url, "/v1/models")
        return [
            ServedModel(str(item.get("id")), _optional_str(item.get("parent")), _optional_str(item.get("root")))
            for item in payload.get("data", [])
            if isinstance(item, dict)
        ]

    async def load_lora_adapter(self, url: str, name: str, path: str, timeout: float = 60.0) -> None:
        """Has the endpoint at `url` serve the PEFT adapter directory `path` (a path vLLM can read) as model `name`.

        vLLM offers this only when started with --enable-lora and VLLM_ALLOW_RUNTIME_LORA_UPDATING=True; otherwise
        the route is missing (AdapterLoadError.route_missing). Other failures carry vLLM's reason.
        """
        body = orjson.dumps({"lora_name": name, "lora_path": path})
        try:
            async with self._http.post(f"{url}/v1/load_lora_adapter", data=body, timeout=aiohttp.ClientTimeout(total=timeout)) as response:
                raw = await response.read()
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise UpstreamUnavailable(f"upstream {url} unreachable: {str(exc) or repr(exc)}") from exc
        if response.status != 200:
            # FastAPI's own 404 for a route that is not there; vLLM's errors are {"error": {...}}.
            route_missing = response.status == 404 and _error_message(raw) == str({"detail": "Not Found"})
            raise AdapterLoadError(f"HTTP {response.status}: {_error_message(raw)}", route_missing=route_missing)


def _transport_error(exc: aiohttp.ClientError | TimeoutError, url: str) -> UpstreamError:
    """Before a response: a connection failure (retryable elsewhere), or the deadline."""
    if isinstance(exc, TimeoutError) and not isinstance(exc, aiohttp.ConnectionTimeoutError):
        return UpstreamTimeout(f"upstream {url} did not answer in time")
    return UpstreamUnavailable(str(exc) or repr(exc))


def _retry_after(headers: Mapping[str, str]) -> float:
    """Seconds from retry-after-ms or Retry-After (seconds or an HTTP date); 1 s when absent or unreadable."""
    headers = {name.lower(): value for name, value in headers.items()}
    for header, scale in (("retry-after-ms", 0.001), ("retry-after", 1.0)):
        value = headers.get(header)
        if value is None:
            continue
        try:
            seconds = float(value) * scale
        except ValueError:
            try:
                when = parsedate_to_datetime(value)
            except (TypeError, ValueError):
                continue
            if when.tzinfo is None:
                when = when.replace(tzinfo=timezone.utc)
            seconds = (when - datetime.now(timezone.utc)).total_seconds()
        if math.isfinite(seconds):
            return max(0.0, seconds)
    return 1.0


def _optional_str(value: Any) -> str | None:
    return None if value is None else str(value)


def _error_message(raw: bytes) -> str:
    """vLLM puts the useful part in {"error": {"message": ...}} (older: {"message": ...})."""
    try:
        payload = orjson.loads(raw)
    except ValueError:
        return raw[:500].decode("utf-8", "replace")
    error = payload.get("error", payload) if isinstance(payload, dict) else payload
    return str(error.get("message", error) if isinstance(error, dict) else error)[:500]


# What vLLM reports; anything else is a garbled answer, not something to pass on to clients.
FINISH_REASONS = frozenset({"stop", "length", "abort", "tool_calls", "content_filter", "error"})


def _finish_reason(value: Any, url: str) -> str | None:
    if value is None or value in FINISH_REASONS:
        return value
    raise UpstreamInvalidResponse(f"upstream {url} gave an unknown finish_reason {str(value)[:40]!r}")


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
                    finish_reason=_finish_reason(raw.get("finish_reason"), url),
                    token_logprobs=token_logprobs,
                    top_logprobs=top_logprobs,
                )
            )
        if not choices:
            # The pipeline needs a candidate to choose from; an empty answer would be one, this is not.
            raise UpstreamInvalidResponse(f"upstream {url} returned a completion with no choices")
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
        raise UpstreamInvalidResponse(f"upstream {url} returned an unexpected completion shape: {exc!r}") from exc


# A longer event line than this is not vLLM's: refuse it rather than buffer without bound.
MAX_EVENT_BYTES = 8 * 1024 * 1024


async def _parse_sse(response: aiohttp.ClientResponse, url: str, *, chat: bool) -> AsyncIterator[StreamDelta]:
    """Deltas of vLLM's server-sent events, coalesced per network read.

    Whatever arrived together is passed on together: the latest token counts first (they count the
    read's text too), then one delta per run of text of the same choice. A consumer slower than vLLM
    then handles fewer, larger pieces instead of falling behind one event at a time.
    """
    content_type = response.headers.get("content-type", "")
    if not content_type.startswith("text/event-stream"):
        raise UpstreamInvalidResponse(f"upstream {url} answered a stream request with {content_type or 'no content type'}, not events")
    state = _EventState(url, chat)
    partial = b""
    async for chunk in response.content.iter_any():
        lines = (partial + chunk).split(b"\n") if partial else chunk.split(b"\n")
        partial = lines.pop()  # b"" when the read ended on a line break
        if len(partial) > MAX_EVENT_BYTES:
            raise UpstreamInvalidResponse(f"upstream {url} sent an event longer than {MAX_EVENT_BYTES} bytes")
        for delta in state.read(lines):
            yield delta
    for delta in state.read([partial]):
        yield delta
    if state.done:
        return
    # vLLM ends every stream with [DONE]; without it the answer may be cut short.
    raise UpstreamStreamBroken(f"upstream {url} ended the stream without [DONE]")


class _EventState:
    """What _parse_sse has seen of one stream."""

    def __init__(self, url: str, chat: bool) -> None:
        self.url = url
        self.chat = chat
        self.chosen = False  # some event carried a choice
        self.done = False  # [DONE] was read; the rest of the body is read only to reuse the connection

    def read(self, lines: list[bytes]) -> list[StreamDelta]:
        url = self.url
        usage = None
        pieces: list[StreamDelta] = []
        for line in lines:
            if self.done or not line.startswith(b"data:"):
                continue
            data = line[5:].strip()
            if data == b"[DONE]":
                if not self.chosen:
                    raise UpstreamInvalidResponse(f"upstream {url} ended the stream without any choice")
                self.done = True
                continue
            try:
                event = orjson.loads(data)
            except ValueError as exc:
                raise UpstreamInvalidResponse(f"upstream {url} sent an event that is not JSON: {data[:200]!r}") from exc
            usage = event.get("usage") or usage
            for raw in event.get("choices") or []:
                self.chosen = True
                text = ((raw.get("delta") or {}).get("content") or "") if self.chat else (raw.get("text") or "")
                index = int(raw.get("index", 0))
                finish_reason = _finish_reason(raw.get("finish_reason"), url)
                last = pieces[-1] if pieces else None
                if last is not None and last.index == index and last.finish_reason is None:
                    pieces[-1] = StreamDelta(index=index, text=last.text + text, finish_reason=finish_reason)
                else:
                    pieces.append(StreamDelta(index=index, text=text, finish_reason=finish_reason))
        if usage:
            counts = StreamDelta(
                index=0,
                text="",
                prompt_tokens=int(usage.get("prompt_tokens") or 0),
                completion_tokens=int(usage.get("completion_tokens") or 0),
                upstream_url=url,
            )
            pieces.insert(0, counts)
        return pieces
