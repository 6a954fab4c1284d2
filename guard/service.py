"""What both doors (gRPC and the OpenAI HTTP API) do with a request, in one place.

A door converts its wire format to `guard.types`, then asks this service to admit the caller
(key -> tenant -> policy, trace permission, rate limit), runs the policy's pipeline through it,
and shows the caller only what its tenant may see. Metrics, token accounting, the request
log and the audit log live here too, so both doors count and record the same way.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from typing import Any

from guard import metrics
from guard.access import AccessControl, Tenant
from guard.audit import AuditStore, Feedback, Finished, FoundRecord, input_to_keep
from guard.audit.feedback import check_against, check_fields, not_found
from guard.errors import FailedPrecondition, Invalid, InvalidArgument, ResourceExhausted, status_for
from guard.limits import MAX_SCORE_CANDIDATES
from guard.pipeline.runner import Pipeline, Pipelines, TextDelta
from guard.policy.loader import LoadedPolicy
from guard.policy.store import PolicyStore, UnknownPolicy
from guard.types import GenerateInput, GenerateResult, Message, Refusal

log = logging.getLogger(__name__)

# What an overloaded guard asks callers to wait: long enough for a burst to drain, short against a request.
OVERLOAD_RETRY_SECONDS = 0.5
# An audit record keeps this much of a failure's message (upstream errors can be long).
AUDIT_ERROR_CHARS = 1000
# Feedback looks for its record after this process's writer has written what it holds; a request id not found
# is looked for once more after this long: the record can still be on its way (a stream's record is queued after
# its last message is sent; under --workers another process's writer lingers 0.25 s before writing).
FEEDBACK_RECHECK_SECONDS = 0.4


@dataclass(frozen=True)
class Admission:
    """A caller let in: who it is, the policy it gets, and what it may see."""

    tenant: Tenant
    loaded: LoadedPolicy
    pipeline: Pipeline
    with_trace: bool

    @property
    def policy(self) -> str:
        return self.loaded.policy.name


class Observation:
    """One request, counted in guard_requests_* when it ends (and audited, once `received`); the door fills
    in what it learns."""

    def __init__(self, access: AccessControl, rpc: str, audit: AuditStore | None = None) -> None:
        self.access = access
        self.rpc = rpc
        self.audit = audit
        self.policy = "unknown"
        self.tenant: Tenant | None = None
        self.outcome = "ok"
        self.started = time.perf_counter()
        self.finished = False
        self.on_finish: Callable[[], None] | None = None
        self.request: GenerateInput | None = None
        self.admission: Admission | None = None
        self.results: tuple[GenerateResult, ...] = ()
        metrics.child(metrics.REQUESTS_IN_FLIGHT, rpc).inc()

    def received(self, request: GenerateInput) -> None:
        """The generation request, as the door read it: its end will be audited, whatever it is. A request
        guard could not read (no valid key, a malformed body) is only counted: a caller without a key
        cannot fill the audit log and push real records out of it."""
        self.request = request

    def admitted(self, admission: Admission) -> None:
        self.admission = admission
        self.policy = admission.policy
        self.tenant = admission.tenant

    def answered(self, *results: GenerateResult) -> None:
        """The request's answers (one per choice): refused if any was."""
        self.results = results
        for result in results:
            refusal = result.refusal
            if refusal is not None:
                metrics.child(metrics.REFUSALS, self.policy, refusal.step, refusal.stage).inc()
                self.outcome = "refused"

    def first_text(self) -> None:
        """The first answer text went to a streaming client."""
        metrics.child(metrics.TIME_TO_FIRST_TEXT, self.rpc, self.policy).observe(time.perf_counter() - self.started)

    def finish(self, exc: BaseException | None = None) -> None:
        if self.finished:
            return
        self.finished = True
        if self.on_finish is not None:
            self.on_finish()
        error = ""
        if exc is not None:
            # A client that cancels (or drops a stream) shows up as CancelledError / GeneratorExit here.
            if isinstance(exc, (GeneratorExit, asyncio.CancelledError)):
                self.outcome, error = "CANCELLED", "cancelled by the client"
            else:
                code, error = status_for(exc)
                self.outcome = code.name
        tenant = self.access.metric_label(self.tenant)
        seconds = time.perf_counter() - self.started
        metrics.child(metrics.REQUESTS_IN_FLIGHT, self.rpc).dec()
        metrics.child(metrics.REQUESTS, self.rpc, self.policy, tenant, self.outcome).inc()
        metrics.child(metrics.REQUEST_SECONDS, self.rpc, self.policy).observe(seconds)
        if self.audit is not None and self.request is not None:
            self.audit.submit(self._finished(self.request, seconds, error))

    def _finished(self, request: GenerateInput, seconds: float, error: str) -> Finished:
        failed = self.outcome not in ("ok", "refused")
        admission = self.admission
        loaded = admission.loaded if admission is not None else None
        # No policy chosen (the request failed before): none asked for its text.
        text = loaded.policy.audit.text if loaded is not None else "none"
        return Finished(
            rpc=self.rpc,
            tenant=self.tenant.name if self.tenant is not None else "",
            time=time.time() - seconds,
            seconds=seconds,
            outcome="error" if failed else self.outcome,
            status=self.outcome if failed else "OK",
            error=error[:AUDIT_ERROR_CHARS],
            request_id=request.request_id,
            input=input_to_keep(request, text),
            policy=loaded.policy.name if loaded is not None else "",
            policy_version=loaded.version if loaded is not None else "",
            model=admission.pipeline.model if admission is not None else "",
            text=text,
            results=self.results,
        )


@dataclass(frozen=True)
class FeedbackReceipt:
    """Feedback stored: on the request with this id, which this policy (version) answered."""

    request_id: str
    policy: str
    policy_version: str


class GuardService:
    def __init__(
        self,
        store: PolicyStore,
        pipelines: Pipelines,
        access: AccessControl,
        *,
        max_in_flight: int = 0,
        audit: AuditStore | None = None,
    ) -> None:
        self.store = store
        self.pipelines = pipelines
        self.access = access
        self.audit = audit  # None: no audit log
        # Requests that generate or score, across both doors; beyond the bound, refuse at once rather than queue.
        self.max_in_flight = max_in_flight  # 0: unbounded
        self.in_flight = 0

    def _occupy(self) -> None:
        if self.max_in_flight and self.in_flight >= self.max_in_flight:
            metrics.OVERLOADED.inc()
            raise ResourceExhausted(
                f"overloaded: {self.in_flight} requests in flight (limit {self.max_in_flight}); "
                f"retry after {OVERLOAD_RETRY_SECONDS:g} s",
                retry_after=OVERLOAD_RETRY_SECONDS,
            )
        self.in_flight += 1

    def _vacate(self) -> None:
        self.in_flight -= 1

    @property
    def default_model(self) -> str:
        return self.pipelines.deps.default_model

    def begin(self, rpc: str, *, generates: bool = False) -> Observation:
        """Starts counting a request; the caller must `finish()` it (streams end after the handler returns).

        A request that `generates` (or scores) takes one of the max_in_flight places until it finishes;
        with none free it is refused at once (ResourceExhausted, counted), never queued.
        """
        observation = Observation(self.access, rpc, self.audit)
        if generates:
            try:
                self._occupy()
            except ResourceExhausted as exc:
                observation.finish(exc)
                raise
            observation.on_finish = self._vacate
        return observation

    @contextlib.contextmanager
    def observe(self, rpc: str, *, generates: bool = False) -> Iterator[Observation]:
        observation = self.begin(rpc, generates=generates)
        try:
            yield observation
        except BaseException as exc:
            observation.finish(exc)
            raise
        observation.finish()

    def authenticate(self, authorization: str | None) -> Tenant:
        return self.access.authenticate(authorization)

    def admit(self, tenant: Tenant, requested_policy: str, *, trace: bool = False) -> Admission:
        """Raises PermissionDenied (policy or trace not allowed), UnknownPolicy, ResourceExhausted."""
        name = self.access.policy_for(tenant, requested_policy, self.store.default_policy)
        try:
            loaded = self.store.get(name)
        except UnknownPolicy:
            # Name only what this tenant may use: the store's message would list every policy served.
            known = ", ".join(loaded.policy.name for loaded in self.policies(tenant)) or "none"
            raise UnknownPolicy(f"unknown policy {name!r} (known: {known})") from None
        if trace:
            self.access.check_trace(tenant)
        self.access.admit(tenant)
        return Admission(tenant, loaded, self.pipelines.get(loaded), with_trace=trace)

    async def stream(
        self, admission: Admission, request: GenerateInput, *, deadline: float | None, door: str, incremental: bool = True
    ) -> AsyncIterator[TextDelta | GenerateResult]:
        """The pipeline's stream (see Pipeline.stream); the final GenerateResult is also logged and its tokens counted."""
        stream = admission.pipeline.stream(request, deadline=deadline, incremental=incremental)
        async with contextlib.aclosing(stream) as events:
            async for event in events:
                if isinstance(event, GenerateResult):
                    self._account(admission, request, event, door)
                yield event

    async def run(self, admission: Admission, request: GenerateInput, *, deadline: float | None, door: str) -> GenerateResult:
        stream = self.stream(admission, request, deadline=deadline, door=door, incremental=False)
        async with contextlib.aclosing(stream) as events:
            async for event in events:
                if isinstance(event, GenerateResult):
                    return event
        raise AssertionError("the answer stream ended without a result")

    def _account(self, admission: Admission, request: GenerateInput, result: GenerateResult, door: str) -> None:
        tenant = self.access.metric_label(admission.tenant)
        usage = result.usage
        metrics.child(metrics.TOKENS, admission.policy, tenant, "prompt").inc(usage.prompt_tokens)
        metrics.child(metrics.TOKENS, admission.policy, tenant, "completion").inc(usage.completion_tokens)
        self.access.charge_tokens(admission.tenant, usage.prompt_tokens + usage.completion_tokens)
        log.debug(
            "%s tenant=%s policy=%s version=%s finish=%s refused=%s tokens=%d/%d %.3fs metadata=%s",
            door, admission.tenant.name, result.policy, result.policy_version, result.finish_reason, bool(result.refusal),
            usage.prompt_tokens, usage.completion_tokens, result.total_seconds, request.metadata,
        )

    def policies(self, tenant: Tenant) -> list[LoadedPolicy]:
        return [loaded for loaded in self.store.list() if tenant.may_use(loaded.policy.name)]

    async def score(
        self, tenant: Tenant, requested_policy: str, prompt: str | list[Message], candidates: list[str]
    ) -> tuple[Admission, list[float]]:
        if not candidates:
            raise InvalidArgument(Invalid.CANDIDATES_EMPTY.value)
        if len(candidates) > MAX_SCORE_CANDIDATES:
            raise InvalidArgument(Invalid.CANDIDATES_TOO_MANY.format(limit=MAX_SCORE_CANDIDATES, value=len(candidates)))
        admission = self.admit(tenant, requested_policy)
        step = next((s for s in admission.loaded.policy.steps if s.type == "best_of_n"), None)
        reranker = self.pipelines.deps.reranker
        if step is None or reranker is None:
            raise InvalidArgument(Invalid.NO_REWARD.format(value=admission.policy))
        return admission, await reranker.score(step.reward, prompt, candidates)


    async def feedback(self, tenant: Tenant, feedback: Feedback) -> FeedbackReceipt:
        """Stores feedback on the newest request with its id of this tenant (see guard.audit.feedback).

        InvalidArgument (a malformed field, an index the request does not have), FailedPrecondition (no audit
        log; the request failed; its policy keeps no text), NotFound (no such request of this tenant: another
        tenant's id is not found either), ResourceExhausted (the tenant's rate limit).
        """
        check_fields(feedback)
        if self.audit is None:
            raise FailedPrecondition(
                "request_id: feedback is stored beside the audit log, which is off: start guard with --audit-db PATH"
            )
        self.access.admit(tenant)
        found = await self._record_for_feedback(feedback.request_id, tenant.name)
        record = found.record
        check_against(feedback, record)
        stored = dataclasses.replace(feedback, tenant=tenant.name, time=time.time())
        if not await asyncio.to_thread(self.audit.add_feedback, found.key, stored):
            raise not_found(feedback.request_id)  # retention deleted the record meanwhile
        metrics.feedback_received(record.policy, stored.kinds, stored.rating)
        return FeedbackReceipt(feedback.request_id, record.policy, record.policy_version)

    async def _record_for_feedback(self, request_id: str, tenant: str) -> FoundRecord:
        """The record, also when it is not written yet: a client may send feedback the moment its answer arrives.

        The writer is flushed first even when the database has a record of that id: ids repeat, and the newest
        request of that id may be the one still queued.
        """
        audit = self.audit
        assert audit is not None
        for wait in (0.0, FEEDBACK_RECHECK_SECONDS):
            if wait:
                await asyncio.sleep(wait)
            await asyncio.to_thread(audit.flush)
            found = await asyncio.to_thread(audit.find, request_id, tenant)
            if found is not None:
                return found
        raise not_found(request_id)


def visible_refusal(admission: Admission, refusal: Refusal) -> Refusal:
    """What the caller learns about a refusal: only its stage unless its tenant may see which rule fired
    (naming the rule, or a score in the reason, would let an attacker probe the filters)."""
    if admission.tenant.refusal_details:
        return refusal
    return Refusal(stage=refusal.stage, step="", rule="", reason="", text=refusal.text)


def jsonable(value: Any) -> Any:
    """Trace detail is free-form step output; anything not JSON-like is shown as its repr."""
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return repr(value)


def trace_of(result: GenerateResult) -> dict[str, Any]:
    """The trace as plain JSON (the gRPC door builds the same fields as protobuf)."""
    return {
        "upstream_seconds": result.upstream_seconds,
        "total_seconds": result.total_seconds,
        "upstream_url": result.upstream_url,
        "upstream_model": result.upstream_model,
        "steps": [
            {
                "step": entry.step,
                "type": entry.type,
                "phase": entry.phase,
                "duration_seconds": entry.duration_seconds,
                "detail": jsonable(entry.detail),
            }
            for entry in result.trace
        ],
    }
