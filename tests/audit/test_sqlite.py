"""The SQLite store on a real file: queries, a writer that falls behind, retention, reading while writing."""

from __future__ import annotations

import sqlite3
import threading
import time
from dataclasses import replace

import pytest

from guard import metrics
from guard.audit import AuditQuery, Feedback, SQLiteAuditStore
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


# Feedback beside the records (schema version 2)

V1_SCHEMA = """
CREATE TABLE audit (
    id INTEGER PRIMARY KEY, time REAL NOT NULL, request_id TEXT NOT NULL, rpc TEXT NOT NULL, tenant TEXT NOT NULL,
    policy TEXT NOT NULL, outcome TEXT NOT NULL, status TEXT NOT NULL, step TEXT NOT NULL, rule TEXT NOT NULL,
    fail_opens INTEGER NOT NULL, record TEXT NOT NULL
);
CREATE INDEX audit_time ON audit (time);
CREATE INDEX audit_request_id ON audit (request_id);
CREATE INDEX audit_policy_time ON audit (policy, time);
PRAGMA user_version = 1;
"""


def version_1_file(path, *records) -> None:
    """A database as the first audit release wrote it: the audit table alone, schema version 1."""
    from guard.audit import record_of
    from guard.audit.sqlite import _row

    with sqlite3.connect(path) as connection:
        connection.executescript(V1_SCHEMA)
        connection.executemany(
            "INSERT INTO audit (time, request_id, rpc, tenant, policy, outcome, status, step, rule, fail_opens, record) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            [_row(record_of(finished)) for finished in records],
        )
    connection.close()


def tables(path) -> set[str]:
    with sqlite3.connect(path) as connection:
        names = {name for (name,) in connection.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    connection.close()
    return names


def user_version(path) -> int:
    with sqlite3.connect(path) as connection:
        (version,) = connection.execute("PRAGMA user_version").fetchone()
    connection.close()
    return version


def test_a_version_1_file_is_migrated_in_place_when_guard_starts_on_it(tmp_path):
    path = tmp_path / "audit.db"
    version_1_file(path, finished("before", text="full"))
    assert tables(path) == {"audit"} and SCHEMA_VERSION == 2
    store = SQLiteAuditStore(path)
    store.start()
    store.submit(finished("after"))
    store.close()
    assert user_version(path) == 2 and tables(path) == {"audit", "feedback"}
    assert ids(store.query(AuditQuery())) == ["after", "before"]
    found = store.find("before", "acme")
    assert found is not None and found.record.input == "hello there"
    assert store.add_feedback(found.key, Feedback("before", thumbs=True, tenant="acme"))


def test_reading_a_version_1_file_migrates_it_too(tmp_path):
    path = tmp_path / "audit.db"
    version_1_file(path, finished("old"))
    reader = SQLiteAuditStore(path)  # `guard audit query` or `guard export preferences` on an old file
    assert [(r.request_id, f) for r, f in reader.query_with_feedback(AuditQuery())] == [("old", ())]
    assert user_version(path) == 2


def test_find_gives_the_newest_record_of_an_id_for_that_tenant_only(store):
    now = time.time()
    store.submit(finished("dup", answer="first", text="full", at=now - 20))
    store.submit(finished("dup", answer="second", text="full", at=now - 10))
    store.submit(finished("dup", answer="zeta's", text="full", tenant="zeta", at=now - 5))
    store.flush()
    assert store.find("dup", "acme").record.choices[0].output == "second"
    assert store.find("dup", "zeta").record.choices[0].output == "zeta's"
    assert store.find("dup", "other") is None and store.find("nope", "acme") is None


def test_feedback_is_read_back_with_its_record(store):
    store.submit(finished("a", text="full"))
    store.submit(finished("b", text="full"))
    store.flush()
    a = store.find("a", "acme")
    first = Feedback("a", thumbs=False, comment="too long", tenant="acme", time=1.0)
    second = Feedback("a", rating=4, preferred_index=1, correction="Shorter.", choice=0, tenant="acme", time=2.0)
    assert store.add_feedback(a.key, first) and store.add_feedback(a.key, second)
    assert [(r.request_id, f) for r, f in store.query_with_feedback(AuditQuery(newest_first=False))] == [
        ("a", (first, second)), ("b", ()),
    ]
    assert [r.request_id for r, _ in store.query_with_feedback(AuditQuery(feedback=True))] == ["a"]
    assert [r.request_id for r, _ in store.query_with_feedback(AuditQuery(feedback=False))] == ["b"]
    assert ids(store.query(AuditQuery(feedback=True, request_id="a"))) == ["a"]


def test_feedback_on_a_record_that_is_gone_is_refused(store):
    store.submit(finished("a"))
    store.flush()
    key = store.find("a", "acme").key
    assert not store.add_feedback(key + 1000, Feedback("a", thumbs=True, tenant="acme"))


def test_retention_deletes_feedback_with_its_record(tmp_path):
    store = SQLiteAuditStore(tmp_path / "audit.db", max_age_seconds=30 * DAY)
    store.start()
    now = time.time()
    store.submit(finished("old", at=now - 40 * DAY))
    store.submit(finished("new", at=now - DAY))
    store.flush()
    for request_id in ("old", "new"):
        assert store.add_feedback(store.find(request_id, "acme").key, Feedback(request_id, thumbs=True, tenant="acme"))
    assert store.retain(now=now).by_age == 1
    store.close()
    with sqlite3.connect(store.path) as connection:
        assert connection.execute("SELECT request_id FROM feedback").fetchall() == [("new",)]
    connection.close()
