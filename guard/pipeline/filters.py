"""input_filter / output_filter: refuse with a template when a safety rule matches.

What is checked: an input filter reads exactly what the client sent (the raw prompt, or the
content of every client message of the configured roles, newest first) and never text a
policy step added; an output filter reads each candidate answer.

Rules run in order, cheapest first, and the first match refuses:
  1. pattern rules (keywords, regexes) on each normalised view of the text, in a worker
     thread with a time budget per rule;
  2. semantic rules (similarity to harmful vs benign exemplars) and classifier rules
     (a trained head on sentence embeddings), over overlapping windows of each text;
  3. guard-model rules (a safety model served by vLLM).
If a rule itself fails (model missing, time budget spent, input too long, guard model down),
the rule's or else the filter's on_error decides: refuse (fail closed) or allow (fail open,
counted in guard_filter_fail_open_total and flagged in the trace).
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from guard import metrics
from guard.pipeline.base import Candidate, Context, Step, StepDeps, register_step
from guard.policy.model import ClassifierRule, FilterStepBase, InputFilterStep, OutputFilterStep
from guard.safety.classifier import Artefact, Head, encoder_spec, load_artefact
from guard.safety.embedder import EncoderSpec, model_path
from guard.safety.guard_model import GuardModelChecker
from guard.safety.normalize import views
from guard.safety.patterns import PatternSet
from guard.safety.windows import TooManyWindows, all_windows, windows_since
from guard.types import Message, Refusal

log = logging.getLogger(__name__)

# Semantic rules compare short requests; their windows follow the classifier's default.
SEMANTIC_WINDOW_WORDS, SEMANTIC_WINDOW_STRIDE, SEMANTIC_MAX_WINDOWS = 32, 16, 512
# The stretch of a growing answer re-read at each streaming check; a rule's match must fit in it.
STREAM_WINDOW_WORDS = 96
_UNFINISHED_WORD = re.compile(r"\w*$")


class FilterError(Exception):
    """A rule could not give a verdict; on_error decides."""

    def __init__(self, rule: str, message: str, on_error: str) -> None:
        super().__init__(message)
        self.rule = rule
        self.on_error = on_error


@dataclass(frozen=True)
class _Classifier:
    """A classifier rule with its artefact loaded."""

    rule: ClassifierRule
    artefact: Artefact
    head: Head
    encoder: EncoderSpec
    threshold: float

    @classmethod
    def load(cls, rule: ClassifierRule) -> _Classifier:
        artefact, head = load_artefact(rule.artefact)
        threshold = rule.threshold if rule.threshold is not None else artefact.threshold
        return cls(rule, artefact, head, encoder_spec(artefact), threshold)


class _Filter(Step[FilterStepBase]):
    stage: str

    def __init__(self, config: FilterStepBase, deps: StepDeps) -> None:
        super().__init__(config, deps)
        # Everything compiled and loaded once per policy version, at policy load.
        self.patterns = PatternSet(
            [(rule.name, rule.keywords, rule.regex) for rule in config.rules], budget_seconds=config.pattern_budget_seconds
        )
        self.classifiers = [_Classifier.load(rule) for rule in config.classifiers]
        self.guard_models = [GuardModelChecker(rule, deps.upstream_at(rule.url), deps.default_model) for rule in config.guard_models]
        # A model directory that is not there fails the policy at load, not its first request.
        for spec in self.encoders():
            model_path(spec.model)
        self._exemplars: dict[str, asyncio.Future[np.ndarray]] = {}
        if (config.semantic or config.classifiers) and deps.embedders is None:
            raise ValueError("semantic and classifier rules need an embedding runtime")

    def encoders(self) -> set[EncoderSpec]:
        """The encoders this filter embeds with: the server loads them before serving."""
        return {EncoderSpec(rule.model.model) for rule in self.config.semantic} | {c.encoder for c in self.classifiers}

    # -- the rules ------------------------------------------------------------

    async def _verdict(self, ctx: Context, texts: Sequence[str], conversation: Sequence[Message], response: str | None) -> str | None:
        if sum(len(text) for text in texts) > self.config.max_chars:
            raise FilterError("max_chars", f"input longer than max_chars={self.config.max_chars}", self.config.on_error)
        # Normalising megabytes and matching take milliseconds to seconds: never on the event loop.
        text_views, matched = await asyncio.to_thread(self._views_and_patterns, texts)
        if matched is not None:
            return matched
        plain_views = [v[0] for v in text_views]
        folded_views = [v[1] for v in text_views if len(v) > 1]
        embedded: dict[tuple[EncoderSpec, int, int], np.ndarray] = {}

        async def embed(spec: EncoderSpec, words: int, stride: int, limit: int, rule: str) -> np.ndarray:
            key = (spec, words, stride)
            if key not in embedded:
                try:
                    chunks = all_windows([*plain_views, *folded_views], words=words, stride=stride, limit=limit)
                except TooManyWindows as exc:
                    raise FilterError(rule, str(exc), self.config.on_error) from exc
                embedded[key] = await self.deps.embedders.encode(spec, chunks)
            return embedded[key]

        for rule in self.config.semantic:
            vectors = await embed(EncoderSpec(rule.model.model), SEMANTIC_WINDOW_WORDS, SEMANTIC_WINDOW_STRIDE, SEMANTIC_MAX_WINDOWS, rule.name)
            harmful_ex, benign_ex = await self._exemplar_vectors(rule)
            if not len(vectors):
                continue
            harmful = (vectors @ harmful_ex.T).max(axis=1)
            benign = (vectors @ benign_ex.T).max(axis=1) if len(benign_ex) else np.full(len(vectors), -1.0)
            hit = (harmful >= rule.threshold) & (harmful - benign >= rule.margin)
            ctx.detail.setdefault("similarity", {})[rule.name] = {"harmful": float(harmful.max()), "benign": float(benign.max())}
            if hit.any():
                return rule.name

        for classifier in self.classifiers:
            rule, cut = classifier.rule, classifier.artefact.windows
            vectors = await embed(classifier.encoder, cut.words, cut.stride, rule.max_windows, rule.name)
            if not len(vectors):
                continue
            score = float(classifier.head.probabilities(vectors).max())
            ctx.detail.setdefault("classifier", {})[rule.name] = round(score, 4)
            if score >= classifier.threshold:
                return rule.name

        for checker in self.guard_models:
            rule = checker.config
            on_error = rule.on_error or self.config.on_error
            try:
                verdict = await checker.check(conversation, response)
            except Exception as exc:  # noqa: BLE001 - GuardModelError and anything the checker did not foresee
                raise FilterError(rule.name, f"guard model {rule.name!r} failed: {exc}", on_error) from exc
            ctx.detail.setdefault("guard_model", {})[rule.name] = {
                "unsafe": verdict.unsafe, "categories": list(verdict.categories), "score": verdict.score
            }
            if verdict.unsafe:
                return rule.name
        return None

    def _views_and_patterns(self, texts: Sequence[str]) -> tuple[list[tuple[str, ...]], str | None]:
        text_views = [views(text) for text in texts]
        if not self.patterns:
            return text_views, None
        for text_view in text_views:
            matched = self.patterns.first_match(text_view)
            if matched is not None:
                return text_views, matched
        return text_views, None

    async def _exemplar_vectors(self, rule) -> tuple[np.ndarray, np.ndarray]:
        """A semantic rule's exemplars, embedded once per policy version (shared by concurrent requests)."""
        future = self._exemplars.get(rule.name)
        if future is None or (future.done() and future.exception() is not None):
            future = asyncio.ensure_future(self.deps.embedders.encode(EncoderSpec(rule.model.model), [*rule.harmful, *rule.benign]))
            self._exemplars[rule.name] = future
        vectors = await asyncio.shield(future)
        return vectors[: len(rule.harmful)], vectors[len(rule.harmful) :]

    async def _check(
        self, ctx: Context, texts: Sequence[str], conversation: Sequence[Message], response: str | None = None
    ) -> Refusal | None:
        refusal_text = self.config.refusal or ctx.policy.refusal
        try:
            rule = await self._verdict(ctx, texts, conversation, response)
        except Exception as exc:  # noqa: BLE001 - the fail mode is the operator's choice
            failed_rule = exc.rule if isinstance(exc, FilterError) else ""
            on_error = exc.on_error if isinstance(exc, FilterError) else self.config.on_error
            if not isinstance(exc, FilterError) or exc.__cause__ is not None:
                log.warning("filter %s: %s", self.name, exc, exc_info=not isinstance(exc, FilterError))
            ctx.detail["error"] = str(exc)
            if on_error == "allow":
                metrics.FILTER_FAIL_OPEN.labels(policy=ctx.policy.name, step=self.name, rule=failed_rule or "filter").inc()
                ctx.detail["fail_open"] = True
                return None
            return Refusal(self.stage, self.name, failed_rule, f"filter failed ({exc}); on_error=refuse", refusal_text)
        if rule is None:
            return None
        return Refusal(self.stage, self.name, rule, f"matched rule {rule!r}", refusal_text)


def client_texts(ctx: Context, roles: Sequence[str]) -> list[str]:
    """What the client sent, newest first: never the text policy steps added (ctx.request is untouched)."""
    request = ctx.request
    if request.messages is None:
        return [request.prompt or ""]
    return [m.content for m in reversed(request.messages) if m.role in roles]


def client_conversation(ctx: Context) -> list[Message]:
    request = ctx.request
    if request.messages is None:
        return [Message("user", request.prompt or "")]
    return list(request.messages)


@register_step("input_filter")
class InputFilter(_Filter):
    stage = "input"
    config: InputFilterStep

    async def before(self, ctx: Context) -> None:
        texts = client_texts(ctx, self.config.roles)
        if ctx.request.messages is not None and len(texts) > 1:
            # A request split over turns ("how do I make a" / "pipe bomb") is also read as one text.
            texts.append("\n".join(reversed(texts)))
        refusal = await self._check(ctx, texts, client_conversation(ctx))
        ctx.detail["matched"] = refusal.rule if refusal else None
        if refusal is not None:
            ctx.refusal = refusal


@register_step("output_filter")
class OutputFilter(_Filter):
    stage = "output"
    config: OutputFilterStep
    streamable = True
    moderates_stream = True

    def __init__(self, config: OutputFilterStep, deps: StepDeps) -> None:
        super().__init__(config, deps)
        # A guard model is one upstream call: too slow to vet every window of a stream, so buffer.
        if config.guard_models:
            self.streamable = False
            self.moderates_stream = False

    async def after(self, ctx: Context, candidate: Candidate) -> None:
        refusal = await self._check(ctx, [candidate.text], client_conversation(ctx), candidate.text)
        if refusal is not None:
            candidate.refusal = refusal

    async def check_partial(self, ctx: Context, text: str, *, final: bool, checked: int = 0) -> Refusal | None:
        """While streaming, read every word written since the last check (`checked` characters ago)
        in windows that reach back over it, so a match split across chunks is seen whole however much
        text one chunk brought; at the end, read the whole answer."""
        if not final:
            # The last word may be unfinished ("pipe bomb" of "pipe bombastic"): it is read next time,
            # since the runner holds back at least the newest characters until a later check.
            text = text[: len(text) - len(_UNFINISHED_WORD.search(text).group(0))]
            if not text.strip():
                return None
            # The word at the old end may have grown since: it is read again.
            since_word = max(0, len(text[:checked].split()) - 1)
            parts = windows_since(text, words=STREAM_WINDOW_WORDS, since_word=since_word)
            return await self._check(ctx, parts, client_conversation(ctx), parts[-1])
        return await self._check(ctx, [text], client_conversation(ctx), text)
