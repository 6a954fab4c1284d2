"""Config model for the `guard_model` filter rule: ask a safety model served by vLLM.

Plain pydantic (no torch, no HTTP): a policy file validates without reaching any server.
The checker that runs a rule lives in `guard.safety.guard_model`; the category tables
below are shared with it so that validation and prompting cannot disagree.

Families:
  * llama_guard_3 / llama_guard_4: the model writes `safe` or `unsafe\\nS1,S10`; categories
    are the MLCommons hazard codes S1..S14.
  * shieldgemma: P(first token is "Yes") for each policy, read from the top logprobs.
  * yes_no: Granite Guardian style; P("Yes") to "is the message harmful per this risk definition".
"""

from __future__ import annotations

import re
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

GuardFamily = Literal["llama_guard_3", "llama_guard_4", "shieldgemma", "yes_no"]

LLAMA_GUARD_FAMILIES = frozenset({"llama_guard_3", "llama_guard_4"})
PROBABILITY_FAMILIES = frozenset({"shieldgemma", "yes_no"})

# Llama Guard 3 / 4 hazard taxonomy, with the short names the official prompt lists
# (https://huggingface.co/meta-llama/Llama-Guard-3-8B chat template; the same list in
# https://www.llama.com/docs/model-cards-and-prompt-formats/llama-guard-4/).
LLAMA_GUARD_CATEGORIES: dict[str, str] = {
    "S1": "Violent Crimes",
    "S2": "Non-Violent Crimes",
    "S3": "Sex Crimes",
    "S4": "Child Exploitation",
    "S5": "Defamation",
    "S6": "Specialized Advice",
    "S7": "Privacy",
    "S8": "Intellectual Property",
    "S9": "Indiscriminate Weapons",
    "S10": "Hate",
    "S11": "Self-Harm",
    "S12": "Sexual Content",
    "S13": "Elections",
    "S14": "Code Interpreter Abuse",
}

# ShieldGemma's documented policies (https://huggingface.co/google/shieldgemma-2b model card),
# by the short names a policy file uses. The checker holds their texts.
SHIELDGEMMA_POLICIES = ("dangerous_content", "harassment", "hate_speech", "sexually_explicit")
SHIELDGEMMA_DEFAULT = SHIELDGEMMA_POLICIES

# Granite Guardian 3.x risk names (https://huggingface.co/ibm-granite/granite-guardian-3.1-2b).
YES_NO_RISKS = (
    "harm",
    "social_bias",
    "jailbreak",
    "violence",
    "profanity",
    "sexual_content",
    "unethical_behavior",
)
YES_NO_DEFAULT = ("harm",)

GUARD_RULE_NAME_PATTERN = r"^[a-z0-9][a-z0-9._-]{0,63}$"
_LLAMA_GUARD_CODE = re.compile(r"^[sS](\d{1,2})$")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def default_categories(family: str) -> tuple[str, ...]:
    """What `categories: null` means for a family."""
    if family in LLAMA_GUARD_FAMILIES:
        return tuple(LLAMA_GUARD_CATEGORIES)
    if family == "shieldgemma":
        return SHIELDGEMMA_DEFAULT
    return YES_NO_DEFAULT


class GuardModelRule(_Strict):
    """Refuses what a safety model ("guard model") served by vLLM judges unsafe."""

    name: str = Field(..., pattern=GUARD_RULE_NAME_PATTERN, description="Rule name, reported in refusals and metrics.")
    family: GuardFamily = Field(
        ...,
        description="Prompt format and verdict parser: llama_guard_3, llama_guard_4 (text verdict 'safe' / "
        "'unsafe' + categories), shieldgemma or yes_no (Granite Guardian style; probability of 'Yes' "
        "from the first token's top logprobs).",
    )
    model: str | None = Field(
        None, min_length=1, description="Served model name of the guard model; null: the guard server's upstream model."
    )
    url: str | None = Field(
        None,
        pattern=r"^https?://",
        description="Base URL (no /v1) of a separate vLLM serving the guard model; null: guard's own upstream.",
    )
    categories: list[str] | None = Field(
        None,
        description="Llama Guard: the category codes (S1..S14) to enforce; only these are listed in the prompt "
        "and a verdict naming only others counts as safe. shieldgemma: policy names (dangerous_content, "
        "harassment, hate_speech, sexually_explicit) or custom policy texts. yes_no: risk names (harm, "
        "social_bias, jailbreak, violence, profanity, sexual_content, unethical_behavior) or custom risk "
        "definitions. Each policy / risk is asked separately. null: every Llama Guard category, the four "
        "ShieldGemma policies, or the 'harm' risk.",
    )
    threshold: float = Field(
        0.5,
        ge=0.0,
        le=1.0,
        description="shieldgemma and yes_no: refuse when P(unsafe) >= threshold for any category.",
    )
    timeout_seconds: float = Field(
        2.0, gt=0.0, le=60.0, description="Time allowed for the whole check (all of its upstream calls)."
    )
    on_error: Literal["refuse", "allow"] | None = Field(
        None,
        description="When the guard model times out, is unreachable or answers something unparseable: refuse "
        "(fail closed) or allow (fail open); null: the filter's on_error.",
    )

    @field_validator("categories")
    @classmethod
    def _categories_fit_family(cls, categories: list[str] | None, info: ValidationInfo) -> list[str] | None:
        if categories is None:
            return None
        if not categories:
            raise ValueError("categories must not be empty; leave it out (null) for the family's defaults")
        for index, category in enumerate(categories):
            if not category.strip():
                raise ValueError(f"categories[{index}] is empty")
        family = info.data.get("family")
        if family is None:  # the family itself failed validation and says so
            return categories
        return _normalized_categories(family, categories)

    @model_validator(mode="after")
    def _threshold_fits_family(self) -> GuardModelRule:
        if self.family in LLAMA_GUARD_FAMILIES and "threshold" in self.model_fields_set:
            raise ValueError(
                f"threshold applies to the probability families (shieldgemma, yes_no), not {self.family}, "
                "whose verdict is the text the model writes"
            )
        return self

    def enforced_categories(self) -> tuple[str, ...]:
        """The categories this rule checks: the configured ones, or the family's defaults."""
        return tuple(self.categories) if self.categories is not None else default_categories(self.family)


def is_custom_text(entry: str) -> bool:
    """A shieldgemma / yes_no entry with whitespace is a policy text written out, not a name."""
    return any(ch.isspace() for ch in entry.strip())


def _normalized_categories(family: str, categories: list[str]) -> list[str]:
    out: list[str] = []
    if family in LLAMA_GUARD_FAMILIES:
        allowed = ", ".join(LLAMA_GUARD_CATEGORIES)
        for index, category in enumerate(categories):
            match = _LLAMA_GUARD_CODE.match(category.strip())
            code = f"S{int(match.group(1))}" if match else None
            if code not in LLAMA_GUARD_CATEGORIES:
                raise ValueError(
                    f"categories[{index}]: unknown {family} category {category!r}; allowed: {allowed}"
                )
            if code not in out:
                out.append(code)
        return out
    names = SHIELDGEMMA_POLICIES if family == "shieldgemma" else YES_NO_RISKS
    kind = "policy" if family == "shieldgemma" else "risk"
    for index, category in enumerate(categories):
        entry = category.strip()
        if not is_custom_text(entry):
            entry = entry.lower()
            if entry not in names:
                raise ValueError(
                    f"categories[{index}]: unknown {family} {kind} {category!r}; allowed names: "
                    f"{', '.join(names)} (or write the {kind} out as a sentence)"
                )
        if entry not in out:
            out.append(entry)
    return out
