"""Assembles guard: policy store, access control, upstream client, reranker, pipelines, the
shared GuardService, its two doors (gRPC with health and reflection; the OpenAI HTTP API) and
/metrics; and shuts it all down gracefully."""

from __future__ import annotations

import asyncio
import gc
import logging
import signal

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from guard import limits, metrics, workers
from guard.access import AccessControl
from guard.audit import SQLiteAuditStore
from guard.http.app import OpenAIDoor
from guard.http.server import HttpServer
from guard.pipeline.base import StepDeps
from guard.pipeline.runner import Pipelines
from guard.policy.loader import LoadedPolicy
from guard.policy.store import PolicyStore
from guard.rerank import Reranker
from guard.retrieval.registry import Indexes
from guard.safety.embedder import Embedders
from guard.server.servicer import GuardServicer
from guard.service import GuardService
from guard.settings import Settings
from guard.upstream.adapters import Adapters
from guard.upstream.client import UpstreamClient
from guard.v1 import guard_pb2, guard_pb2_grpc

log = logging.getLogger(__name__)

SERVICE_NAME = guard_pb2.DESCRIPTOR.services_by_name["Guard"].full_name
HEALTH_POLL_SECONDS = 1.0


class GuardApp:
    """One running guard server. `start()` binds and serves; `stop()` drains in-flight calls."""

    def __init__(self, settings: Settings, upstream: UpstreamClient, model: str) -> None:
        self.settings = settings
        self.upstream = upstream
        self.model = model
        self.reranker = Reranker(observer=metrics.RerankMetrics())
        self.embedders = Embedders()
        self.indexes = Indexes(poll_interval=settings.poll_seconds)
        self.deps = StepDeps(
            upstream=upstream, reranker=self.reranker, embedders=self.embedders, indexes=self.indexes, default_model=model
        )
        self.pipelines = Pipelines(self.deps)
        self.adapters = Adapters(upstream, settings.policies)
        # Policies are built as they load: one whose steps cannot run is rejected, the last good one serves.
        self.store = PolicyStore(
            settings.policies,
            default_policy=settings.default_policy,
            poll_interval=settings.poll_seconds,
            build=self._build,
            prepare=self.adapters.prepare,
        )
        self.store.on_reload(self._count_reload)
        self.store.on_reload(lambda result, file: self._retain_rewards())
        self.store.on_reload(lambda result, file: self._retain_indexes())
        self.access = AccessControl(
            settings.api_keys, allow_policies=settings.allow_policies, poll_interval=settings.poll_seconds
        )
        self.audit = (
            SQLiteAuditStore(
                settings.audit_db,
                max_age_seconds=settings.audit_max_age_days * 86400,
                max_bytes=settings.audit_max_megabytes * 2**20,
                observer=metrics.AuditMetrics(),
            )
            if settings.audit_db is not None
            else None
        )
        self.service = GuardService(
            self.store, self.pipelines, self.access, max_in_flight=settings.max_in_flight, audit=self.audit
        )
        self.serving = False
        self.http = (
            HttpServer(
                OpenAIDoor(self.service, lambda: self.serving).app(),
                settings.host,
                settings.http_port,
                settings.grace_seconds,
                tls_cert=settings.tls_cert,
                tls_key=settings.tls_key,
                tls_client_ca=settings.tls_client_ca,
                reuse_port=settings.reuse_port,
            )
            if settings.http_port >= 0
            else None
        )
        self.health = health.aio.HealthServicer()
        self.server = grpc.aio.server(
            options=[
                ("grpc.so_reuseport", 1 if settings.reuse_port else 0),
                # Room for the largest request guard accepts plus protobuf framing; content limits name fields.
                ("grpc.max_receive_message_length", limits.MAX_REQUEST_BYTES + 64 * 1024),
            ],
        )
        guard_pb2_grpc.add_GuardServicer_to_server(GuardServicer(self.service), self.server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        reflection.enable_server_reflection(
            (SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME),
            self.server,
        )
        self.port = 0
        self.http_port = 0
        self._health_task: asyncio.Task | None = None
        self._metrics_server = None

    def _build(self, loaded: LoadedPolicy) -> None:
        # The adapter first: a policy naming one vLLM does not serve is rejected before its steps are built.
        self.adapters.check(loaded)
        self.pipelines.build(loaded)

    def _retain_rewards(self) -> None:
        """Reward models load (in the background) when a policy naming them loads, and unload with the last one."""
        self.reranker.retain(
            step.reward for loaded in self.store.list() for step in loaded.policy.steps if step.type == "best_of_n"
        )

    def _retain_indexes(self) -> None:
        """Indexes are watched for changes while a served policy names them."""
        self.indexes.retain(
            step.index for loaded in self.store.list() for step in loaded.policy.steps if step.type == "retrieve"
        )

    def _count_reload(self, result: str, file: str) -> None:
        metrics.POLICY_RELOADS.labels(result=result).inc()
        metrics.POLICIES_LOADED.set(len(self.store.list()))

    async def start(self) -> int:
        await self.store.reload()
        metrics.POLICIES_LOADED.set(len(self.store.list()))
        self._retain_rewards()
        self._retain_indexes()
        await self.store.start()
        await self.indexes.start()
        await self.access.start()
        if self.audit is not None:
            self.audit.start()
        await self.upstream.start()
        # Embedding models take seconds to load: before SERVING, not on the first request.
        for encoder in sorted(self._encoders(), key=str):
            await self.embedders.warm(encoder)
        address = f"{self.settings.host}:{self.settings.port}"
        credentials = self._grpc_credentials()
        if credentials is None:
            self.port = self.server.add_insecure_port(address)
        else:
            self.port = self.server.add_secure_port(address, credentials)
        if self.port == 0:
            raise RuntimeError(f"cannot bind gRPC port {self.settings.host}:{self.settings.port}")
        await self.server.start()
        if self.http is not None:
            self.http_port = await self.http.start()
        if self.settings.metrics_port:
            metrics_host = self.settings.metrics_host or self.settings.host
            self._metrics_server, _ = metrics.serve_metrics(self.settings.metrics_port, metrics_host)
        await self._set_health()
        self._health_task = asyncio.create_task(self._health_loop(), name="health")
        log.info(
            "guard serving gRPC on %s:%d, OpenAI HTTP on %s (model %s, policies %s, metrics :%s, %s, %s)",
            self.settings.host, self.port, f":{self.http_port}" if self.http else "off", self.model,
            ", ".join(sorted(p.policy.name for p in self.store.list())), self.settings.metrics_port or "off",
            f"API keys from {self.settings.api_keys}" if self.settings.api_keys else "open: no API keys",
            "mTLS" if self.settings.tls_client_ca else "TLS" if self.settings.tls_cert else "plaintext",
        )
        if self.access.open and self.settings.host not in ("127.0.0.1", "localhost", "::1"):
            log.warning(
                "no --api-keys file and listening on %s: anyone who can reach guard may use %s",
                self.settings.host, ", ".join(self.settings.allow_policies) or "every policy, the passthrough included",
            )
        return self.port

    def _grpc_credentials(self) -> grpc.ServerCredentials | None:
        settings = self.settings
        if settings.tls_cert is None or settings.tls_key is None:
            return None
        client_ca = settings.tls_client_ca.read_bytes() if settings.tls_client_ca else None
        return grpc.ssl_server_credentials(
            [(settings.tls_key.read_bytes(), settings.tls_cert.read_bytes())],
            root_certificates=client_ca,
            require_client_auth=client_ca is not None,
        )

    def _encoders(self) -> set:
        wanted = set()
        for loaded in self.store.list():
            for step in self.pipelines.get(loaded).steps:
                if hasattr(step, "encoders"):
                    wanted |= step.encoders()
        return wanted

    def not_serving_because(self) -> str | None:
        """Why guard cannot answer ordinary requests now, or None."""
        if not self.upstream.any_healthy:
            return "no upstream answers its health check"
        default = self.store.default_policy
        if default not in {loaded.policy.name for loaded in self.store.list()}:
            return f"the default policy {default!r} is not served (missing, or rejected: see ListPolicies load_errors)"
        return None

    async def _set_health(self) -> None:
        reason = self.not_serving_because()
        serving = reason is None
        if serving != self.serving:
            log.log(logging.INFO if serving else logging.WARNING, "health: %s", "SERVING" if serving else f"NOT_SERVING: {reason}")
        self.serving = serving
        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        for service in ("", SERVICE_NAME):
            await self.health.set(service, status)

    async def _health_loop(self) -> None:
        while True:
            await asyncio.sleep(HEALTH_POLL_SECONDS)
            await self._set_health()

    async def stop(self, grace: float | None = None) -> None:
        """NOT_SERVING first so load balancers stop sending, then let in-flight calls finish."""
        if self._health_task is not None:
            self._health_task.cancel()
            self._health_task = None
        self.serving = False
        await self.health.enter_graceful_shutdown()
        grace = self.settings.grace_seconds if grace is None else grace
        http_drained = self.http.stop() if self.http is not None else asyncio.sleep(0)
        await asyncio.gather(self.server.stop(grace), http_drained)
        if self.audit is not None:
            await asyncio.to_thread(self.audit.close)  # writes what the drained requests left queued
        await self.store.stop()
        await self.indexes.stop()
        await self.access.stop()
        await self.reranker.close()
        self.embedders.close()
        for client in self.deps.other_upstreams.values():
            await client.close()
        await self.upstream.close()
        if self._metrics_server is not None:
            self._metrics_server.shutdown()
            self._metrics_server.server_close()
            self._metrics_server = None

    async def wait(self) -> None:
        await self.server.wait_for_termination()


async def _resolve_model(upstream: UpstreamClient, configured: str) -> str:
    if configured:
        return configured
    models = await upstream.models()
    if not models:
        raise RuntimeError("the upstream serves no model; pass --model")
    return models[0]


async def serve(settings: Settings) -> None:
    """Runs until SIGTERM/SIGINT. Starts a managed vLLM when no upstream is configured."""
    import torch

    torch.set_num_threads(settings.torch_threads)
    async with workers.upstreams(settings) as (urls, model):
        upstream = UpstreamClient(urls, observer=metrics.UpstreamMetrics())
        model = await _resolve_model(upstream, model)
        app = GuardApp(settings, upstream, model)
        try:
            await app.start()
        except BaseException:
            # e.g. a port already taken: close what did start (the other door, pollers) before exiting.
            await app.stop(grace=0)
            raise
        # What startup built (torch, transformers, models: millions of objects) lives as long as the process:
        # out of the collector's sight, so a full collection under load no longer walks all of it. Measured:
        # HTTP door p99 250-300 ms -> see benchmarks/proxy_cost.py.
        gc.freeze()
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        workers.notify_ready(orphaned=stop.set)
        await stop.wait()
        log.info("shutting down: draining in-flight requests (grace %.0fs)", settings.grace_seconds)
        await app.stop()
