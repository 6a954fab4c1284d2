"""Runs a policy's steps around one upstream call.

`Pipeline` is built once per policy version (steps compile their rules then);
`Pipelines` caches them and rebuilds when the policy store hands out a new version.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

from guard import metrics
from guard.pipeline import best_of_n, chain_of_thought, filters, system_prompt  # noqa: F401 - registers the steps
from guard.pipeline.base import Candidate, Context, Step, StepDeps, step_class
from guard.policy.loader import LoadedPolicy
from guard.types import GenerateInput, GenerateResult, Refusal, TraceEntry, Usage


@dataclass
class TextDelta:
    """A piece of streamed answer text."""

    text: str


class Pipeline:
    def __init__(self, loaded: LoadedPolicy, deps: StepDeps, default_model: str) -> None:
        self.loaded = loaded
        self.policy = loaded.policy
        self.deps = deps
        self.model = self.policy.model or default_model
        self.steps: list[Step] = [step_class(config.type)(config, deps) for config in self.policy.steps]
        self.selector = next((step for step in self.steps if step.selects), None)
        self.generator = next((step for step in self.steps if step.generates), None)
        # Streaming passes deltas straight through only if no step needs the whole answer.
        self.streams_directly = all(step.streamable for step in self.steps)

    def _context(self, request: GenerateInput, deadline: float | None) -> Context:
        return Context(
            request=request,
            policy=self.policy,
            policy_version=self.loaded.version,
            model=self.model,
            sampling=request.sampling.merged_over(self.policy.sampling.to_sampling()),
            prompt=request.prompt,
            messages=list(request.messages) if request.messages is not None else None,
            deadline=deadline,
        )

    def _result(self, ctx: Context, started: float) -> GenerateResult:
        return GenerateResult(
            text="",
            finish_reason="",
            policy=self.policy.name,
            policy_version=self.loaded.version,
            upstream_model=self.model,
            total_seconds=time.perf_counter() - started,
        )

    async def _timed(self, ctx: Context, step: Step, phase: str, call, trace: list[TraceEntry]):
        ctx.detail = {}
        started = time.perf_counter()
        outcome = await call
        elapsed = time.perf_counter() - started
        metrics.STEP_SECONDS.labels(policy=self.policy.name, step=step.name, phase=phase).observe(elapsed)
        trace.append(TraceEntry(step=step.name, type=step.type, phase=phase, duration_seconds=elapsed, detail=ctx.detail))
        return outcome

    async def _before(self, ctx: Context, trace: list[TraceEntry]) -> None:
        for step in self.steps:
            if not step.has_before:
                continue
            await self._timed(ctx, step, "before", step.before(ctx), trace)
            if ctx.refusal is not None:
                return

    def _remaining(self, ctx: Context) -> float | None:
        return None if ctx.deadline is None else ctx.deadline - time.monotonic()

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

    def _refuse(self, result: GenerateResult, refusal: Refusal) -> GenerateResult:
        metrics.REFUSALS.labels(policy=self.policy.name, step=refusal.step, stage=refusal.stage).inc()
        result.text = refusal.text
        result.finish_reason = "refused"
        result.refusal = refusal
        return result

    def _count_tokens(self, usage: Usage) -> None:
        metrics.TOKENS.labels(policy=self.policy.name, kind="prompt").inc(usage.prompt_tokens)
        metrics.TOKENS.labels(policy=self.policy.name, kind="completion").inc(usage.completion_tokens)

    async def run(self, request: GenerateInput, *, deadline: float | None = None) -> GenerateResult:
        started = time.perf_counter()
        ctx = self._context(request, deadline)
        result = self._result(ctx, started)
        trace = result.trace
        await self._before(ctx, trace)
        if ctx.refusal is not None:
            result.total_seconds = time.perf_counter() - started
            return self._refuse(result, ctx.refusal)

        upstream_started = time.perf_counter()
        if self.generator is not None:
            completion = await self._timed(ctx, self.generator, "generate", self.generator.generate(ctx), trace)
        elif ctx.messages is not None:
            completion = await self.deps.upstream.chat(ctx.model, ctx.messages, ctx.sampling, timeout=self._remaining(ctx))
        else:
            completion = await self.deps.upstream.complete(
                ctx.model, ctx.prompt or "", ctx.sampling, timeout=self._remaining(ctx)
            )
        result.upstream_seconds = time.perf_counter() - upstream_started
        result.upstream_url = completion.upstream_url
        result.usage = Usage(completion.prompt_tokens, completion.completion_tokens)
        self._count_tokens(result.usage)
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
        result.total_seconds = time.perf_counter() - started
        if chosen is None:
            first_refusal = next(c.refusal for c in ctx.candidates if c.refusal is not None)
            return self._refuse(result, first_refusal)
        ctx.chosen = chosen
        if chosen.notes and len(ctx.candidates) == 1:
            trace.append(TraceEntry(step="answer", type="answer", phase="after", duration_seconds=0.0, detail=chosen.notes))
        result.text = chosen.text
        result.finish_reason = chosen.finish_reason or "stop"
        return result

    async def stream(
        self, request: GenerateInput, *, deadline: float | None = None
    ) -> AsyncIterator[TextDelta | GenerateResult]:
        """Yields TextDelta pieces, then the final GenerateResult (whose text is the whole answer)."""
        if not self.streams_directly:
            # Some step needs the whole answer (filters, CoT, best-of-n): generate, then send it in one piece.
            result = await self.run(request, deadline=deadline)
            if result.text:
                yield TextDelta(result.text)
            yield result
            return

        started = time.perf_counter()
        ctx = self._context(request, deadline)
        result = self._result(ctx, started)
        await self._before(ctx, result.trace)
        if ctx.refusal is not None:
            self._refuse(result, ctx.refusal)
            yield TextDelta(result.text)
            result.total_seconds = time.perf_counter() - started
            yield result
            return

        upstream_started = time.perf_counter()
        pieces: list[str] = []
        finish_reason = None
        async for delta in self.deps.upstream.stream(
            ctx.model,
            prompt=ctx.prompt if ctx.messages is None else None,
            messages=ctx.messages,
            sampling=ctx.sampling.with_(n=1),
            timeout=self._remaining(ctx),
        ):
            if delta.text:
                pieces.append(delta.text)
                yield TextDelta(delta.text)
            if delta.finish_reason:
                finish_reason = delta.finish_reason
            if delta.prompt_tokens is not None:
                result.usage = Usage(delta.prompt_tokens, delta.completion_tokens or 0)
        result.upstream_seconds = time.perf_counter() - upstream_started
        self._count_tokens(result.usage)
        result.text = "".join(pieces)
        result.finish_reason = finish_reason or "stop"
        result.total_seconds = time.perf_counter() - started
        yield result


class Pipelines:
    """Pipeline per policy version, built on first use."""

    def __init__(self, deps: StepDeps, default_model: str) -> None:
        self.deps = deps
        self.default_model = default_model
        self._cache: dict[str, Pipeline] = {}

    def get(self, loaded: LoadedPolicy) -> Pipeline:
        pipeline = self._cache.get(loaded.policy.name)
        if pipeline is None or pipeline.loaded.version != loaded.version:
            pipeline = Pipeline(loaded, self.deps, self.default_model)
            self._cache[loaded.policy.name] = pipeline
        return pipeline
