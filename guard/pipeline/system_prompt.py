"""system_prompt: put the operator's instructions in front of the model."""

from __future__ import annotations

from guard.pipeline.base import Context, Step, register_step
from guard.policy.model import SystemPromptStep
from guard.types import Message


def add_system_text(messages: list[Message], text: str, mode: str) -> list[Message]:
    """Merge into one leading system message: many chat templates accept only one."""
    client_system = [m.content for m in messages if m.role == "system"]
    rest = [m for m in messages if m.role != "system"]
    if mode == "replace" or not client_system:
        parts = [text]
    elif mode == "prepend":
        parts = [text, *client_system]
    else:  # append
        parts = [*client_system, text]
    return [Message("system", "\n\n".join(parts)), *rest]


def add_prompt_text(prompt: str, text: str, mode: str) -> str:
    # A raw completion prompt has no system slot: instructions go before it, or after for append.
    if mode == "append":
        return f"{prompt}\n\n{text}"
    return f"{text}\n\n{prompt}"


@register_step("system_prompt")
class SystemPrompt(Step[SystemPromptStep]):
    async def before(self, ctx: Context) -> None:
        if ctx.messages is not None:
            ctx.messages = add_system_text(ctx.messages, self.config.content, self.config.mode)
        else:
            ctx.prompt = add_prompt_text(ctx.prompt or "", self.config.content, self.config.mode)
        ctx.detail["mode"] = self.config.mode
