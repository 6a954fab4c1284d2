"""What an audit store does, whatever the database: the SQLite store implements it, and a
PostgreSQL one could (every method is a plain INSERT, DELETE or SELECT ... GROUP BY there too; feedback is
a second table whose rows reference a record and go with it: ON DELETE CASCADE)."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Protocol

from guard.audit.feedback import Feedback, FoundRecord
from guard.audit.record import AuditRecord, Finished, Outcome


@dataclass(frozen=True)
class AuditQuery:
    """Records matching every field that is set; times are unix seconds, `until` excluded."""

    since: float | None = None
    until: float | None = None
    policy: str | None = None
    rule: str | None = None  # the rule that refused
    outcome: Outcome | None = None
    status: str | None = None
    request_id: str | None = None
    tenant: str | None = None
    fail_open: bool | None = None  # True: only requests some rule let pass after failing
    feedback: bool | None = None  # True: only requests with feedback; False: only those without
    limit: int | None = None
    newest_first: bool = True


@dataclass(frozen=True)
class DailyCount:
    """Requests of one UTC day, policy and outcome; refused ones also by the step and rule that refused."""

    day: str  # YYYY-MM-DD
    policy: str
    outcome: Outcome
    step: str
    rule: str
    requests: int
    fail_opens: int


@dataclass(frozen=True)
class Retained:
    """Records one retention pass deleted."""

    by_age: int
    by_size: int


class AuditStore(Protocol):
    def start(self) -> None:
        """Opens the database (creating it) and starts writing what is submitted."""

    def submit(self, finished: Finished) -> None:
        """Queues a finished request for writing. Never blocks: when the queue is full the record is
        dropped and counted."""

    def flush(self) -> None:
        """Returns once everything submitted so far is written (or dropped)."""

    def close(self) -> None:
        """Writes what is queued, then stops."""

    def query(self, query: AuditQuery) -> Iterator[AuditRecord]: ...

    def daily_counts(self, since: float, until: float | None = None) -> list[DailyCount]: ...

    def retain(self, now: float | None = None) -> Retained:
        """Deletes records older than the maximum age, then the oldest until the store fits its size (a
        record's feedback goes with it)."""

    def find(self, request_id: str, tenant: str) -> FoundRecord | None:
        """The newest written record with this request id and tenant (ids can repeat: clients choose them)."""

    def add_feedback(self, key: int, feedback: Feedback) -> bool:
        """Stores feedback on the record `find` returned as `key`; False when that record is gone meanwhile
        (retention deleted it)."""

    def query_with_feedback(self, query: AuditQuery) -> Iterator[tuple[AuditRecord, tuple[Feedback, ...]]]:
        """Records matching the query, each with its feedback (oldest first; possibly none)."""


class AuditObserver(Protocol):
    """Told what became of records (guard.metrics.AuditMetrics counts it)."""

    def written(self, records: int) -> None: ...

    def dropped(self, reason: str, records: int) -> None: ...

    def queued(self, records: int) -> None: ...

    def deleted(self, reason: str, records: int) -> None: ...


class Unobserved:
    """An observer that ignores everything (reading a store from the CLI)."""

    def written(self, records: int) -> None:
        pass

    def dropped(self, reason: str, records: int) -> None:
        pass

    def queued(self, records: int) -> None:
        pass

    def deleted(self, reason: str, records: int) -> None:
        pass
