"""Every Prometheus metric guard exports, in one place.

Names: guard_<area>_<thing>_<unit>, base units (seconds, tokens). Labels only
ever hold bounded values (policy and step names come from validated policy
files, unknown policy names collapse to "unknown"; tenants come from the key file, anyone else
is "other"); never prompt text.
"""

from __future__ import annotations

import functools

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    Summary,
    start_http_server,
)

REGISTRY = CollectorRegistry(auto_describe=True)
ProcessCollector(registry=REGISTRY)
PlatformCollector(registry=REGISTRY)

# Request latencies span a cached refusal (~1 ms) to long CPU generations (minutes).
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
# Steps are mostly sub-millisecond; reranking can take seconds on CPU.
STEP_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)

REQUESTS = Counter(
    "guard_requests_total",
    "Requests finished, by RPC (gRPC method or HTTP route), policy, tenant and outcome (ok, refused, or a status code name).",
    ["rpc", "policy", "tenant", "outcome"],
    registry=REGISTRY,
)
REQUEST_SECONDS = Histogram(
    "guard_request_duration_seconds",
    "Wall time of a request inside guard, from receipt to last byte.",
    ["rpc", "policy"],
    buckets=LATENCY_BUCKETS,
    registry=REGISTRY,
)
REQUESTS_IN_FLIGHT = Gauge(
    "guard_requests_in_flight",
    "Requests being handled now.",
    ["rpc"],
    registry=REGISTRY,
    multiprocess_mode="livesum",  # under --workers: all live workers' together
)
OVERLOADED = Counter(
    "guard_overloaded_total",
    "Requests refused at once because max_in_flight requests were already being handled.",
    registry=REGISTRY,
)
STEP_SECONDS = Histogram(
    "guard_step_duration_seconds",
    "Time spent in one policy step's hook.",
    ["policy", "step", "phase"],
    buckets=STEP_BUCKETS,
    registry=REGISTRY,
)
REFUSALS = Counter(
    "guard_refusals_total",
    "Requests refused, by policy, the step that refused and stage (input or output).",
    ["policy", "step", "stage"],
    registry=REGISTRY,
)
TIME_TO_FIRST_TEXT = Histogram(
    "guard_time_to_first_token_seconds",
    "Streaming requests: time from receipt to the first answer text sent (a moderation window or a step that needs "
    "the whole answer delays it).",
    ["rpc", "policy"],
    buckets=LATENCY_BUCKETS,
    registry=REGISTRY,
)
STREAM_EXPOSED_CHARS = Histogram(
    "guard_stream_exposed_chars",
    "Characters of answer already streamed to the client when a moderating step blocked the rest.",
    ["policy"],
    buckets=(0, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192),
    registry=REGISTRY,
)
FILTER_FAIL_OPEN = Counter(
    "guard_filter_fail_open_total",
    "Requests a filter let through because a rule failed and its on_error is allow.",
    ["policy", "step", "rule"],
    registry=REGISTRY,
)
TOKENS = Counter(
    "guard_tokens_total",
    "Tokens reported by the upstream, by policy, tenant and kind (prompt or completion).",
    ["policy", "tenant", "kind"],
    registry=REGISTRY,
)
UPSTREAM_REQUEST_SECONDS = Histogram(
    "guard_upstream_request_duration_seconds",
    "Time from sending a request to the upstream until its full response (streamed: until the stream ends or is closed).",
    ["endpoint", "path"],
    buckets=LATENCY_BUCKETS,
    registry=REGISTRY,
)
UPSTREAM_ERRORS = Counter(
    "guard_upstream_errors_total",
    "Failed upstream attempts by endpoint and kind (connect, timeout, http_4xx, http_5xx, invalid_response, stream_broken).",
    ["endpoint", "kind"],
    registry=REGISTRY,
)
UPSTREAM_HEALTHY = Gauge(
    "guard_upstream_healthy",
    "1 when the endpoint's last health probe succeeded and it is not ejected (nor awaiting its trial request).",
    ["endpoint"],
    registry=REGISTRY,
    multiprocess_mode="livemin",  # under --workers: 1 only while every live worker would send to it
)
UPSTREAM_EJECTIONS = Counter(
    "guard_upstream_ejections_total",
    "Times an endpoint was ejected after consecutive failures (or a failed trial after its backoff).",
    ["endpoint"],
    registry=REGISTRY,
)
UPSTREAM_RETRIES = Counter(
    "guard_upstream_retries_total",
    "Upstream attempts after the first of a request: retried, or refused by the retry budget.",
    ["outcome"],
    registry=REGISTRY,
)
POLICY_RELOADS = Counter(
    "guard_policy_reloads_total",
    "Policy file (re)loads by result: ok, error (last good version kept) or removed.",
    ["result"],
    registry=REGISTRY,
)
POLICIES_LOADED = Gauge(
    "guard_policies_loaded",
    "Policies currently served.",
    registry=REGISTRY,
    multiprocess_mode="livemin",  # under --workers: what every live worker serves, whichever takes a request
)

# Reranking (best_of_n).
RERANK_CANDIDATES = Counter(
    "guard_rerank_candidates_total",
    "Candidates scored by a reward source.",
    ["source"],
    registry=REGISTRY,
)
RERANK_SECONDS = Histogram(
    "guard_rerank_duration_seconds",
    "Time to score one request's candidates, queueing included.",
    ["source"],
    buckets=STEP_BUCKETS,
    registry=REGISTRY,
)
RERANK_BATCH_SIZE = Histogram(
    "guard_rerank_batch_size",
    "Sequences per reward-model forward pass (after cross-request batching).",
    ["source"],
    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256),
    registry=REGISTRY,
)
RERANK_CHOSEN_SCORE = Histogram(
    "guard_rerank_chosen_score",
    "Reward score of the candidate best_of_n returned.",
    ["policy"],
    buckets=(-10, -5, -2, -1, -0.5, 0, 0.25, 0.5, 0.75, 1, 2, 5, 10),
    registry=REGISTRY,
)


@functools.lru_cache(maxsize=8192)
def child(metric, *label_values: str):
    """`metric.labels(*label_values)`, remembered: the hot path records each request in several metrics,
    and labels() validates and locks on every call. Label values are bounded (see above), so is this."""
    return metric.labels(*label_values)


def serve_metrics(port: int, host: str = "0.0.0.0"):
    """Expose /metrics over HTTP on its own port (returns the server and thread)."""
    return start_http_server(port, addr=host, registry=REGISTRY)


class RerankMetrics:
    """The rerank package's observer (guard.rerank.RerankObserver), recording the guard_rerank_* metrics."""

    def scored(self, source: str, candidates: int, seconds: float) -> None:
        RERANK_CANDIDATES.labels(source=source).inc(candidates)
        RERANK_SECONDS.labels(source=source).observe(seconds)

    def batch(self, source: str, sequences: int) -> None:
        RERANK_BATCH_SIZE.labels(source=source).observe(sequences)

    def chosen(self, policy: str, score: float) -> None:
        RERANK_CHOSEN_SCORE.labels(policy=policy).observe(score)


class UpstreamMetrics:
    """The upstream client's observer (guard.upstream.client.UpstreamObserver), recording guard_upstream_*."""

    def requested(self, endpoint: str, path: str, seconds: float) -> None:
        child(UPSTREAM_REQUEST_SECONDS, endpoint, path).observe(seconds)

    def failed(self, endpoint: str, kind: str) -> None:
        child(UPSTREAM_ERRORS, endpoint, kind).inc()

    def retried(self, outcome: str) -> None:
        child(UPSTREAM_RETRIES, outcome).inc()

    def ejected(self, endpoint: str) -> None:
        child(UPSTREAM_EJECTIONS, endpoint).inc()

    def usable(self, endpoint: str, usable: bool) -> None:
        child(UPSTREAM_HEALTHY, endpoint).set(1 if usable else 0)


# --- Audit log (guard.audit): what became of each finished request's record. Never any text. ---

AUDIT_RECORDS = Counter(
    "guard_audit_records_total",
    "Audit records by result: written; queue_full (dropped: the writer fell behind, requests were not held up); "
    "error (dropped: the database refused the write).",
    ["result"],
    registry=REGISTRY,
)
AUDIT_QUEUE = Gauge(
    "guard_audit_queue_records",
    "Finished requests waiting for the audit writer, sampled each time it wakes (a full queue drops records).",
    registry=REGISTRY,
    multiprocess_mode="livesum",
)
AUDIT_DELETED = Counter(
    "guard_audit_deleted_total",
    "Audit records deleted by retention, by reason (age, size).",
    ["reason"],
    registry=REGISTRY,
)


class AuditMetrics:
    """The audit store's observer (guard.audit.AuditObserver), recording guard_audit_*."""

    def written(self, records: int) -> None:
        AUDIT_RECORDS.labels(result="written").inc(records)

    def dropped(self, reason: str, records: int) -> None:
        AUDIT_RECORDS.labels(result=reason).inc(records)

    def queued(self, records: int) -> None:
        AUDIT_QUEUE.set(records)

    def deleted(self, reason: str, records: int) -> None:
        AUDIT_DELETED.labels(reason=reason).inc(records)


# --- Feedback (guard.audit.feedback): what users said about answers, by policy. Never any text. ---

FEEDBACK = Counter(
    "guard_feedback_total",
    "Feedback stored, by the policy that answered and kind (thumbs_up, thumbs_down, rating, preferred, correction, "
    "comment; one feedback can carry several kinds).",
    ["policy", "kind"],
    registry=REGISTRY,
)
FEEDBACK_RATING = Summary(
    "guard_feedback_rating",
    "1-5 ratings by policy: mean rating = rate(guard_feedback_rating_sum[1h]) / rate(guard_feedback_rating_count[1h]).",
    ["policy"],
    registry=REGISTRY,
)


def feedback_received(policy: str, kinds: list[str], rating: int | None) -> None:
    for kind in kinds:
        child(FEEDBACK, policy, kind).inc()
    if rating is not None:
        child(FEEDBACK_RATING, policy).observe(rating)


# --- Retrieval (guard.retrieval, the retrieve and grounding_check steps). Never any document or answer text. ---

INDEX_RELOADS = Counter(
    "guard_index_reloads_total",
    "Retrieval index (re)loads by result: ok, or error (the last good version keeps serving).",
    ["result"],
    registry=REGISTRY,
)
INDEX_CHUNKS = Gauge(
    "guard_index_chunks",
    "Chunks in each served retrieval index (by its directory).",
    ["index"],
    registry=REGISTRY,
    multiprocess_mode="livemin",  # under --workers: what every live worker serves
)
GROUNDED_FRACTION = Histogram(
    "guard_grounding_supported_fraction",
    "grounding_check: fraction of an answer's checked sentences that a retrieved chunk supports (each best_of_n "
    "candidate counts).",
    ["policy"],
    buckets=(0.0, 0.25, 0.5, 0.75, 0.9, 0.99, 1.0),
    registry=REGISTRY,
)
GROUNDING_ANSWERS = Counter(
    "guard_grounding_answers_total",
    "grounding_check verdicts by result: grounded, or unsupported (flagged or refused, as the policy says). "
    "Grounded share = rate(...{result=\"grounded\"}) / rate(all).",
    ["policy", "result"],
    registry=REGISTRY,
)
