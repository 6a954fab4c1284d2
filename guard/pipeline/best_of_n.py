"""best_of_n: sample n candidates in one upstream call, score them with a reward source, pick one.

One call with n (not n calls) is one round trip whose samples decode in one batch. Its usage counts
the prompt once, but vLLM runs each sample as its own engine request that prefills the prompt,
sharing only prefix-cache blocks computed earlier (benchmarks/speculative_rejection.py measures
both). Other steps' after-hooks (output filters, chain-of-thought extraction) have already run on
every candidate when select() runs, so candidates are scored on the text the client would receive.
"""

from __future__ import annotations

import math
from typing import Any

from guard.concurrency import gather_or_cancel
from guard.pipeline.base import Candidate, Context, Step, StepDeps, register_step
from guard.policy.model import BestOfNStep
from guard.rerank import RerankError
from guard.types import Choice, Completion, Message


@register_step("best_of_n")
class BestOfN(Step[BestOfNStep]):
    streamable = False  # the answer is known only once every candidate is complete
    selects = True

    def __init__(self, config: BestOfNStep, deps: StepDeps) -> None:
        super().__init__(config, deps)
        self.generates = config.speculative_rejection is not None

    async def before(self, ctx: Context) -> None:
        ctx.sampling = ctx.sampling.with_(n=self.config.n, temperature=self.config.temperature, top_p=self.config.top_p)

    async def generate(self, ctx: Context) -> Completion:
        """Speculative rejection: grow all n candidates a chunk at a time, dropping the worst partial ones.

        Runs before the other steps' after-hooks, so output filters and answer extraction still see
        every surviving candidate's full text.
        """
        rejection = self.config.speculative_rejection
        assert rejection is not None
        reranker = self.deps.reranker
        budget = ctx.sampling.max_tokens or 256
        seed = ctx.sampling.seed
        first = await self._extend(ctx, None, min(rejection.chunk_tokens, budget), n=self.config.n, seed=seed)
        live = [[choice.text, choice.finish_reason] for choice in first.choices]
        grown, rounds = min(rejection.chunk_tokens, budget), []
        # Every token the upstream processed: the first call's prompt once (vLLM reports it once for
        # its n samples), each continuation's prompt (prompt + the partial answer it re-sends), and
        # every call's completion tokens.
        prompt_tokens, completion_tokens, calls, generation_rounds = first.prompt_tokens, first.completion_tokens, 1, 1
        request = ctx.request
        prompt = request.messages if request.messages is not None else (request.prompt or "")
        while grown < budget:
            unfinished = [i for i, (_, reason) in enumerate(live) if reason == "length"]
            if not unfinished:
                break
            keep = max(rejection.min_candidates, math.ceil(len(unfinished) * rejection.keep_fraction))
            if keep < len(unfinished):
                try:
                    scores = await reranker.score(self.config.reward, prompt, [live[i][0] for i in unfinished])
                except RerankError as exc:
                    if self.config.on_error == "fail":
                        raise
                    scores = [0.0] * len(unfinished)  # no signal: keep the first `keep`, as on_error=first would
                    ctx.detail["error"] = str(exc)
                ranked = sorted(zip(scores, unfinished), reverse=True)
                pruned = {i for _, i in ranked[keep:]}
                live = [entry for i, entry in enumerate(live) if i not in pruned]
                rounds.append({"after_tokens": grown, "unfinished": len(unfinished), "pruned": len(pruned)})
                unfinished = [i for i, (_, reason) in enumerate(live) if reason == "length"]
            chunk = min(rejection.chunk_tokens, budget - grown)
            # vLLM seeds one call's samples seed, seed+1, ...: a continuation with the request's seed would
            # replay one random stream every round (seen with Gemma: the survivor looped with the chunk's period).
            # Each continuation gets its own seed, past the first call's, so a seeded request stays reproducible.
            seeds = [None if seed is None else seed + self.config.n + calls - 1 + j for j in range(len(unfinished))]
            extended = await gather_or_cancel(
                *(self._extend(ctx, live[i][0], chunk, n=1, seed=s) for i, s in zip(unfinished, seeds, strict=True))
            )
            for i, more in zip(unfinished, extended, strict=True):
                live[i][0] += more.choices[0].text
                live[i][1] = more.choices[0].finish_reason
                prompt_tokens += more.prompt_tokens
                completion_tokens += more.completion_tokens
            grown += chunk
            calls += len(extended)
            generation_rounds += 1
        ctx.detail.update(
            rounds=rounds,
            generation_rounds=generation_rounds,
            upstream_calls=calls,
            upstream_prompt_tokens=prompt_tokens,
            resent_prompt_tokens=prompt_tokens - first.prompt_tokens,
            upstream_completion_tokens=completion_tokens,
        )
        choices = tuple(Choice(index=i, text=text, finish_reason=reason) for i, (text, reason) in enumerate(live))
        # Usage is what the upstream processed (OpenAI usage is what was billed), so the client sees the
        # re-sent prompts too: a plain best_of_n's usage would understate this policy's cost.
        return Completion(choices, prompt_tokens, completion_tokens, first.model, first.upstream_url)

    async def _extend(
        self, ctx: Context, partial: str | None, max_tokens: int, *, n: int, seed: int | None
    ) -> Completion:
        """n fresh candidates (partial=None), or one continuation of a partial candidate."""
        messages, prompt = ctx.messages, None
        if messages is None:
            prompt = (ctx.prompt or "") + (partial or "")
        elif partial is not None:
            messages = [*messages, Message("assistant", partial)]
        return await self.deps.upstream.generate(
            ctx.model,
            prompt=prompt,
            messages=messages,
            sampling=ctx.sampling.with_(n=n, max_tokens=max_tokens, seed=seed),
            stream=False,
            timeout=ctx.remaining(),
            continue_final_message=partial is not None,
            request_id=ctx.request.request_id,
        )

    async def select(self, ctx: Context) -> Candidate | None:
        config = self.config
        reranker = self.deps.reranker
        if reranker is None:
            raise RuntimeError("best_of_n needs a Reranker in StepDeps")
        # With refused=penalize a refused candidate competes as its refusal text.
        pool = [c for c in ctx.candidates if c.refusal is None or config.refused == "penalize"]
        ctx.detail["candidates"] = [_entry(c) for c in ctx.candidates]
        ctx.detail["chosen"] = None
        if not pool:
            return None  # every candidate refused: the runner answers with the refusal

        texts = [c.text if c.refusal is None else c.refusal.text for c in pool]
        # Score against what the client asked, not the rewritten prompt: before-hooks may have
        # added instructions (e.g. chain-of-thought format) that the final text no longer follows.
        request = ctx.request
        prompt = request.messages if request.messages is not None else (request.prompt or "")
        try:
            scores = await reranker.score(config.reward, prompt, texts, timeout=ctx.remaining())
        except RerankError as exc:
            if config.on_error == "fail":
                raise
            ctx.detail["error"] = str(exc)
            fallback = next((c for c in ctx.candidates if c.refusal is None), None)
            ctx.detail["chosen"] = fallback.index if fallback is not None else None
            return fallback

        penalties = []
        for candidate, text, score, entry in zip(pool, texts, scores, _entries_for(ctx, pool), strict=True):
            length_penalty = config.length_penalty * len(text) / 1000.0
            refused_penalty = config.refused_penalty if candidate.refusal is not None else 0.0
            penalties.append(length_penalty + refused_penalty)
            entry.update(score=score, length_penalty=length_penalty, refused_penalty=refused_penalty)
            candidate.notes["reward"] = score
        [choice] = reranker.select(
            [scores], [penalties], rule=config.selection, tau=config.tau, normalize=config.normalize, seed=ctx.sampling.seed
        )
        chosen = pool[choice]
        ctx.detail["chosen"] = chosen.index
        ctx.detail["chosen_score"] = scores[choice]
        reranker.observer.chosen(ctx.policy.name, scores[choice])
        # A refused candidate that still wins means the refusal answers.
        return chosen if chosen.refusal is None else None


def _entry(candidate: Candidate) -> dict[str, Any]:
    """A candidate as the trace shows it. A candidate that was not refused carries its text (a labelling UI
    shows the alternatives, and a user picks a preferred index); a refused one never does: the trace goes to
    clients, and that text was refused. The audit log keeps every candidate's text apart (GenerateResult.candidates)."""
    entry: dict[str, Any] = {"index": candidate.index}
    if candidate.refusal is not None:
        entry["refused_by"] = candidate.refusal.step
        entry["refused_rule"] = candidate.refusal.rule
    else:
        entry["text"] = candidate.text
    return entry


def _entries_for(ctx: Context, pool: list[Candidate]) -> list[dict[str, Any]]:
    by_index = {entry["index"]: entry for entry in ctx.detail["candidates"]}
    return [by_index[c.index] for c in pool]
