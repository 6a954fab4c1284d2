"""The SQLite store on a real file: queries, a writer that falls behind, retention, reading while writing."""

from __future__ import annotations

import sqlite3
import threading
import time
from dataclasses import replace

import pytest

from guard import metrics
from guard.audit import AuditQuery, SQLiteAuditStore
from guard.audit.sqlite import SCHEMA_VERSION
from tests.audit.made import DAY, finished


@pytest.fixture
def store(tmp_path):
    store = SQLiteAuditStore(tmp_path / "audit.db")
    store.start()
    yield store
    store.close()


def ids(records) -> list[str]:
    return [record.request_id for record in records]


def test_records_are_written_to_a_wal_mode_file_and_read_back(store):
    store.submit(finished("a"))
    store.flush()
    assert ids(store.query(AuditQuery())) == ["a"]
    with sqlite3.connect(store.path) as connection:
        assert connection.execute("PRAGMA journal_mode").fetchone() == ("wal",)


def test_queries_filter_by_time_policy_rule_outcome_status_tenant_and_request_id(store):
    now = time.time()
    store.submit(finished("old", at=now - 3 * DAY))
    store.submit(finished("refused", outcome="refused", rule="bomb", at=now - 60))
    store.submit(finished("other-rule", outcome="refused", rule="theft", policy="strict", at=now - 50))
    store.submit(finished("failed", outcome="error", status="DEADLINE_EXCEEDED", tenant="zeta", at=now - 40))
    store.submit(finished("recent", at=now - 30))
    store.flush()

    def found(**fields) -> list[str]:
        return ids(store.query(AuditQuery(**fields)))

    assert found() == ["recent", "failed", "other-rule", "refused", "old"]  # newest first
    assert found(newest_first=False, limit=2) == ["old", "refused"]
    assert found(since=now - DAY) == ["recent", "failed", "other-rule", "refused"]
    assert found(until=now - DAY) == ["old"]
    assert found(policy="strict") == ["other-rule"]
    assert found(rule="bomb") == ["refused"]
    assert found(outcome="refused") == ["other-rule", "refused"]
    assert found(outcome="ok", since=now - DAY) == ["recent"]
    assert found(status="DEADLINE_EXCEEDED") == found(tenant="zeta") == ["failed"]
    assert found(request_id="refused", outcome="ok") == []


def test_daily_counts_group_by_utc_day_policy_outcome_and_refusing_rule(store):
    day = 20_000 * DAY  # a UTC midnight
    for i in range(3):
        store.submit(finished(f"ok-{i}", at=day + 10 + i))
    store.submit(finished("bomb", outcome="refused", rule="bomb", at=day + 20, fail_open=True))
    store.submit(finished("next-day", outcome="refused", rule="bomb", at=day + DAY + 5))
    store.flush()
    counts = {(c.day, c.outcome, c.rule): (c.requests, c.fail_opens) for c in store.daily_counts(day, day + 2 * DAY)}
    assert counts == {
        ("2024-10-04", "ok", ""): (3, 0),
        ("2024-10-04", "refused", "bomb"): (1, 1),
        ("2024-10-05", "refused", "bomb"): (1, 0),
    }


class Stalling(list):
    """A conversation the writer cannot read until released: the writer thread stalls on it, as on a slow disk."""

    def __init__(self) -> None:
        super().__init__()
        self.entered = threading.Event()
        self.release = threading.Event()

    def __iter__(self):
        self.entered.set()
        assert self.release.wait(30)
        return super().__iter__()


def test_a_writer_that_falls_behind_drops_and_counts_records_without_holding_up_submitters(tmp_path):
    def dropped() -> float:
        return metrics.REGISTRY.get_sample_value("guard_audit_records_total", {"result": "queue_full"}) or 0.0

    store = SQLiteAuditStore(tmp_path / "audit.db", queue_records=4, batch_records=1, observer=metrics.AuditMetrics())
    store.start()
    stalling = Stalling()
    store.submit(replace(finished("stalled", text="full"), input=stalling))
    assert stalling.entered.wait(10)  # the writer holds the stalling record; the queue is empty
    before = dropped()
    for i in range(10):
        store.submit(finished(f"r-{i}"))  # returns at once although nothing is being written
    assert dropped() == before + 6
    stalling.release.set()
    store.close()
    assert set(ids(store.query(AuditQuery()))) == {"stalled", "r-0", "r-1", "r-2", "r-3"}


def test_retention_deletes_records_older_than_the_maximum_age(tmp_path):
    store = SQLiteAuditStore(tmp_path / "audit.db", max_age_seconds=30 * DAY, observer=metrics.AuditMetrics())
    store.start()
    now = time.time()
    for i, age in enumerate((40, 31, 29, 1)):
        store.submit(finished(f"{age}d", at=now - age * DAY - i))
    store.flush()
    assert store.retain(now=now).by_age == 2
    store.close()
    assert ids(store.query(AuditQuery())) == ["1d", "29d"]


def test_retention_deletes_the_oldest_records_until_the_file_fits_its_size(tmp_path):
    limit = 256 * 1024
    store = SQLiteAuditStore(tmp_path / "audit.db", max_bytes=limit)
    store.start()
    now = time.time()
    for i in range(1000):  # ~1.5 KB each with its text: ~1.5 MB
        store.submit(finished(f"r-{i:04d}", at=now - 1000 + i, prompt="x" * 1500, text="full"))
    store.flush()

    def on_disk() -> int:
        return sum(path.stat().st_size for path in tmp_path.glob("audit.db*"))  # the file, its WAL and index

    assert on_disk() > limit
    retained = store.retain(now=now)
    store.close()
    kept = ids(store.query(AuditQuery(newest_first=False)))
    assert retained.by_size == 1000 - len(kept) and 0 < len(kept) < 1000
    assert kept == [f"r-{i:04d}" for i in range(1000 - len(kept), 1000)]  # the newest survive
    assert on_disk() <= limit  # freed pages went back to the file system


def test_the_writer_applies_retention_itself_when_it_starts(tmp_path):
    path = tmp_path / "audit.db"
    first = SQLiteAuditStore(path)
    first.start()
    first.submit(finished("ancient", at=time.time() - 400 * DAY))
    first.submit(finished("fresh"))
    first.close()
    second = SQLiteAuditStore(path, max_age_seconds=30 * DAY)
    second.start()
    second.flush()  # the first pass runs before the writer takes anything from the queue
    second.submit(finished("later"))
    second.close()
    assert ids(second.query(AuditQuery())) == ["later", "fresh"]


def test_readers_see_records_while_the_writer_has_the_file_open(store):
    store.submit(finished("a"))
    store.flush()
    reader = SQLiteAuditStore(store.path)  # e.g. `guard audit query` beside a running guard
    assert ids(reader.query(AuditQuery())) == ["a"]
    store.submit(finished("b"))
    store.flush()
    assert ids(reader.query(AuditQuery())) == ["b", "a"]


def test_a_database_of_a_newer_schema_is_refused_at_start(tmp_path):
    path = tmp_path / "audit.db"
    with sqlite3.connect(path) as connection:
        connection.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    with pytest.raises(RuntimeError, match="newer guard"):
        SQLiteAuditStore(path).start()


def test_an_unwritable_path_fails_start_with_the_path_in_the_message(tmp_path):
    (tmp_path / "file").write_text("")
    with pytest.raises(RuntimeError, match="audit database .*file/audit.db"):
        SQLiteAuditStore(tmp_path / "file" / "audit.db").start()


def test_reading_a_missing_database_says_so(tmp_path):
    with pytest.raises(FileNotFoundError, match="no audit database"):
        list(SQLiteAuditStore(tmp_path / "missing.db").query(AuditQuery()))
