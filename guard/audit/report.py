"""What `guard audit` prints, plots and exports, from any AuditStore.

The summary is the weekly drift check: per UTC day, each policy's refusal rate and each rule's;
the rules that fire most; and the fail-open events (a rule failed and let the request through).
"""

from __future__ import annotations

import re
import time
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import IO

from guard.audit.record import AuditRecord
from guard.audit.store import AuditQuery, AuditStore, DailyCount

UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
# Fail-open events listed by the summary (the newest); the count covers them all.
FAIL_OPEN_LISTED = 20
# Rules drawn in the plot (the most refused); the table lists every rule.
PLOTTED_RULES = 8


def parse_time(text: str, now: float | None = None) -> float:
    """Unix seconds from an age ("90s", "30m", "1h", "7d", "2w": that long ago) or an ISO date or time (UTC unless
    it names a zone)."""
    now = time.time() if now is None else now
    match = re.fullmatch(r"(\d+(?:\.\d+)?)([smhdw])", text.strip())
    if match:
        return now - float(match.group(1)) * UNITS[match.group(2)]
    try:
        moment = datetime.fromisoformat(text.strip())
    except ValueError:
        raise ValueError(f"{text!r}: expected an age such as 1h or 7d, or an ISO date such as 2026-11-20") from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=timezone.utc)
    return moment.timestamp()


def utc(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, timezone.utc).strftime("%Y-%m-%d %H:%M:%S")


def table(headers: list[str], rows: Iterable[list], out: IO[str]) -> None:
    """Columns as wide as their widest cell; numbers right-aligned."""
    cells = [[_cell(value) for value in row] for row in rows]
    widths = [max([len(h), *(len(row[i]) for row in cells)]) for i, h in enumerate(headers)]
    numeric = [bool(cells) and all(_is_number(row[i]) for row in cells) for i in range(len(headers))]

    def line(values: list[str]) -> str:
        return "  ".join(v.rjust(w) if n else v.ljust(w) for v, w, n in zip(values, widths, numeric, strict=True)).rstrip()

    out.write(line(headers) + "\n")
    for row in cells:
        out.write(line(row) + "\n")


def _cell(value) -> str:
    if isinstance(value, float):
        return f"{value:.1%}"  # floats in these tables are rates
    return str(value)


def _is_number(text: str) -> bool:
    return bool(re.fullmatch(r"-?[\d.,]+%?", text))


# --- query and export ----------------------------------------------------------------------


def print_records(records: Iterable[AuditRecord], out: IO[str]) -> int:
    rows = []
    for record in records:
        refusal = record.refusal
        rows.append(
            [
                utc(record.time),
                record.request_id,
                record.rpc,
                record.tenant,
                record.policy or "-",
                record.outcome if record.outcome != "error" else record.status,
                f"{refusal.step}/{refusal.rule}" if refusal is not None else "-",
                f"{record.prompt_tokens}+{record.completion_tokens}",
                f"{record.seconds * 1000:.1f}",
            ]
        )
    table(["time (UTC)", "request id", "rpc", "tenant", "policy", "outcome", "refused by", "tokens", "ms"], rows, out)
    return len(rows)


def write_jsonl(records: Iterable[AuditRecord], out: IO[bytes]) -> int:
    """One record per line, as AuditRecord.to_json writes it (AuditRecord.from_json reads it back)."""
    count = 0
    for record in records:
        out.write(record.to_json() + b"\n")
        count += 1
    return count


# --- summary ---------------------------------------------------------------------------------


@dataclass
class PolicyDay:
    requests: int = 0
    refused: int = 0
    errors: int = 0
    fail_opens: int = 0


@dataclass
class Summary:
    since: float
    until: float
    policy_days: dict[tuple[str, str], PolicyDay] = field(default_factory=dict)  # (day, policy)
    rule_days: dict[tuple[str, str, str, str], int] = field(default_factory=dict)  # (day, policy, step, rule): refused
    fail_opens: list[AuditRecord] = field(default_factory=list)  # the newest FAIL_OPEN_LISTED

    @property
    def requests(self) -> int:
        return sum(day.requests for day in self.policy_days.values())

    def policy_requests(self) -> dict[str, int]:
        totals: dict[str, int] = defaultdict(int)
        for (_, policy), day in self.policy_days.items():
            totals[policy] += day.requests
        return totals

    def top_rules(self) -> list[tuple[tuple[str, str, str], int]]:
        """((policy, step, rule), refused) over the whole period, most refused first."""
        totals: dict[tuple[str, str, str], int] = defaultdict(int)
        for (_, policy, step, rule), refused in self.rule_days.items():
            totals[(policy, step, rule)] += refused
        return sorted(totals.items(), key=lambda item: (-item[1], item[0]))


def summarize(store: AuditStore, since: float, until: float | None = None) -> Summary:
    until = time.time() if until is None else until
    summary = Summary(since, until)
    counts: list[DailyCount] = store.daily_counts(since, until)
    for count in counts:
        day = summary.policy_days.setdefault((count.day, count.policy), PolicyDay())
        day.requests += count.requests
        day.fail_opens += count.fail_opens
        if count.outcome == "refused":
            day.refused += count.requests
            key = (count.day, count.policy, count.step, count.rule)
            summary.rule_days[key] = summary.rule_days.get(key, 0) + count.requests
        elif count.outcome == "error":
            day.errors += count.requests
    summary.fail_opens = list(store.query(AuditQuery(since=since, until=until, fail_open=True, limit=FAIL_OPEN_LISTED)))
    return summary


def print_summary(summary: Summary, out: IO[str]) -> None:
    fail_open_total = sum(day.fail_opens for day in summary.policy_days.values())
    out.write(f"audit summary {utc(summary.since)} .. {utc(summary.until)} UTC: {summary.requests} requests\n")
    if not summary.requests:
        return
    out.write("\nRefusal rate by policy and day\n")
    table(
        ["day", "policy", "requests", "refused", "rate", "errors", "fail-open"],
        [
            [day, policy or "(none)", d.requests, d.refused, d.refused / d.requests, d.errors, d.fail_opens]
            for (day, policy), d in sorted(summary.policy_days.items())
        ],
        out,
    )
    if not summary.rule_days:
        out.write("\nNo refusals.\n")
    else:
        out.write("\nRefusals by rule and day (rate: of the policy's requests that day)\n")
        table(
            ["day", "policy", "step", "rule", "refused", "rate"],
            [
                [day, policy, step, rule or "-", refused, refused / summary.policy_days[(day, policy)].requests]
                for (day, policy, step, rule), refused in sorted(summary.rule_days.items())
            ],
            out,
        )
        out.write("\nRules that fire most\n")
        totals = summary.policy_requests()
        table(
            ["policy", "step", "rule", "refused", "rate"],
            [[policy, step, rule or "-", refused, refused / totals[policy]] for (policy, step, rule), refused in summary.top_rules()],
            out,
        )
    listed = f" (those of the newest {FAIL_OPEN_LISTED} requests below)" if len(summary.fail_opens) == FAIL_OPEN_LISTED else ""
    out.write(f"\nFail-open events (a rule failed and let the request through): {fail_open_total}{listed}\n")
    if summary.fail_opens:
        rows = []
        for record in summary.fail_opens:
            for choice in record.choices:
                for step in choice.steps:
                    if step.detail.get("fail_open"):
                        rows.append([utc(record.time), record.request_id, record.policy, step.step, step.detail.get("error", "")])
        table(["time (UTC)", "request id", "policy", "step", "error"], rows, out)


def plot_summary(summary: Summary, path: Path) -> None:
    """Refusal rate per day: each policy (top), the most refused rules (bottom)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    days = sorted({day for day, _ in summary.policy_days})
    fig, (by_policy, by_rule) = plt.subplots(2, 1, figsize=(10, 8), sharex=True)
    for policy in sorted({policy for _, policy in summary.policy_days}):
        rates = [_rate(summary.policy_days.get((day, policy))) for day in days]
        by_policy.plot(days, rates, marker="o", label=policy or "(none)")
    by_policy.set_title("Refusal rate by policy")
    for (policy, step, rule), _ in summary.top_rules()[:PLOTTED_RULES]:
        rates = [
            summary.rule_days.get((day, policy, step, rule), 0) / summary.policy_days[(day, policy)].requests
            if (day, policy) in summary.policy_days
            else float("nan")
            for day in days
        ]
        by_rule.plot(days, rates, marker="o", label=f"{policy}: {step}/{rule or '-'}")
    by_rule.set_title(f"Refusal rate by rule (the {PLOTTED_RULES} most refused)")
    for axes in (by_policy, by_rule):
        axes.set_ylabel("share of the policy's requests")
        axes.yaxis.set_major_formatter(matplotlib.ticker.PercentFormatter(1.0))
        axes.set_ylim(bottom=0)
        axes.grid(alpha=0.3)
        if axes.get_legend_handles_labels()[0]:
            axes.legend(fontsize="small")
    by_rule.set_xlabel("day (UTC)")
    fig.autofmt_xdate()
    fig.suptitle(f"guard audit {utc(summary.since)} .. {utc(summary.until)} UTC, {summary.requests} requests")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _rate(day: PolicyDay | None) -> float:
    return day.refused / day.requests if day is not None else float("nan")
