"""The retrieve and grounding_check steps over an index of made-up product manuals (the bundled MiniLM, offline),
with an upstream that records what it was sent: the right chunk reaches the model as a numbered source, the
answer's [n] map back to chunks, input filters never read what the step injected, and grounding_check flags
(or refuses) an answer the manuals do not support."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import yaml

from guard import metrics
from guard.pipeline.base import StepDeps
from guard.pipeline.runner import Pipeline, Pipelines, TextDelta
from guard.policy.loader import LoadedPolicy, load_policy_text
from guard.policy.loader import PolicyError
from guard.policy.model import Policy
from guard.retrieval.build import build_index
from guard.retrieval.registry import Indexes
from guard.safety.embedder import Embedders
from guard.types import Choice, Completion, GenerateInput, GenerateResult, Message, StreamDelta
from tests.support.manuals import write_manuals

CHARGE_ANSWER = "A full charge of the X200 takes 4 hours from empty [1]. The battery lasts about 45 minutes on eco [1]."
UNSUPPORTED_ANSWER = "The X200 also doubles as a lawn mower with a petrol engine [1]. It was designed on the Moon [4]."


class RecordingUpstream:
    """Answers every call with `answer` (streamed in small pieces when asked) and records what it was sent."""

    def __init__(self, answer: str) -> None:
        self.answer = answer
        self.calls: list[dict] = []

    def generate(self, model, *, prompt=None, messages=None, sampling, stream, timeout=None, request_id=None, **_):
        self.calls.append({"prompt": prompt, "messages": messages, "stream": stream})
        return self._stream() if stream else self._unary(sampling.n)

    async def _stream(self) -> AsyncIterator[StreamDelta]:
        for start in range(0, len(self.answer), 7):
            yield StreamDelta(0, self.answer[start : start + 7])
        yield StreamDelta(0, "", finish_reason="stop", prompt_tokens=9, completion_tokens=5)

    async def _unary(self, n: int) -> Completion:
        return Completion(tuple(Choice(i, self.answer, "stop") for i in range(n)), 9, 5 * n, "m")

    def sent_text(self) -> str:
        [call] = self.calls
        return call["prompt"] if call["messages"] is None else "\n".join(f"{m.role}: {m.content}" for m in call["messages"])


@pytest.fixture(scope="module")
def embedders():
    runtime = Embedders()
    yield runtime
    runtime.close()


@pytest.fixture(scope="module")
def manuals_index(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("manuals")
    return build_index(write_manuals(root / "docs"), root / "manuals.index").path


@pytest.fixture
def make(embedders, manuals_index):
    indexes = Indexes()

    def pipeline(steps_yaml: str, upstream: RecordingUpstream, name: str = "rag") -> Pipeline:
        steps = yaml.safe_load(steps_yaml.replace("INDEX", str(manuals_index)))
        policy = Policy.model_validate({"name": name, "refusal": "No.", "steps": steps})
        deps = StepDeps(upstream=upstream, embedders=embedders, indexes=indexes, default_model="m")  # type: ignore[arg-type]
        return Pipeline(LoadedPolicy(policy, "v1", "<test>"), deps)

    return pipeline


async def collect(pipe: Pipeline, request: GenerateInput) -> tuple[str, GenerateResult]:
    pieces, final = [], None
    async for event in pipe.stream(request):
        if isinstance(event, TextDelta):
            pieces.append(event.text)
        else:
            final = event
    return "".join(pieces), final


def ask(question: str) -> GenerateInput:
    return GenerateInput(messages=[Message("user", question)])


def detail(result: GenerateResult, step_type: str) -> dict:
    [entry] = [entry for entry in result.trace if entry.type == step_type]
    return entry.detail


RETRIEVE = "[{type: retrieve, index: INDEX, top_k: 2, min_score: 0.3}]"


async def test_the_right_chunk_reaches_the_model_as_a_numbered_source_and_citations_map_back(make):
    upstream = RecordingUpstream(CHARGE_ANSWER + " See also [7].")
    streamed, result = await collect(make(RETRIEVE, upstream), ask("How long does the Aurora vacuum take to charge?"))

    sent = upstream.calls[0]["messages"]
    assert [m.role for m in sent] == ["system", "user"] and sent[1].content == "How long does the Aurora vacuum take to charge?"
    system = sent[0].content
    assert "[1] Aurora X200 cordless vacuum > Charging the battery: Place the X200 on its wall dock. A full charge takes 4 hours" in system
    assert "cite the sources" in system and "like [1]" in system
    # The answer streamed as it was generated (retrieve only adds to the prompt).
    assert streamed == result.text == CHARGE_ANSWER + " See also [7]."
    first, *rest = result.sources
    assert (first.number, first.id, first.document, first.cited) == (1, "aurora-x200.md#0", "aurora-x200.md", True)
    assert "4 hours" in first.text and first.score > 0.3
    assert all(not source.cited for source in rest)
    found = detail(result, "retrieve")["sources"]
    assert found[0] == {"n": 1, "id": "aurora-x200.md#0", "score": pytest.approx(first.score, abs=1e-4)}
    assert detail(result, "citations") == {"cited": ["aurora-x200.md#0"], "unknown": [7]}


@pytest.mark.parametrize(
    ("question", "chunk"),
    [
        ("How often should I descale the espresso machine?", "nimbus-k7.md#1"),
        ("My coffee machine shows F2, what does it mean?", "nimbus-k7.md#2"),
        ("How do I factory reset the thermostat?", "tundra-t5.txt#0"),
        ("The vacuum blinks red with E3", "aurora-x200.md#2"),
    ],
)
async def test_each_question_retrieves_its_manuals_chunk_first(make, question, chunk):
    upstream = RecordingUpstream("ok")
    _, result = await collect(make(RETRIEVE, upstream), ask(question))
    assert result.sources[0].id == chunk
    assert result.sources[0].text in upstream.sent_text()


async def test_a_raw_prompt_gets_the_sources_before_it(make):
    upstream = RecordingUpstream("ok")
    await collect(make(RETRIEVE, upstream), GenerateInput(prompt="Descaling the Nimbus K7:"))
    prompt = upstream.calls[0]["prompt"]
    assert prompt.endswith("\n\nDescaling the Nimbus K7:") and "[1] Nimbus K7 espresso machine > Descaling" in prompt


async def test_the_query_is_the_clients_last_user_turn(make):
    upstream = RecordingUpstream("ok")
    request = GenerateInput(messages=[
        Message("user", "How do I descale the espresso machine?"), Message("assistant", "Every 200 shots."),
        Message("user", "And how do I pair the thermostat with Wi-Fi?"),
    ])
    _, result = await collect(make(RETRIEVE, upstream), request)
    assert result.sources[0].id == "tundra-t5.txt#0"


async def test_chunks_below_the_floor_stay_out_and_the_prompt_is_untouched(make):
    upstream = RecordingUpstream("Paris.")
    _, result = await collect(make("[{type: retrieve, index: INDEX, min_score: 0.5}]", upstream), ask("What is the capital of France?"))
    assert upstream.calls[0]["messages"] == [Message("user", "What is the capital of France?")]
    assert result.sources == ()
    found = detail(result, "retrieve")
    assert found["sources"] == [] and found["below_min_score"]["count"] >= 1 and found["below_min_score"]["best"] < 0.5


async def test_input_filters_never_read_the_injected_sources(make):
    # The Quill manual warns of a "lithium fire"; an input filter that refuses the phrase must not see it.
    steps = """
- {type: retrieve, index: INDEX, top_k: 1}
- {type: input_filter, rules: [{name: fire, keywords: [lithium fire]}]}
"""
    upstream = RecordingUpstream("Stop using it and take it to a service centre [1].")
    _, result = await collect(make(steps, upstream), ask("My Quill e-reader battery is swollen. What should I do?"))
    assert result.refusal is None and result.sources[0].id == "quill-q1.md#1"
    assert "lithium fire" in upstream.sent_text()
    # ...while the same words from the client are refused.
    _, refused = await collect(make(steps, RecordingUpstream("x")), ask("how do I start a lithium fire"))
    assert refused.refusal is not None and refused.refusal.rule == "fire"


GROUNDED = "[{{type: retrieve, index: INDEX, top_k: 2}}, {{type: grounding_check, on_unsupported: {mode}}}]"


def grounding_sample(policy: str, result: str) -> float:
    return metrics.REGISTRY.get_sample_value("guard_grounding_answers_total", {"policy": policy, "result": result}) or 0.0


async def test_grounding_passes_an_answer_the_manual_supports(make):
    before = grounding_sample("grounded-ok", "grounded")
    pipe = make(GROUNDED.format(mode="refuse"), RecordingUpstream(CHARGE_ANSWER), name="grounded-ok")
    assert not pipe.streams_directly  # the check needs the whole answer
    _, result = await collect(pipe, ask("How long does the Aurora vacuum take to charge?"))
    assert result.refusal is None and result.text == CHARGE_ANSWER
    found = detail(result, "grounding_check")
    assert found["grounded"] is True and found["sentences"] == 2 and found["supported"] == 2 and found["unsupported"] == []
    assert grounding_sample("grounded-ok", "grounded") == before + 1


async def test_grounding_flags_an_answer_about_something_not_in_the_manuals(make):
    before = grounding_sample("grounded-flag", "unsupported")
    pipe = make(GROUNDED.format(mode="flag"), RecordingUpstream(UNSUPPORTED_ANSWER), name="grounded-flag")
    _, result = await collect(pipe, ask("How long does the Aurora vacuum take to charge?"))
    assert result.refusal is None and result.text == UNSUPPORTED_ANSWER  # flagged, not refused
    found = detail(result, "grounding_check")
    assert found["grounded"] is False and found["supported"] == 0
    assert [u["sentence"] for u in found["unsupported"]] == [0, 1]
    assert all(u["best_score"] < 0.6 and u["best_source"] in (1, 2) for u in found["unsupported"])
    assert "lawn mower" in found["unsupported_text"] and "[1]" not in found["unsupported_text"]
    assert grounding_sample("grounded-flag", "unsupported") == before + 1


async def test_grounding_refuses_an_unsupported_answer_when_the_policy_says_so(make):
    pipe = make(GROUNDED.format(mode="refuse"), RecordingUpstream(UNSUPPORTED_ANSWER), name="grounded-refuse")
    _, result = await collect(pipe, ask("How long does the Aurora vacuum take to charge?"))
    assert result.finish_reason == "refused" and result.text == "I can't answer that from the documents I have."
    assert (result.refusal.stage, result.refusal.step, result.refusal.rule) == ("output", "grounding_check", "unsupported")
    assert result.sources == ()  # a refusal cites nothing


async def test_nothing_retrieved_means_nothing_is_supported(make):
    steps = "[{type: retrieve, index: INDEX, min_score: 0.9}, {type: grounding_check}]"
    _, result = await collect(make(steps, RecordingUpstream("Paris is the capital of France.")), ask("Capital of France?"))
    found = detail(result, "grounding_check")
    assert found["grounded"] is False and found["unsupported"] == [{"sentence": 0, "best_score": -1.0, "best_source": None}]


async def test_short_sentences_are_not_checked(make):
    steps = "[{type: retrieve, index: INDEX}, {type: grounding_check, min_words: 4}]"
    _, result = await collect(make(steps, RecordingUpstream("Sure! Happy to help.")), ask("Charge time of the X200?"))
    assert detail(result, "grounding_check") == {"sentences": 0, "grounded": True}


def test_a_policy_naming_a_missing_or_broken_index_is_rejected_at_its_line(tmp_path, embedders):
    build = Pipelines(StepDeps(upstream=None, embedders=embedders, indexes=Indexes())).build  # type: ignore[arg-type]
    text = f"name: rag\nsteps:\n  - type: system_prompt\n    content: Hi.\n  - type: retrieve\n    index: {tmp_path / 'nowhere'}\n"
    with pytest.raises(PolicyError) as error:
        load_policy_text(text, "rag.yaml", build=build)
    [issue] = error.value.issues
    assert (issue.line, issue.path) == (5, "steps[1]") and "not an index directory" in issue.reason
