"""input_filter / output_filter: pattern and similarity rules that refuse with a template.

Keywords match case-insensitively on word boundaries; regexes match
case-insensitively. Semantic rules compare sentence embeddings of the text with
harmful and benign exemplars (through the injected reranker's embedding model).
The first matching rule refuses. If a rule itself fails (say the embedding model
cannot load), the filter's on_error decides: refuse (fail closed) or allow (fail open).
"""

from __future__ import annotations

import logging
import re

from guard.pipeline.base import Candidate, Context, Step, register_step
from guard.policy.model import FilterStepBase, InputFilterStep, OutputFilterStep
from guard.types import Refusal

log = logging.getLogger(__name__)


class _PatternFilter(Step[FilterStepBase]):
    stage: str

    def __init__(self, config, deps) -> None:
        super().__init__(config, deps)
        # Compiled once per policy version, not per request.
        self._rules: list[tuple[str, re.Pattern[str]]] = [(rule.name, rule.compiled()) for rule in config.rules]

    def _match(self, text: str) -> str | None:
        for name, pattern in self._rules:
            if pattern.search(text):
                return name
        return None

    async def _match_semantic(self, ctx: Context, text: str) -> str | None:
        if not self.config.semantic:
            return None
        reranker = self.deps.reranker
        if reranker is None:
            raise RuntimeError("semantic rules need a reranker (embedding model)")
        for rule in self.config.semantic:
            exemplars = [*rule.harmful, *rule.benign]
            # The embedding reward is cosine(text, exemplar): the text plays the prompt, exemplars the candidates.
            similarities = await reranker.score(rule.model, text, exemplars)
            harmful = max(similarities[: len(rule.harmful)])
            benign = max(similarities[len(rule.harmful) :], default=-1.0)
            ctx.detail.setdefault("similarity", {})[rule.name] = {"harmful": harmful, "benign": benign}
            if harmful >= rule.threshold and harmful - benign >= rule.margin:
                return rule.name
        return None

    async def _check(self, ctx: Context, text: str) -> Refusal | None:
        refusal_text = self.config.refusal or ctx.policy.refusal
        try:
            rule = self._match(text) or await self._match_semantic(ctx, text)
        except Exception as exc:  # noqa: BLE001 - the fail mode is the operator's choice
            log.exception("filter %s failed", self.name)
            if self.config.on_error == "allow":
                ctx.detail["error"] = repr(exc)
                return None
            return Refusal(self.stage, self.name, "", f"filter failed ({exc!r}); on_error=refuse", refusal_text)
        if rule is None:
            return None
        return Refusal(self.stage, self.name, rule, f"matched rule {rule!r}", refusal_text)


@register_step("input_filter")
class InputFilter(_PatternFilter):
    stage = "input"
    config: InputFilterStep

    async def before(self, ctx: Context) -> None:
        refusal = await self._check(ctx, ctx.user_text(tuple(self.config.roles)))
        ctx.detail["matched"] = refusal.rule if refusal else None
        if refusal is not None:
            ctx.refusal = refusal


@register_step("output_filter")
class OutputFilter(_PatternFilter):
    stage = "output"
    streamable = False  # a match can only be ruled out once the whole answer is known
    config: OutputFilterStep

    async def after(self, ctx: Context, candidate: Candidate) -> None:
        refusal = await self._check(ctx, candidate.text)
        if refusal is not None:
            candidate.refusal = refusal
