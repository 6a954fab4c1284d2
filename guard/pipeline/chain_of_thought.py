"""chain_of_thought: ask for reasoning first, return only the final answer.

The reasoning is kept in the trace (candidate notes), never in the answer.
"""

from __future__ import annotations

from guard.pipeline.base import Candidate, Context, Step, register_step
from guard.pipeline.system_prompt import add_prompt_text, add_system_text
from guard.policy.model import ChainOfThoughtStep
from guard.types import Refusal


@register_step("chain_of_thought")
class ChainOfThought(Step[ChainOfThoughtStep]):
    streamable = False  # the answer is only known once the marker has been seen

    @property
    def instruction(self) -> str:
        return self.config.instruction.replace("{marker}", self.config.marker)

    async def before(self, ctx: Context) -> None:
        if ctx.messages is not None:
            ctx.messages = add_system_text(ctx.messages, self.instruction, "append")
        else:
            ctx.prompt = add_prompt_text(ctx.prompt or "", self.instruction, "append")

    async def after(self, ctx: Context, candidate: Candidate) -> None:
        # The last marker wins: models sometimes quote the marker while reasoning.
        head, marker, answer = candidate.text.rpartition(self.config.marker)
        if marker:
            candidate.notes["reasoning"] = head.strip()
            candidate.text = answer.strip()
            return
        candidate.notes["marker_missing"] = True
        if self.config.on_missing_marker == "refuse":
            candidate.refusal = Refusal(
                stage="output",
                step=self.name,
                rule="missing_marker",
                reason=f"the model never wrote the marker {self.config.marker!r}",
                text=ctx.policy.refusal,
            )
