"""retrieve: put the operator's most relevant document chunks into the prompt as numbered sources.

The query is the client's last user turn as the client sent it (ctx.request, never text another
step added), embedded with the index's own encoder on the embedding thread; the index is searched
in a worker thread. The top_k chunks at or above min_score are numbered 1..n and added, with the
instruction to cite them as [n], after the system message (before a raw prompt). What the step adds
is policy text: input filters never read it (they read ctx.request), so a forbidden word in a manual
cannot refuse a harmless question. The runner maps the answer's [n] back to the chunks
(`GenerateResult.sources`).
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass

from guard.pipeline.base import Context, Step, StepDeps, register_step
from guard.pipeline.system_prompt import add_prompt_text, add_system_text
from guard.policy.model import RetrieveStep
from guard.retrieval.citations import cited_numbers
from guard.retrieval.index import Hit, Index
from guard.safety.embedder import EncoderSpec, model_path
from guard.types import GenerateInput, Source

# The end of a long turn is embedded (the question usually closes it); the encoder reads ~256 word pieces anyway.
QUERY_CHARS = 2000


@dataclass(frozen=True)
class Retrieved:
    """The sources one request was given, and the index version they came from."""

    index: Index
    hits: tuple[Hit, ...]

    def sources(self, answer: str) -> tuple[tuple[Source, ...], list[int]]:
        """The sources, each marked cited when the answer cites its number; and cited numbers no source has."""
        cited = cited_numbers(answer)
        sources = tuple(
            Source(n, hit.id, hit.document, hit.heading, hit.text, hit.score, cited=n in cited)
            for n, hit in enumerate(self.hits, 1)
        )
        return sources, [n for n in cited if not 1 <= n <= len(self.hits)]


def last_user_turn(request: GenerateInput) -> str:
    if request.messages is None:
        text = request.prompt or ""
    else:
        text = next((m.content for m in reversed(request.messages) if m.role == "user"), "")
    return text[-QUERY_CHARS:]


@register_step("retrieve")
class Retrieve(Step[RetrieveStep]):
    def __init__(self, config: RetrieveStep, deps: StepDeps) -> None:
        super().__init__(config, deps)
        if deps.indexes is None or deps.embedders is None:
            raise ValueError("retrieve needs the index registry and the embedding runtime")
        self.handle = deps.indexes.open(config.index)  # BrokenIndex: the policy is rejected at its line
        model_path(self.handle.index.encoder.model)  # the index's encoder must be here too
        # A policy loaded while serving: its encoder loads now, in the background, not on its first request.
        # (The server awaits the encoders of the policies it starts with; an offline check has no loop.)
        self._warming = None
        with contextlib.suppress(RuntimeError):
            self._warming = asyncio.get_running_loop().create_task(deps.embedders.warm(self.handle.index.encoder))

    def encoders(self) -> set[EncoderSpec]:
        """The server loads these before serving (the encoder of the index as it is now)."""
        return {self.handle.index.encoder}

    async def before(self, ctx: Context) -> None:
        index = self.handle.index  # this request's version, whatever a reload swaps in meanwhile
        query = last_user_turn(ctx.request)
        ctx.detail["index_version"] = index.version
        if not query.strip():
            ctx.detail["sources"] = []
            return
        [vector] = await self.deps.embedders.encode(index.encoder, [query])
        found = await asyncio.to_thread(index.search, vector, self.config.top_k)
        hits = tuple(hit for hit in found if hit.score >= self.config.min_score)
        ctx.detail["sources"] = [{"n": n, "id": hit.id, "score": round(hit.score, 4)} for n, hit in enumerate(hits, 1)]
        if len(hits) < len(found):
            # What the floor kept out, for tuning min_score.
            ctx.detail["below_min_score"] = {"count": len(found) - len(hits), "best": round(found[len(hits)].score, 4)}
        if not hits:
            return
        ctx.retrieved = Retrieved(index, hits)
        block = self.config.template.format(sources="\n".join(self._source(n, hit) for n, hit in enumerate(hits, 1)))
        if ctx.messages is not None:
            ctx.messages = add_system_text(ctx.messages, block, "append")
        else:
            ctx.prompt = add_prompt_text(ctx.prompt or "", block, "prepend")

    def _source(self, n: int, hit: Hit) -> str:
        return self.config.source_template.format(
            n=n, id=hit.id, document=hit.document, heading=hit.heading, text=hit.text, score=round(hit.score, 3)
        )
