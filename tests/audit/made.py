"""Finished requests made up for the store and report tests (the door tests use real requests)."""

from __future__ import annotations

import time

from guard.audit import Finished, input_to_keep
from guard.types import GenerateInput, GenerateResult, Refusal, TraceEntry, Usage

DAY = 86400.0


def finished(
    request_id: str = "r-1",
    *,
    policy: str = "safe",
    outcome: str = "ok",
    rule: str = "",
    step: str = "inputs",
    at: float | None = None,
    prompt: str = "hello there",
    answer: str = "hi!",
    text: str = "none",
    status: str | None = None,
    fail_open: bool = False,
    tenant: str = "acme",
) -> Finished:
    """A request through a one-filter policy: ok, refused by `rule`, or failed with `status`."""
    refusal = Refusal("input", step, rule, f"matched rule {rule!r}", "No.") if outcome == "refused" else None
    detail: dict = {"matched": rule or None}
    if fail_open:
        detail.update(error="classifier unavailable", fail_open=True)
    result = GenerateResult(
        text="No." if refusal else answer,
        finish_reason="refused" if refusal else "stop",
        policy=policy,
        policy_version="v1",
        refusal=refusal,
        usage=Usage(0, 0) if refusal else Usage(5, 2),
        trace=[TraceEntry(step=step, type="input_filter", phase="before", duration_seconds=0.001, detail=detail)],
        upstream_seconds=0.0 if refusal else 0.02,
    )
    failed = outcome == "error"
    return Finished(
        rpc="Generate",
        tenant=tenant,
        time=time.time() if at is None else at,
        seconds=0.03,
        outcome=outcome,  # type: ignore[arg-type]
        status=status or ("UNAVAILABLE" if failed else "OK"),
        error="upstream down" if failed else "",
        request_id=request_id,
        input=input_to_keep(GenerateInput(prompt=prompt), text),  # type: ignore[arg-type]
        policy=policy,
        policy_version="v1",
        model="tiny",
        text=text,  # type: ignore[arg-type]
        results=() if failed else (result,),
    )
