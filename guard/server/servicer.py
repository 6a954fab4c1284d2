"""The Guard gRPC service: converts protobuf, hands the request to the shared GuardService.

The only module besides convert.py that touches generated protobuf code.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator

import grpc

from guard.pipeline.runner import TextDelta
from guard.server import convert
from guard.server.statuses import stream_statuses, unary_statuses
from guard.service import GuardService
from guard.v1 import guard_pb2 as pb
from guard.v1 import guard_pb2_grpc


def _deadline(context: grpc.aio.ServicerContext) -> float | None:
    remaining = context.time_remaining()
    return None if remaining is None else time.monotonic() + remaining


def _caller(context: grpc.aio.ServicerContext) -> tuple[str | None, str | None]:
    """(authorization, x-request-id) from the call's metadata."""
    authorization = request_id = None
    for key, value in context.invocation_metadata() or ():
        if key == "authorization":
            authorization = value
        elif key == "x-request-id":
            request_id = value
    return authorization, request_id


class GuardServicer(guard_pb2_grpc.GuardServicer):
    def __init__(self, service: GuardService) -> None:
        self.service = service

    @unary_statuses
    async def Generate(self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext) -> pb.GenerateResponse:
        with self.service.observe("Generate", generates=True) as observation:
            authorization, request_id = _caller(context)
            tenant = self.service.authenticate(authorization)
            generate_input = convert.generate_input(request, request_id)
            observation.received(generate_input)
            admission = self.service.admit(tenant, generate_input.policy, trace=generate_input.include_trace)
            observation.admitted(admission)
            result = await self.service.run(admission, generate_input, deadline=_deadline(context), door="grpc")
            observation.answered(result)
            response = pb.GenerateResponse(text=result.text, request_id=generate_input.request_id)
            convert.fill_result(response, result, admission)
            return response

    @stream_statuses
    async def GenerateStream(
        self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.GenerateStreamResponse]:
        with self.service.observe("GenerateStream", generates=True) as observation:
            authorization, request_id = _caller(context)
            tenant = self.service.authenticate(authorization)
            generate_input = convert.generate_input(request, request_id)
            observation.received(generate_input)
            admission = self.service.admit(tenant, generate_input.policy, trace=generate_input.include_trace)
            observation.admitted(admission)
            events = self.service.stream(admission, generate_input, deadline=_deadline(context), door="grpc-stream")
            first = True
            async for event in events:
                if isinstance(event, TextDelta):
                    if first:
                        observation.first_text()
                        yield pb.GenerateStreamResponse(text=event.text, request_id=generate_input.request_id)
                        first = False
                    else:
                        yield pb.GenerateStreamResponse(text=event.text)
                    continue
                observation.answered(event)
                # A refusal (even mid-stream: what was sent stays sent) arrives as the final message's text.
                final = pb.GenerateStreamResponse(text=event.text if event.refusal else "", request_id=generate_input.request_id)
                convert.fill_result(final, event, admission)
                yield final

    @unary_statuses
    async def ListPolicies(self, request: pb.ListPoliciesRequest, context) -> pb.ListPoliciesResponse:
        with self.service.observe("ListPolicies") as observation:
            tenant = self.service.authenticate(_caller(context)[0])
            observation.tenant = tenant
            default = tenant.default_policy or self.service.store.default_policy
            response = pb.ListPoliciesResponse(default_policy=default if tenant.may_use(default) else "")
            for loaded in self.service.policies(tenant):
                response.policies.add(
                    name=loaded.policy.name,
                    version=loaded.version,
                    description=loaded.policy.description,
                    model=loaded.policy.upstream_model(self.service.default_model),
                    steps=[step.type for step in loaded.policy.steps],
                    source=str(loaded.source) if tenant.trace else "",
                )
            if tenant.trace:
                for file, error in sorted(self.service.store.last_errors.items()):
                    response.load_errors.add(file=file, issues=[str(issue) for issue in error.issues])
            return response

    @unary_statuses
    async def Score(self, request: pb.ScoreRequest, context: grpc.aio.ServicerContext) -> pb.ScoreResponse:
        with self.service.observe("Score", generates=True) as observation:
            tenant = self.service.authenticate(_caller(context)[0])
            observation.tenant = tenant
            prompt, messages = convert.input_of(request)
            admission, scores = await self.service.score(
                tenant, request.policy, messages if messages is not None else prompt, list(request.candidates)
            )
            observation.admitted(admission)
            best = max(range(len(scores)), key=scores.__getitem__)
            return pb.ScoreResponse(scores=scores, best_index=best, policy=admission.policy, policy_version=admission.loaded.version)

    @unary_statuses
    async def Feedback(self, request: pb.FeedbackRequest, context: grpc.aio.ServicerContext) -> pb.FeedbackResponse:
        with self.service.observe("Feedback") as observation:
            tenant = self.service.authenticate(_caller(context)[0])
            observation.tenant = tenant
            receipt = await self.service.feedback(tenant, convert.feedback_of(request))
            observation.policy = receipt.policy
            return pb.FeedbackResponse(request_id=receipt.request_id, policy=receipt.policy, policy_version=receipt.policy_version)
