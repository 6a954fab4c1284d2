"""Config models for the retrieve and grounding_check steps (plain pydantic: no index is opened here).

guard.policy.model makes them steps (adds `type` and `name`), as it does with best_of_n's config.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

DEFAULT_TEMPLATE = (
    "Answer from the numbered sources below. After each statement, cite the sources it comes from by their "
    "numbers in square brackets, like [1] or [1][3]. If the sources do not contain the answer, say that you "
    "do not know.\n\nSources:\n{sources}"
)
DEFAULT_SOURCE_TEMPLATE = "[{n}] {heading}: {text}"
SOURCE_FIELDS = {"n": 1, "id": "a.md#0", "document": "a.md", "heading": "A", "text": "t", "score": 0.5}


def _formats(template: str, **fields) -> str:
    try:
        template.format(**fields)
    except (KeyError, IndexError, ValueError) as exc:
        allowed = ", ".join("{" + name + "}" for name in fields)
        raise ValueError(f"cannot fill the template ({exc!r}); it may use {allowed} (write a literal brace as {{{{ or }}}})") from None
    return template


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class RetrieveConfig(_Strict):
    index: str = Field(
        ..., min_length=1, description="Index directory written by `guard index build` (relative to guard's working directory)."
    )
    top_k: int = Field(4, ge=1, le=50, description="Most chunks put into the prompt.")
    min_score: float = Field(
        0.3, ge=-1.0, le=1.0, description="Similarity floor: chunks less similar (cosine) to the user's last turn are left out."
    )
    template: str = Field(
        DEFAULT_TEMPLATE,
        min_length=1,
        description="The instruction and sources block added to the system message (before a raw prompt); '{sources}' is "
        "replaced by the numbered sources.",
    )
    source_template: str = Field(
        DEFAULT_SOURCE_TEMPLATE,
        min_length=1,
        description="One source in the block; may use {n}, {id}, {document}, {heading}, {text}, {score}.",
    )

    @field_validator("template")
    @classmethod
    def _template_has_sources(cls, template: str) -> str:
        if "{sources}" not in template:
            raise ValueError("template must contain '{sources}'")
        return _formats(template, sources="")

    @field_validator("source_template")
    @classmethod
    def _source_template_fills(cls, template: str) -> str:
        if "{text}" not in template:
            raise ValueError("source_template must contain '{text}'")
        return _formats(template, **SOURCE_FIELDS)


class GroundingCheckConfig(_Strict):
    method: Literal["embedding"] = Field(
        "embedding",
        description="How support is judged: embedding = cosine similarity of a sentence to the retrieved chunks, with the "
        "index's encoder. (A cross-encoder/NLI method needs a model no package ships yet.)",
    )
    threshold: float = Field(
        0.6,
        ge=-1.0,
        le=1.0,
        description="A sentence is supported when a retrieved chunk, or one of its sentences, is at least this similar "
        "(cosine) to it.",
    )
    min_supported: float = Field(
        1.0, ge=0.0, le=1.0, description="Fraction of the checked sentences that must be supported for the answer to be grounded."
    )
    min_words: int = Field(
        4, ge=1, le=100, description="Sentences with fewer words (\"Sure.\", \"Thanks!\") are not checked."
    )
    on_unsupported: Literal["flag", "refuse"] = Field(
        "flag", description="flag: answer, and list the unsupported sentences in the trace; refuse: answer with `refusal`."
    )
    refusal: str = Field(
        "I can't answer that from the documents I have.", min_length=1, description="Refusal text for on_unsupported: refuse."
    )
