"""`guard audit query|summary|export` against a populated database."""

from __future__ import annotations

import time

import pytest

from guard.audit import AuditQuery, AuditRecord, SQLiteAuditStore, record_of
from guard.audit.report import parse_time
from guard.cli import main
from tests.audit.made import DAY, finished

NOW = time.time()
MIDNIGHT = NOW // DAY * DAY  # UTC


@pytest.fixture
def db(tmp_path):
    """Two days of a policy whose `bomb` rule refuses more on the second day, a failure and a fail-open."""
    path = tmp_path / "audit.db"
    store = SQLiteAuditStore(path)
    store.start()
    yesterday, today = MIDNIGHT - 2 * DAY + 3600, MIDNIGHT - DAY + 3600
    for i in range(8):
        store.submit(finished(f"y-{i}", at=yesterday + i, outcome="refused" if i < 2 else "ok", rule="bomb"))
    for i in range(4):
        store.submit(finished(f"t-{i}", at=today + i, outcome="refused" if i < 3 else "ok", rule="bomb" if i < 2 else "theft"))
    store.submit(finished("t-failed", at=today + 10, outcome="error", status="DEADLINE_EXCEEDED"))
    store.submit(finished("t-open", at=today + 11, policy="lenient", fail_open=True))
    store.submit(finished("ancient", at=NOW - 30 * DAY))
    store.close()
    return path


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(["audit", *argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_query_prints_matching_records_newest_first(db, capsys):
    code, out, _ = run(capsys, "query", "--db", str(db), "--since", "3d", "--outcome", "refused", "--rule", "bomb")
    lines = out.splitlines()
    assert code == 0 and lines[0].split()[:3] == ["time", "(UTC)", "request"]
    assert [line.split()[2] for line in lines[1:]] == ["t-1", "t-0", "y-1", "y-0"]
    assert all("inputs/bomb" in line for line in lines[1:])


def test_query_json_prints_whole_records_one_per_line(db, capsys):
    code, out, _ = run(capsys, "query", "--db", str(db), "--status", "DEADLINE_EXCEEDED", "--json")
    [record] = [AuditRecord.from_json(line) for line in out.splitlines()]
    assert code == 0 and (record.request_id, record.outcome) == ("t-failed", "error")


def test_summary_prints_refusal_rates_by_policy_and_rule_per_day_top_rules_and_fail_opens(db, tmp_path, capsys):
    png = tmp_path / "summary.png"
    code, out, _ = run(capsys, "summary", "--db", str(db), "--since", "7d", "--png", str(png))
    assert code == 0 and "14 requests" in out.splitlines()[0]  # not the 30-day-old one
    by_policy, by_rule, top, fail_open = out.split("\n\n")[1:5]
    yesterday_row, today_row = [line.split() for line in by_policy.splitlines()[2:] if line.split()[1] == "safe"]
    assert yesterday_row[2:5] == ["8", "2", "25.0%"] and today_row[2:6] == ["5", "3", "60.0%", "1"]
    assert [line.split()[3:] for line in by_rule.splitlines()[2:]] == [
        ["bomb", "2", "25.0%"], ["bomb", "2", "40.0%"], ["theft", "1", "20.0%"]
    ]
    assert [line.split()[2:4] for line in top.splitlines()[2:]] == [["bomb", "4"], ["theft", "1"]]
    assert fail_open.splitlines()[0].endswith(": 1") and "t-open" in fail_open and "classifier unavailable" in fail_open
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and f"wrote {png}" in out


def test_summary_of_an_empty_period_says_so(db, capsys):
    code, out, _ = run(capsys, "summary", "--db", str(db), "--since", "2000-01-01", "--until", "2000-01-02")
    assert code == 0 and out.strip().endswith(": 0 requests")


def test_export_writes_every_record_oldest_first_and_reads_back_equal(db, tmp_path, capsys):
    out_file = tmp_path / "audit.jsonl"
    code, _, err = run(capsys, "export", "--db", str(db), "--jsonl", str(out_file))
    exported = [AuditRecord.from_json(line) for line in out_file.read_bytes().splitlines()]
    assert code == 0 and "exported 15 records" in err
    assert exported == list(SQLiteAuditStore(db).query(AuditQuery(newest_first=False)))
    assert exported[-1] == record_of(finished("t-open", at=exported[-1].time, policy="lenient", fail_open=True))


def test_a_missing_database_or_a_bad_time_is_one_line_and_exit_1(tmp_path, capsys):
    assert run(capsys, "query", "--db", str(tmp_path / "none.db"))[0:3:2] == (1, f"error: no audit database at {tmp_path / 'none.db'}\n")
    code, _, err = run(capsys, "summary", "--db", str(tmp_path / "none.db"), "--since", "last tuesday")
    assert code == 1 and "expected an age such as 1h or 7d" in err


def test_times_are_ages_or_iso_dates_in_utc():
    assert parse_time("90m", now=10_000.0) == 10_000.0 - 5400
    assert parse_time("2d", now=10 * DAY) == 8 * DAY
    assert parse_time("1970-01-02") == DAY
    assert parse_time("1970-01-02T01:00:00+01:00") == DAY
