"""Runs a policy's steps around one upstream call.

One request path: `Pipeline.stream` is the engine (context, before-hooks, generation,
refusal, usage, timing, trace), and `Pipeline.run` is the same stream, collected.
When every step is streamable the answer streams as vLLM generates it, held back by a
window of `holdback` characters while the moderating steps (output filters) check it;
a block closes the upstream request (vLLM aborts the generation). Otherwise (a step needs
the whole answer: chain-of-thought, best-of-n) one whole upstream call is made and the
chosen answer is sent as one piece.

`Pipeline` is built once per policy version (steps compile their rules then);
`Pipelines` caches them and rebuilds when the policy store hands out a new version.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

from guard import metrics
from guard.pipeline import best_of_n, chain_of_thought, filters, grounding, retrieve, system_prompt  # noqa: F401 - registers the steps
from guard.pipeline.base import Candidate, Context, Step, StepDeps, step_class
from guard.policy.loader import LoadedPolicy, PolicyBuildError
from guard.types import CandidateAnswer, GenerateInput, GenerateResult, Refusal, TraceEntry, Usage


@dataclass
class TextDelta:
    """A piece of streamed answer text."""

    text: str


class Pipeline:
    def __init__(self, loaded: LoadedPolicy, deps: StepDeps) -> None:
        self.loaded = loaded
        self.policy = loaded.policy
        self.deps = deps
        self.model = self.policy.upstream_model(deps.default_model)
        self.steps: list[Step] = [_build_step(index, config, deps) for index, config in enumerate(self.policy.steps)]
        self.selector = next((step for step in self.steps if step.selects), None)
        self.generator = next((step for step in self.steps if step.generates), None)
        # The answer streams as it is generated only if no step needs the whole of it.
        self.streams_directly = self.generator is None and all(step.streamable for step in self.steps)
        self.moderators = [step for step in self.steps if step.moderates_stream]
        # Never release text a check has not yet seen with this much after it; check this often.
        self.holdback = max((step.config.stream_holdback_chars for step in self.moderators), default=0)
        self.check_every = min((step.config.stream_check_every_chars for step in self.moderators), default=1)

    def _context(self, request: GenerateInput, deadline: float | None) -> Context:
        return Context(
            request=request,
            policy=self.policy,
            policy_version=self.loaded.version,
            model=self.model,
            sampling=self.policy.limits.apply(
                request.sampling.merged_over(self.policy.sampling.to_sampling()), tuple(self.policy.sampling.stop)
            ),
            prompt=request.prompt,
            messages=list(request.messages) if request.messages is not None else None,
            deadline=deadline,
        )

    def _record(self, step: Step, phase: str, elapsed: float, detail: dict, trace: list[TraceEntry]) -> None:
        metrics.child(metrics.STEP_SECONDS, self.policy.name, step.name, phase).observe(elapsed)
        trace.append(TraceEntry(step=step.name, type=step.type, phase=phase, duration_seconds=elapsed, detail=detail))

    async def _timed(self, ctx: Context, step: Step, phase: str, call, trace: list[TraceEntry]):
        ctx.detail = {}
        started = time.perf_counter()
        outcome = await call
        self._record(step, phase, time.perf_counter() - started, ctx.detail, trace)
        return outcome

    async def _before(self, ctx: Context, trace: list[TraceEntry]) -> None:
        for step in self.steps:
            if not step.has_before:
                continue
            await self._timed(ctx, step, "before", step.before(ctx), trace)
            if ctx.refusal is not None:
                return

    async def _after(self, ctx: Context, trace: list[TraceEntry]) -> Candidate | None:
        """Per-candidate hooks, then selection. None means every candidate was refused."""
        for step in self.steps:
            if not step.has_after:
                continue

            async def each_candidate(step: Step = step) -> None:
                for candidate in ctx.candidates:
                    if candidate.refusal is None:
                        await step.after(ctx, candidate)

            await self._timed(ctx, step, "after", each_candidate(), trace)
        if self.selector is not None:
            return await self._timed(ctx, self.selector, "select", self.selector.select(ctx), trace)
        return next((c for c in ctx.candidates if c.refusal is None), None)

    async def run(self, request: GenerateInput, *, deadline: float | None = None) -> GenerateResult:
        """The unary answer: the stream, drained (its final result carries the whole text)."""
        async with contextlib.aclosing(self.stream(request, deadline=deadline, incremental=False)) as events:
            async for event in events:
                if isinstance(event, GenerateResult):
                    return event
        raise AssertionError("the answer stream ended without a result")

    async def stream(
        self, request: GenerateInput, *, deadline: float | None = None, incremental: bool = True
    ) -> AsyncIterator[TextDelta | GenerateResult]:
        """Yields TextDelta pieces, then the final GenerateResult.

        Its text is the whole answer (the pieces joined), or on a refusal the refusal text:
        pieces sent before a mid-stream block stay sent. `incremental=False` is for a caller that
        only wants the result: with no step moderating a stream, the upstream is then asked for the
        whole answer at once (one JSON body instead of an event per token: measured, a third of
        guard's CPU per passthrough request).
        """
        started = time.perf_counter()
        ctx = self._context(request, deadline)
        result = GenerateResult(
            text="", finish_reason="", policy=self.policy.name, policy_version=self.loaded.version, upstream_model=self.model
        )
        await self._before(ctx, result.trace)
        if ctx.refusal is None:
            pieces: list[str] = []
            if self.streams_directly and (incremental or self.moderators):
                generated = self._streamed(ctx, result, incremental=incremental)
            else:
                generated = self._whole(ctx, result)
            async with contextlib.aclosing(generated) as answer:
                async for piece in answer:
                    pieces.append(piece)
                    yield TextDelta(piece)
            result.text = "".join(pieces)
            if ctx.retrieved is not None and ctx.refusal is None:
                self._cite(ctx, result)
        if ctx.refusal is not None:
            result.text = ctx.refusal.text
            result.finish_reason = "refused"
            result.refusal = ctx.refusal
        result.total_seconds = time.perf_counter() - started
        yield result

    def _cite(self, ctx: Context, result: GenerateResult) -> None:
        """The answer's sources, marked as its [n] cite them; the trace names the chunks cited and numbers no source has."""
        result.sources, unknown = ctx.retrieved.sources(result.text)
        detail = {"cited": [s.id for s in result.sources if s.cited], "unknown": unknown}
        result.trace.append(TraceEntry(step="citations", type="citations", phase="after", duration_seconds=0.0, detail=detail))

    def _upstream(self, ctx: Context, *, stream: bool):
        """The runner's one upstream call on the rewritten request (the client picks chat or completion)."""
        return self.deps.upstream.generate(
            ctx.model,
            prompt=(ctx.prompt or "") if ctx.messages is None else None,
            messages=ctx.messages,
            sampling=ctx.sampling.with_(n=1) if stream else ctx.sampling,
            stream=stream,
            timeout=ctx.remaining(),
            request_id=ctx.request.request_id,
        )

    async def _streamed(self, ctx: Context, result: GenerateResult, *, incremental: bool) -> AsyncIterator[str]:
        """The answer as vLLM generates it, minus a held-back tail the moderating steps have not yet vetted.

        Sets ctx.refusal (and stops) when a moderating step blocks; the upstream request is
        closed before this returns, so vLLM stops generating.
        """
        pieces: list[str] = []
        generated = released = checked = 0
        checks = _Checks(self, ctx)
        upstream_started = time.perf_counter()
        try:
            async with contextlib.aclosing(self._upstream(ctx, stream=True)) as deltas:
                async for delta in deltas:
                    if delta.prompt_tokens is not None:
                        result.usage = Usage(delta.prompt_tokens, delta.completion_tokens or 0)
                    if delta.upstream_url:
                        result.upstream_url = delta.upstream_url
                    if delta.finish_reason:
                        result.finish_reason = delta.finish_reason
                    if not delta.text:
                        continue
                    pieces.append(delta.text)
                    generated += len(delta.text)
                    if not self.moderators:
                        released = generated
                        yield delta.text
                        continue
                    if generated - checked < self.check_every:
                        continue
                    checked = generated
                    text = "".join(pieces)
                    pieces = [text]
                    if await checks.run(text, final=False):
                        break
                    if generated - self.holdback > released:
                        yield text[released : generated - self.holdback]
                        released = generated - self.holdback
            # The upstream stream is closed here, whether it ended or a check blocked it.
            result.upstream_seconds = time.perf_counter() - upstream_started
            text = "".join(pieces)
            if ctx.refusal is None and self.moderators and not await checks.run(text, final=True):
                if len(text) > released:
                    yield text[released:]
                released = len(text)
            if ctx.refusal is not None and incremental:
                metrics.STREAM_EXPOSED_CHARS.labels(policy=self.policy.name).observe(released)
        finally:
            checks.record(result.trace)
        result.finish_reason = result.finish_reason or "stop"

    async def _whole(self, ctx: Context, result: GenerateResult) -> AsyncIterator[str]:
        """Generate all candidates, run the after-hooks and selection, yield the chosen answer in one piece."""
        trace = result.trace
        upstream_started = time.perf_counter()
        if self.generator is not None:
            completion = await self._timed(ctx, self.generator, "generate", self.generator.generate(ctx), trace)
        else:
            completion = await self._upstream(ctx, stream=False)
        result.upstream_seconds = time.perf_counter() - upstream_started
        result.upstream_url = completion.upstream_url
        result.usage = Usage(completion.prompt_tokens, completion.completion_tokens)
        ctx.candidates = [
            Candidate(
                index=choice.index,
                text=choice.text,
                raw_text=choice.text,
                finish_reason=choice.finish_reason,
                token_logprobs=choice.token_logprobs,
            )
            for choice in completion.choices
        ]
        chosen = await self._after(ctx, trace)
        if self.selector is not None:
            result.candidates = tuple(_candidate_answer(c) for c in ctx.candidates)
        if chosen is None:
            ctx.refusal = next(c.refusal for c in ctx.candidates if c.refusal is not None)
            return
        ctx.chosen = chosen
        if chosen.notes and len(ctx.candidates) == 1:
            trace.append(TraceEntry(step="answer", type="answer", phase="after", duration_seconds=0.0, detail=chosen.notes))
        result.finish_reason = chosen.finish_reason or "stop"
        if chosen.text:
            yield chosen.text


class _Checks:
    """The moderating steps' check_partial calls over one stream: first refusal wins; one trace entry per step."""

    def __init__(self, pipeline: Pipeline, ctx: Context) -> None:
        self.pipeline = pipeline
        self.ctx = ctx
        self.seconds = {step: 0.0 for step in pipeline.moderators}
        self.details: dict[Step, dict] = {step: {"checks": 0} for step in pipeline.moderators}
        self.checked = 0  # characters of the answer every step has vetted

    async def run(self, text: str, *, final: bool) -> Refusal | None:
        """Sets ctx.refusal and returns it when a step blocks."""
        ctx = self.ctx
        for step in self.pipeline.moderators:
            ctx.detail = self.details[step]
            started = time.perf_counter()
            refusal = await step.check_partial(ctx, text, final=final, checked=self.checked)
            self.seconds[step] += time.perf_counter() - started
            ctx.detail["checks"] += 1
            if refusal is not None:
                ctx.detail.update(blocked_at_chars=len(text), final=final)
                ctx.refusal = refusal
                return refusal
        self.checked = len(text)
        return None

    def record(self, trace: list[TraceEntry]) -> None:
        for step in self.pipeline.moderators:
            if self.details[step]["checks"]:
                self.pipeline._record(step, "after", self.seconds[step], self.details[step], trace)


class Pipelines:
    """Pipeline per policy version, built when the policy loads (`build`, the store's builder) or on first use."""

    def __init__(self, deps: StepDeps) -> None:
        self.deps = deps
        self._cache: dict[tuple[str, str], Pipeline] = {}

    def build(self, loaded: LoadedPolicy) -> Pipeline:
        """Builds (or finds) the pipeline of this policy version. Raises PolicyBuildError."""
        key = (loaded.policy.name, loaded.version)
        pipeline = self._cache.get(key)
        if pipeline is None:
            pipeline = Pipeline(loaded, self.deps)
            # Older versions of the policy are no longer served: drop them.
            for old in [k for k in self._cache if k[0] == key[0]]:
                del self._cache[old]
            self._cache[key] = pipeline
        return pipeline

    def get(self, loaded: LoadedPolicy) -> Pipeline:
        return self.build(loaded)


def _candidate_answer(candidate: Candidate) -> CandidateAnswer:
    """A candidate for the audit log. A refused one has no score: with refused=penalize the score a refused
    candidate got was its refusal text's, not its own."""
    refusal = candidate.refusal
    score = candidate.notes.get("reward") if refusal is None else None
    return CandidateAnswer(candidate.index, candidate.text, score, refusal.step if refusal is not None else "")


def _build_step(index: int, config, deps: StepDeps) -> Step:
    try:
        return step_class(config.type)(config, deps)
    except Exception as exc:  # noqa: BLE001 - any failure to build means the policy cannot run
        raise PolicyBuildError(("steps", index), f"cannot build {config.type} step: {exc}") from exc
