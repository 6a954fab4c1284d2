"""What the audit log costs: on the request path, and in the writer thread.

    python -m benchmarks.audit_cost                 # 100,000 requests' records, text off (the default)
    python -m benchmarks.audit_cost --text full     # with a 1 KB prompt and answer kept

1. Request path: a request's `Observation` (admitted, answered, finished) with and without an
   audit store, interleaved rounds; the difference is building the `Finished` and queueing it.
2. Writer: records queued while the writer lingers, then written; the process's CPU time (all
   threads) and wall time of the drain give CPU per record and sustained records per second.
   The writer also runs `record_of` (trace, text) and JSON encoding, so this is the whole cost.

Prints the numbers; nothing is written to benchmarks/results (see proxy_cost --guard-args --audit-db
for the end-to-end cost per request).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

from guard.access import AccessControl
from guard.audit import SQLiteAuditStore
from guard.policy.loader import LoadedPolicy
from guard.policy.model import Policy
from guard.service import Admission, Observation
from guard.types import GenerateInput, GenerateResult, Message, TraceEntry, Usage


def request_and_result(text_chars: int) -> tuple[GenerateInput, GenerateResult]:
    request = GenerateInput(messages=[Message("user", "q" * text_chars)], request_id="0123456789abcdef0123456789abcdef")
    result = GenerateResult(
        text="a" * text_chars,
        finish_reason="stop",
        policy="bench",
        policy_version="abc",
        usage=Usage(12, 16),
        trace=[TraceEntry("inputs", "input_filter", "before", 0.0004, {"matched": None, "classifier": {"harm": 0.12}})],
        upstream_seconds=0.002,
    )
    return request, result


def observe(access: AccessControl, admission: Admission, request, result, audit) -> None:
    observation = Observation(access, "bench", audit)
    observation.received(request)
    observation.admitted(admission)
    observation.answered(result)
    observation.finish()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--records", type=int, default=100_000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--text", choices=["none", "hashed", "full"], default="none")
    parser.add_argument("--text-chars", type=int, default=1000, help="prompt and answer length")
    args = parser.parse_args()

    access = AccessControl(None)
    loaded = LoadedPolicy(Policy.model_validate({"name": "bench", "audit": {"text": args.text}}), "abc", "bench.yaml")
    admission = Admission(access.anonymous, loaded, SimpleNamespace(model="model"), with_trace=False)  # type: ignore[arg-type]
    request, result = request_and_result(args.text_chars)
    path = Path(tempfile.mkdtemp(prefix="guard-audit-cost-")) / "audit.db"
    per_round = args.records // args.rounds
    # The writer only wakes when flushed: the request-path rounds measure queueing alone.
    store = SQLiteAuditStore(path, queue_records=args.records + 1, linger_seconds=3600)
    store.start()

    plain, audited, writer_cpu, writer_wall = [], [], [], []
    for _ in range(args.rounds):
        started = time.perf_counter()
        for _ in range(per_round):
            observe(access, admission, request, result, None)
        plain.append((time.perf_counter() - started) / per_round)
        started = time.perf_counter()
        for _ in range(per_round):
            observe(access, admission, request, result, store)
        audited.append((time.perf_counter() - started) / per_round)
        cpu, wall = time.process_time(), time.perf_counter()
        store.flush()
        writer_cpu.append((time.process_time() - cpu) / per_round)
        writer_wall.append((time.perf_counter() - wall) / per_round)
    store.close()

    def us(values: list[float]) -> str:
        return f"{statistics.median(values) * 1e6:.1f} µs"

    size = path.stat().st_size + sum(p.stat().st_size for p in path.parent.glob("audit.db-*"))
    print(f"text: {args.text} ({args.text_chars}-character prompt and answer), {args.rounds} rounds of {per_round}")
    print(f"request path, Observation without audit: {us(plain)}, with: {us(audited)} "
          f"(added: {(statistics.median(audited) - statistics.median(plain)) * 1e6:.1f} µs per request)")
    print(f"writer: {us(writer_cpu)} CPU per record, {1 / statistics.median(writer_wall):,.0f} records/s sustained, "
          f"{size / (per_round * args.rounds):,.0f} bytes per record on disk")


if __name__ == "__main__":
    main()
