"""The OpenAI-compatible HTTP door: /v1/chat/completions, /v1/completions, /v1/models, /health.

A Starlette app on the same process, event loop and GuardService as the gRPC door: the same
admission (keys, tenants, policies, rate limits), the same pipeline, the same metrics. Streaming
is the engine here too: a unary response is the stream, collected.

OpenAI's shapes, with guard's additions under `guard` keys (ignored by OpenAI clients):
- a refusal is a normal completion: finish_reason "content_filter", the refusal text as content
  (and as the chat message's `refusal`), the refusal details under the choice's `guard.refusal`;
- `guard.policy` and `guard.policy_version` on the response (also X-Guard-Policy(-Version) headers);
- the trace under the choice's `guard.trace` when asked for with `X-Guard-Trace: 1` and allowed;
- the sources a retrieve step gave the model under the choice's `guard.sources` (when there are any);
- `POST /v1/feedback`: what a user thought of an answer (the gRPC Feedback RPC's semantics).
Policy: `model` = "guard/<policy>" (or the bare policy name), else the X-Guard-Policy header,
else the key's tenant default, else the server default.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import math
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import anyio
import grpc
import orjson
from pydantic import BaseModel, ValidationError
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse as StarletteJSONResponse
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route

from guard import limits
from guard.errors import Cancelled, Invalid, InvalidArgument, NotFound, ResourceExhausted, status_for
from guard.http.feedback import FeedbackBody
from guard.http.openai_types import (
    POLICY_PREFIX,
    ChatCompletionRequest,
    CompletionRequest,
    field_path,
    finish_reason,
    requested_policy,
)
from guard.pipeline.runner import TextDelta
from guard.service import Admission, GuardService, Observation, trace_of, visible_refusal
from guard.types import GenerateInput, GenerateResult

log = logging.getLogger(__name__)

# gRPC status -> (HTTP status, OpenAI error type).
HTTP_STATUS = {
    grpc.StatusCode.INVALID_ARGUMENT: (400, "invalid_request_error"),
    grpc.StatusCode.UNAUTHENTICATED: (401, "authentication_error"),
    grpc.StatusCode.PERMISSION_DENIED: (403, "permission_error"),
    grpc.StatusCode.NOT_FOUND: (404, "not_found_error"),
    grpc.StatusCode.FAILED_PRECONDITION: (400, "invalid_request_error"),  # as Google's APIs map it; OpenAI has none
    grpc.StatusCode.RESOURCE_EXHAUSTED: (429, "rate_limit_error"),
    grpc.StatusCode.UNAVAILABLE: (503, "service_unavailable_error"),
    grpc.StatusCode.DEADLINE_EXCEEDED: (504, "timeout_error"),
    grpc.StatusCode.CANCELLED: (499, "cancelled"),  # nginx's "client closed request": nobody reads it
}
TRUE = ("1", "true", "yes")


def error_body(exc: BaseException) -> tuple[int, dict[str, Any], dict[str, str]]:
    """(HTTP status, OpenAI error JSON, headers) for any failure."""
    code, message = status_for(exc)
    status, kind = HTTP_STATUS.get(code, (500, "server_error"))
    if status == 500:
        log.error("internal error", exc_info=exc)
    # Messages are "<field path>: <reason>"; a path can hold ":" itself (a metadata key), never ": ".
    param = message.split(": ", 1)[0] if code == grpc.StatusCode.INVALID_ARGUMENT and ": " in message else None
    headers = {}
    if isinstance(exc, ResourceExhausted):
        # OpenAI's SDKs wait retry-after-ms (else retry-after) before retrying a 429.
        headers = {"retry-after": str(max(1, math.ceil(exc.retry_after))), "retry-after-ms": str(math.ceil(exc.retry_after * 1000))}
    return status, {"error": {"message": message, "type": kind, "param": param, "code": code.name.lower()}}, headers


def error_response(exc: BaseException) -> JSONResponse:
    status, body, headers = error_body(exc)
    return JSONResponse(body, status_code=status, headers=headers)


def _parse(body: bytes, model: type[BaseModel]):
    try:
        return model.model_validate_json(body)
    except ValidationError as exc:
        errors = exc.errors()
        if errors[0]["type"] == "json_invalid":
            raise InvalidArgument(f"body: not valid JSON ({errors[0]['msg']})") from None
        # A union-typed field fails once per member: the deepest failure says the most ("prompt[0]").
        error = max(errors, key=lambda e: len(e["loc"]))
        path = field_path(model, tuple(error["loc"])) or "body"
        raise InvalidArgument(f"{path}: {error['msg']}") from None


async def _read_body(request: Request) -> bytes:
    """The body, refused as soon as it is known to exceed the request size limit (before it is all read)."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limits.MAX_REQUEST_BYTES:
        raise InvalidArgument(f"body: at most {limits.MAX_REQUEST_BYTES} bytes (got {declared})")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limits.MAX_REQUEST_BYTES:
            raise InvalidArgument(f"body: at most {limits.MAX_REQUEST_BYTES} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


class JSONResponse(StarletteJSONResponse):
    """Rendered by orjson: several times faster than json.dumps on a completion (same compact UTF-8)."""

    def render(self, content: Any) -> bytes:
        return orjson.dumps(content)


def _sse(payload: dict[str, Any]) -> bytes:
    return b"data: " + orjson.dumps(payload) + b"\n\n"


class EventStream(StreamingResponse):
    """Server-sent events whose producer is cancelled as soon as the client disconnects (so the
    upstream request is closed and vLLM stops generating), not only at the next write."""

    media_type = "text/event-stream"

    async def __call__(self, scope, receive, send) -> None:
        async with anyio.create_task_group() as group:

            async def stream() -> None:
                await self.stream_response(send)
                group.cancel_scope.cancel()

            group.start_soon(stream)
            await self.listen_for_disconnect(receive)
            group.cancel_scope.cancel()


async def _until_disconnected(request: Request, work):
    """Runs `work`, cancelling it (and so closing its upstream request) if the client goes away first."""
    task = asyncio.ensure_future(work)
    gone = False

    async def watch() -> None:
        nonlocal gone
        while (await request.receive())["type"] != "http.disconnect":
            pass
        gone = True
        task.cancel()

    watcher = asyncio.create_task(watch())
    try:
        return await task
    except asyncio.CancelledError:
        if gone:
            raise Cancelled("the client disconnected") from None
        raise
    finally:
        watcher.cancel()


class _Reply:
    """What one generation request needs to render its answer in OpenAI's shapes."""

    def __init__(self, chat: bool, admission: Admission, include_usage: bool, request_id: str) -> None:
        self.chat = chat
        self.admission = admission
        self.include_usage = include_usage
        self.id = ("chatcmpl-" if chat else "cmpl-") + request_id
        self.created = int(time.time())
        self.model = POLICY_PREFIX + admission.policy
        self.object = "chat.completion" if chat else "text_completion"

    def guard_fields(self) -> dict[str, Any]:
        return {"policy": self.admission.policy, "policy_version": self.admission.loaded.version}

    def choice_extension(self, result: GenerateResult) -> dict[str, Any]:
        refusal = None
        if result.refusal is not None:
            shown = visible_refusal(self.admission, result.refusal)
            refusal = {"stage": shown.stage, "step": shown.step, "rule": shown.rule, "reason": shown.reason}
        extension: dict[str, Any] = {"refusal": refusal}
        if result.sources:
            extension["sources"] = [dataclasses.asdict(source) for source in result.sources]
        if self.admission.with_trace:
            extension["trace"] = trace_of(result)
        return extension

    def usage(self, results: list[GenerateResult]) -> dict[str, int]:
        prompt = sum(r.usage.prompt_tokens for r in results)
        completion = sum(r.usage.completion_tokens for r in results)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

    def response(self, results: list[GenerateResult]) -> dict[str, Any]:
        choices = []
        for index, result in enumerate(results):
            choice: dict[str, Any] = {"index": index}
            if self.chat:
                refusal = result.text if result.refusal else None
                choice["message"] = {"role": "assistant", "content": result.text, "refusal": refusal}
            else:
                choice["text"] = result.text
            choice.update(logprobs=None, finish_reason=finish_reason(result.finish_reason), guard=self.choice_extension(result))
            choices.append(choice)
        return {
            "id": self.id,
            "object": self.object,
            "created": self.created,
            "model": self.model,
            "choices": choices,
            "usage": self.usage(results),
            "guard": self.guard_fields(),
        }

    def chunk(self, index: int, *, text: str | None = None, role: bool = False, result: GenerateResult | None = None) -> bytes:
        choice: dict[str, Any] = {"index": index}
        if self.chat:
            delta: dict[str, Any] = {"role": "assistant"} if role else {}
            if text is not None:
                delta["content"] = text
            choice["delta"] = delta
        else:
            choice["text"] = text or ""
        choice["logprobs"] = None
        choice["finish_reason"] = finish_reason(result.finish_reason) if result is not None else None
        payload: dict[str, Any] = {
            "id": self.id,
            "object": self.object + ".chunk" if self.chat else self.object,
            "created": self.created,
            "model": self.model,
            "choices": [choice],
        }
        if result is not None:
            choice["guard"] = self.choice_extension(result)
            payload["guard"] = self.guard_fields()
        if self.include_usage:
            payload["usage"] = None
        return _sse(payload)

    def usage_chunk(self, results: list[GenerateResult]) -> bytes:
        return _sse(
            {
                "id": self.id,
                "object": self.object + ".chunk" if self.chat else self.object,
                "created": self.created,
                "model": self.model,
                "choices": [],
                "usage": self.usage(results),
            }
        )


class OpenAIDoor:
    def __init__(self, service: GuardService, serving: Callable[[], bool]) -> None:
        self.service = service
        self.serving = serving

    def app(self) -> Starlette:
        return Starlette(
            routes=[
                Route("/v1/chat/completions", self.chat_completions, methods=["POST"]),
                Route("/v1/completions", self.completions, methods=["POST"]),
                Route("/v1/models", self.models, methods=["GET"]),
                Route("/v1/models/{model_id:path}", self.model, methods=["GET"]),
                Route("/v1/feedback", self.feedback, methods=["POST"]),
                Route("/health", self.health, methods=["GET"]),
            ]
        )

    async def health(self, request: Request) -> Response:
        if self.serving():
            return JSONResponse({"status": "SERVING"})
        return JSONResponse({"status": "NOT_SERVING"}, status_code=503)

    async def models(self, request: Request) -> Response:
        return await self._models(request, None)

    async def model(self, request: Request) -> Response:
        return await self._models(request, request.path_params["model_id"])

    async def _models(self, request: Request, model_id: str | None) -> Response:
        """The policies the caller may use, as OpenAI models; one of them when `model_id` is given."""
        observation = self.service.begin("models")
        try:
            tenant = self.service.authenticate(request.headers.get("authorization"))
            observation.tenant = tenant
            data = [
                {
                    "id": POLICY_PREFIX + loaded.policy.name,
                    "object": "model",
                    "created": 0,
                    "owned_by": "guard",
                    "guard": {
                        "policy_version": loaded.version,
                        "description": loaded.policy.description,
                        "upstream_model": loaded.policy.upstream_model(self.service.default_model),
                        "steps": [step.type for step in loaded.policy.steps],
                    },
                }
                for loaded in self.service.policies(tenant)
            ]
            if model_id is not None:
                found = next((entry for entry in data if entry["id"] in (model_id, POLICY_PREFIX + model_id)), None)
                if found is None:
                    raise NotFound(f"model: unknown policy {model_id!r}")
        except Exception as exc:  # noqa: BLE001 - every failure becomes an OpenAI error body
            observation.finish(exc)
            return error_response(exc)
        observation.finish()
        return JSONResponse(found if model_id is not None else {"object": "list", "data": data})

    async def feedback(self, request: Request) -> Response:
        observation = self.service.begin("feedback")
        try:
            tenant = self.service.authenticate(request.headers.get("authorization"))
            observation.tenant = tenant
            body = _parse(await _read_body(request), FeedbackBody)
            receipt = await self.service.feedback(tenant, body.to_feedback())
            observation.policy = receipt.policy
        except BaseException as exc:
            observation.finish(exc)
            if not isinstance(exc, Exception):
                raise
            return error_response(exc)
        observation.finish()
        return JSONResponse(
            {"object": "feedback", "request_id": receipt.request_id, "policy": receipt.policy, "policy_version": receipt.policy_version}
        )

    async def chat_completions(self, request: Request) -> Response:
        return await self._generate(request, ChatCompletionRequest, "chat.completions")

    async def completions(self, request: Request) -> Response:
        return await self._generate(request, CompletionRequest, "completions")

    async def _generate(self, request: Request, model: type[ChatCompletionRequest | CompletionRequest], rpc: str) -> Response:
        try:
            observation = self.service.begin(rpc, generates=True)
        except ResourceExhausted as exc:
            return error_response(exc)
        try:
            tenant = self.service.authenticate(request.headers.get("authorization"))
            observation.tenant = tenant
            body = _parse(await _read_body(request), model)
            generate_input = body.to_input()
            generate_input.request_id = limits.request_id(request.headers.get("x-request-id"))
            observation.received(generate_input)
            served = self.service.store.list()
            # Every policy name, not only the tenant's: one it may not use is a 403, as through gRPC.
            policy_names = {loaded.policy.name for loaded in served}
            # An adapter's name is not one: the base model would answer a client that meant the adapter.
            served_models = {self.service.default_model} | {loaded.policy.model for loaded in served if loaded.policy.model}
            policy = requested_policy(body.model, request.headers.get("x-guard-policy"), policy_names, served_models)
            trace = request.headers.get("x-guard-trace", "").lower() in TRUE
            admission = self.service.admit(tenant, policy, trace=trace)
            observation.admitted(admission)
            max_n = admission.loaded.policy.limits.max_n
            if body.n > max_n:
                raise InvalidArgument(Invalid.N.format(field="n", policy=admission.policy, limit=max_n, value=body.n))
            inputs = _choices(generate_input, body.n)
            deadline = _deadline(request.headers.get("x-guard-timeout-seconds"))
            reply = _Reply(
                model is ChatCompletionRequest, admission, bool(body.stream_options and body.stream_options.include_usage),
                generate_input.request_id,
            )
            headers = {
                "x-guard-policy": admission.policy,
                "x-guard-policy-version": admission.loaded.version,
                "x-request-id": generate_input.request_id,
            }
            events = self._events(admission, inputs, deadline, incremental=bool(body.stream))
            if body.stream:
                # The first event is awaited before answering, so that a failure before any text
                # (upstream down, deadline) is still an HTTP error status rather than a broken stream.
                first = await _until_disconnected(request, anext(events))
                return EventStream(self._stream(reply, first, events, observation), headers=headers)
            results = await _until_disconnected(request, _collect(events, len(inputs)))
        except BaseException as exc:
            observation.finish(exc)
            if not isinstance(exc, Exception):
                raise
            return error_response(exc)
        observation.answered(*results)
        observation.finish()
        return JSONResponse(reply.response(results), headers=headers)

    async def _events(
        self, admission: Admission, inputs: list[GenerateInput], deadline: float | None, *, incremental: bool
    ) -> AsyncIterator[tuple[int, TextDelta | GenerateResult]]:
        """(choice index, event) of every choice's stream; choices run concurrently, each the whole policy."""
        if len(inputs) == 1:
            stream = self.service.stream(admission, inputs[0], deadline=deadline, door="http", incremental=incremental)
            async with contextlib.aclosing(stream) as events:
                async for event in events:
                    yield 0, event
            return
        queue: asyncio.Queue = asyncio.Queue()

        async def pump(index: int, generate_input: GenerateInput) -> None:
            try:
                stream = self.service.stream(admission, generate_input, deadline=deadline, door="http", incremental=incremental)
                async with contextlib.aclosing(stream) as events:
                    async for event in events:
                        await queue.put((index, event))
            except Exception as exc:  # noqa: BLE001 - handed to the consumer, which raises it
                await queue.put((index, exc))

        tasks = [asyncio.create_task(pump(index, item)) for index, item in enumerate(inputs)]
        try:
            unfinished = len(tasks)
            while unfinished:
                index, event = await queue.get()
                if isinstance(event, Exception):
                    raise event
                if isinstance(event, GenerateResult):
                    unfinished -= 1
                yield index, event
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def _stream(self, reply: _Reply, first, events, observation: Observation) -> AsyncIterator[bytes]:
        results: dict[int, GenerateResult] = {}
        started: set[int] = set()
        started_text = False
        async def from_first():
            yield first
            async for item in events:
                yield item

        try:
            async for index, event in from_first():
                role = reply.chat and index not in started
                started.add(index)
                if isinstance(event, TextDelta):
                    if not started_text:
                        observation.first_text()
                        started_text = True
                    yield reply.chunk(index, text=event.text, role=role)
                    continue
                results[index] = event
                # A refusal's text follows whatever was already sent (as in the gRPC stream's final message).
                yield reply.chunk(index, text=event.text if event.refusal else None, role=role, result=event)
            ordered = [results[index] for index in sorted(results)]
            if reply.include_usage:
                yield reply.usage_chunk(ordered)
            yield b"data: [DONE]\n\n"
            observation.answered(*ordered)
            observation.finish()
        except Exception as exc:  # noqa: BLE001 - the status line is sent: report it in the stream, as vLLM does
            observation.finish(exc)
            yield _sse(error_body(exc)[1])
        except BaseException as exc:
            observation.finish(exc)
            raise
        finally:
            await events.aclose()


def _choices(generate_input: GenerateInput, n: int) -> list[GenerateInput]:
    """n independent requests; with a seed, choice i samples with seed + i (else every choice would be the same)."""
    seed = generate_input.sampling.seed
    if n == 1 or seed is None:
        return [generate_input] * n
    return [
        dataclasses.replace(generate_input, sampling=generate_input.sampling.with_(seed=_choice_seed(seed, index)))
        for index in range(n)
    ]


def _choice_seed(seed: int, index: int) -> int:
    """seed + index, stepping down instead where that would leave the 64-bit range."""
    return seed + index if seed + index <= limits.MAX_SEED else seed - index


async def _collect(events: AsyncIterator[tuple[int, TextDelta | GenerateResult]], n: int) -> list[GenerateResult]:
    results: dict[int, GenerateResult] = {}
    async with contextlib.aclosing(events):
        async for index, event in events:
            if isinstance(event, GenerateResult):
                results[index] = event
    return [results[index] for index in range(n)]


def _deadline(header: str | None) -> float | None:
    if header is None:
        return None
    try:
        seconds = float(header)
    except ValueError:
        seconds = -1.0
    if not 0 < seconds <= 86400:
        raise InvalidArgument(f"x-guard-timeout-seconds: must be a number of seconds > 0 and <= 86400 (got {header!r})")
    return time.monotonic() + seconds
