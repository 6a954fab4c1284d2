"""grounding_check: is each sentence of the answer supported by a chunk the retrieve step gave the model?

A sentence is supported when its embedding (citation marks removed; the index's encoder) is at
least `threshold` similar (cosine) to some retrieved chunk: to the chunk's stored vector or to one
of its sentences. Sentence against sentence separates far better than sentence against a whole
chunk (a short true "Descale every 200 shots." scores 0.42 against its chunk, 0.64 against its
sentence; measured on the tests' manuals); chunks' sentences are embedded when first needed and
kept (CHUNK_CACHE). Similarity is topicality, not entailment: an invented claim about another
subject fails, a wrong number on the right subject can pass. Sentences shorter than
`min_words` ("Sure.") are not checked. The answer is grounded when at least `min_supported` of the
checked sentences are; otherwise the trace lists the unsupported sentences with their best score
(on_unsupported: flag) or the answer is refused (refuse). Without retrieved chunks nothing is
supported. The check needs the whole answer, so a policy with it answers in one piece (and a
refusal comes before any text is sent).
"""

from __future__ import annotations

from collections import OrderedDict

import numpy as np

from guard import metrics
from guard.pipeline.base import Candidate, Context, Step, StepDeps, register_step
from guard.pipeline.retrieve import Retrieved
from guard.policy.model import GroundingCheckStep
from guard.retrieval.chunking import split_sentences
from guard.retrieval.citations import without_citations
from guard.types import Refusal

# Chunks whose sentence vectors are kept, per step (a few MB: ~10 sentences x 384 floats each).
CHUNK_CACHE = 2048


def answer_sentences(text: str, min_words: int) -> list[str]:
    sentences = [without_citations(s) for paragraph in text.split("\n") for s in split_sentences(paragraph)]
    return [s for s in sentences if len(s.split()) >= min_words]


@register_step("grounding_check")
class GroundingCheck(Step[GroundingCheckStep]):
    streamable = False

    def __init__(self, config: GroundingCheckStep, deps: StepDeps) -> None:
        super().__init__(config, deps)
        if deps.embedders is None:
            raise ValueError("grounding_check needs the embedding runtime")
        self._sentences: OrderedDict[tuple[str, int], np.ndarray] = OrderedDict()  # (index version, row) -> vectors

    async def _similarity(self, retrieved: Retrieved, sentences: list[str]) -> np.ndarray:
        """(sentences x sources): each answer sentence's best similarity to each source, its vector or its sentences."""
        index, hits = retrieved.index, retrieved.hits
        missing = [hit for hit in hits if (index.version, hit.row) not in self._sentences]
        parts = [split_sentences(hit.text) for hit in missing]
        # One trip to the embedding thread: the answer and the chunks not seen before.
        vectors = await self.deps.embedders.encode(index.encoder, [*sentences, *(s for part in parts for s in part)])
        start = len(sentences)
        for hit, part in zip(missing, parts):
            self._sentences[(index.version, hit.row)] = vectors[start : start + len(part)]
            start += len(part)
        answer = vectors[: len(sentences)]
        similarity = answer @ index.vectors([hit.row for hit in hits]).T
        for column, hit in enumerate(hits):
            own = self._sentences[(index.version, hit.row)]
            self._sentences.move_to_end((index.version, hit.row))
            if len(own):
                similarity[:, column] = np.maximum(similarity[:, column], (answer @ own.T).max(axis=1))
        while len(self._sentences) > CHUNK_CACHE:
            self._sentences.popitem(last=False)
        return similarity

    async def after(self, ctx: Context, candidate: Candidate) -> None:
        config = self.config
        sentences = answer_sentences(candidate.text, config.min_words)
        retrieved = ctx.retrieved
        # One answer: its findings are the step's detail; best_of_n's candidates: one entry each.
        detail = ctx.detail if len(ctx.candidates) == 1 else ctx.detail.setdefault("by_candidate", {}).setdefault(str(candidate.index), {})
        if not sentences:
            detail.update(sentences=0, grounded=True)
            return
        best = np.full(len(sentences), -1.0)
        source = np.zeros(len(sentences), dtype=int)
        if retrieved is not None:
            similarity = await self._similarity(retrieved, sentences)
            best, source = similarity.max(axis=1), similarity.argmax(axis=1) + 1
        supported = best >= config.threshold
        fraction = float(supported.mean())
        grounded = fraction >= config.min_supported
        metrics.GROUNDED_FRACTION.labels(policy=ctx.policy.name).observe(fraction)
        metrics.GROUNDING_ANSWERS.labels(policy=ctx.policy.name, result="grounded" if grounded else "unsupported").inc()
        unsupported = [i for i in range(len(sentences)) if not supported[i]]
        detail.update(
            sentences=len(sentences),
            supported=int(supported.sum()),
            fraction=round(fraction, 4),
            grounded=grounded,
            unsupported=[
                {"sentence": i, "best_score": round(float(best[i]), 4), "best_source": int(source[i]) if retrieved else None}
                for i in unsupported
            ],
        )
        if unsupported:
            # Answer text, at the top of the detail: the audit log keeps it only as the policy's audit.text says
            # (TEXT_DETAIL_KEYS); a client sees it in a trace, as it sees the answer.
            text = "\n".join(sentences[i] for i in unsupported)
            ctx.detail["unsupported_text"] = "\n".join(filter(None, [ctx.detail.get("unsupported_text"), text]))
        if not grounded and config.on_unsupported == "refuse":
            reason = f"{len(unsupported)} of {len(sentences)} sentences below similarity {config.threshold} to every source"
            candidate.refusal = Refusal("output", self.name, "unsupported", reason, config.refusal)
