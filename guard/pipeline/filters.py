"""input_filter / output_filter: pattern rules that refuse with a template.

Keywords match case-insensitively on word boundaries; regexes match
case-insensitively. The first matching rule refuses. If matching itself fails,
the filter's on_error decides: refuse (fail closed) or allow (fail open).
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

    def _check(self, ctx: Context, text: str) -> Refusal | None:
        refusal_text = self.config.refusal or ctx.policy.refusal
        try:
            rule = self._match(text)
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
        refusal = self._check(ctx, ctx.user_text(tuple(self.config.roles)))
        ctx.detail["matched"] = refusal.rule if refusal else None
        if refusal is not None:
            ctx.refusal = refusal


@register_step("output_filter")
class OutputFilter(_PatternFilter):
    stage = "output"
    streamable = False  # a match can only be ruled out once the whole answer is known
    config: OutputFilterStep

    async def after(self, ctx: Context, candidate: Candidate) -> None:
        refusal = self._check(ctx, candidate.text)
        if refusal is not None:
            candidate.refusal = refusal
