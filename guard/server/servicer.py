"""The Guard gRPC service: converts protobuf, runs the policy pipeline, records metrics.

The only module besides convert.py that touches generated protobuf code.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator

import grpc

from guard import metrics
from guard.pipeline.runner import Pipelines, TextDelta
from guard.policy.store import PolicyStore
from guard.server import convert
from guard.server.errors import Invalid, InvalidArgument, status_for
from guard.types import GenerateResult
from guard.v1 import guard_pb2 as pb
from guard.v1 import guard_pb2_grpc

log = logging.getLogger(__name__)

MAX_SCORE_CANDIDATES = 256


def _deadline(context: grpc.aio.ServicerContext) -> float | None:
    remaining = context.time_remaining()
    return None if remaining is None else time.monotonic() + remaining


class _Observation:
    """Outcome of one request, for guard_requests_total."""

    def __init__(self) -> None:
        self.policy = "unknown"
        self.outcome = "ok"


@contextlib.contextmanager
def _observe(rpc: str):
    observation = _Observation()
    metrics.REQUESTS_IN_FLIGHT.labels(rpc=rpc).inc()
    started = time.perf_counter()
    try:
        yield observation
    except BaseException as exc:
        # A client that cancels (or drops a stream) shows up as CancelledError / GeneratorExit here.
        if isinstance(exc, (GeneratorExit, asyncio.CancelledError)):
            observation.outcome = grpc.StatusCode.CANCELLED.name
        else:
            observation.outcome = status_for(exc)[0].name
        raise
    finally:
        metrics.REQUESTS_IN_FLIGHT.labels(rpc=rpc).dec()
        metrics.REQUESTS.labels(rpc=rpc, policy=observation.policy, outcome=observation.outcome).inc()
        metrics.REQUEST_SECONDS.labels(rpc=rpc, policy=observation.policy).observe(time.perf_counter() - started)


class GuardServicer(guard_pb2_grpc.GuardServicer):
    def __init__(self, store: PolicyStore, pipelines: Pipelines) -> None:
        self.store = store
        self.pipelines = pipelines

    def _log(self, rpc: str, request: pb.GenerateRequest, result: GenerateResult) -> None:
        log.info(
            "%s policy=%s version=%s finish=%s refused=%s tokens=%d/%d %.3fs metadata=%s",
            rpc, result.policy, result.policy_version, result.finish_reason, bool(result.refusal),
            result.usage.prompt_tokens, result.usage.completion_tokens, result.total_seconds, dict(request.metadata),
        )

    async def Generate(self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext) -> pb.GenerateResponse:
        with _observe("Generate") as observation:
            generate_input = convert.generate_input(request)
            loaded = self.store.get(generate_input.policy)
            observation.policy = loaded.policy.name
            result = await self.pipelines.get(loaded).run(generate_input, deadline=_deadline(context))
            observation.outcome = "refused" if result.refusal else "ok"
            self._log("Generate", request, result)
            response = pb.GenerateResponse(text=result.text)
            convert.fill_result(response, result, with_trace=generate_input.include_trace)
            return response

    async def GenerateStream(
        self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.GenerateStreamResponse]:
        with _observe("GenerateStream") as observation:
            generate_input = convert.generate_input(request)
            loaded = self.store.get(generate_input.policy)
            observation.policy = loaded.policy.name
            async for event in self.pipelines.get(loaded).stream(generate_input, deadline=_deadline(context)):
                if isinstance(event, TextDelta):
                    yield pb.GenerateStreamResponse(text=event.text)
                    continue
                observation.outcome = "refused" if event.refusal else "ok"
                self._log("GenerateStream", request, event)
                # A refusal (even mid-stream: what was sent stays sent) arrives as the final message's text.
                final = pb.GenerateStreamResponse(text=event.text if event.refusal else "")
                convert.fill_result(final, event, with_trace=generate_input.include_trace)
                yield final

    async def ListPolicies(self, request: pb.ListPoliciesRequest, context) -> pb.ListPoliciesResponse:
        with _observe("ListPolicies"):
            response = pb.ListPoliciesResponse(default_policy=self.store.default_policy)
            for loaded in sorted(self.store.list(), key=lambda p: p.policy.name):
                response.policies.add(
                    name=loaded.policy.name,
                    version=loaded.version,
                    description=loaded.policy.description,
                    model=loaded.policy.model or self.pipelines.default_model,
                    steps=[step.type for step in loaded.policy.steps],
                    source=str(loaded.source),
                )
            return response

    async def Score(self, request: pb.ScoreRequest, context: grpc.aio.ServicerContext) -> pb.ScoreResponse:
        with _observe("Score") as observation:
            prompt, messages = convert.input_of(request)
            if not request.candidates:
                raise InvalidArgument(Invalid.CANDIDATES_EMPTY.value)
            if len(request.candidates) > MAX_SCORE_CANDIDATES:
                raise InvalidArgument(Invalid.CANDIDATES_TOO_MANY.format(limit=MAX_SCORE_CANDIDATES, value=len(request.candidates)))
            loaded = self.store.get(request.policy)
            observation.policy = loaded.policy.name
            step = next((s for s in loaded.policy.steps if s.type == "best_of_n"), None)
            reranker = self.pipelines.deps.reranker
            if step is None or reranker is None:
                raise InvalidArgument(Invalid.NO_REWARD.format(value=loaded.policy.name))
            scores = await reranker.score(step.reward, messages if messages is not None else prompt, list(request.candidates))
            best = max(range(len(scores)), key=scores.__getitem__)
            return pb.ScoreResponse(
                scores=scores, best_index=best, policy=loaded.policy.name, policy_version=loaded.version
            )

