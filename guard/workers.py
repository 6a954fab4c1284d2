"""`guard serve --workers N`: N worker processes serve the same gRPC and HTTP ports (SO_REUSEPORT:
the kernel spreads connections across them), kept by a supervisor, the `guard serve` process itself.

The supervisor starts each worker as a fresh `python -m guard.cli serve` (never a fork: grpc's
threads do not survive one) configured through GUARD_* variables, forwards SIGTERM and SIGINT so
each drains as a single guard does, restarts a worker that dies (with backoff), and serves /metrics:
prometheus_client's multiprocess mode merges the metric files the workers write.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import signal
import socket
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, replace

from prometheus_client import CollectorRegistry, PlatformCollector, ProcessCollector, start_http_server
from prometheus_client.multiprocess import MultiProcessCollector, mark_process_dead

from guard.settings import Settings

log = logging.getLogger(__name__)

# What the supervisor sets in each worker's environment.
INDEX_ENV = "GUARD_WORKER_INDEX"
READY_FD_ENV = "GUARD_WORKER_READY_FD"  # a pipe the worker writes to once it serves
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"  # prometheus_client picks its value class when imported

FIRST_BACKOFF, MAX_BACKOFF = 1.0, 30.0
# A worker that ran this long before dying restarts after FIRST_BACKOFF again; a crash loop backs off.
STABLE_SECONDS = 60.0
# Beyond the drain grace, a worker that has not exited is killed.
KILL_AFTER_GRACE = 10.0


@contextlib.asynccontextmanager
async def upstreams(settings: Settings) -> AsyncIterator[tuple[list[str], str]]:
    """(upstream URLs, model): the configured ones, or a local vLLM started and stopped around the block.

    Here rather than in guard.app so that a supervisor starts one vLLM for all its workers without importing torch.
    """
    if settings.upstream:
        yield list(settings.upstream), settings.model
        return
    from guard.upstream.adapters import RUNTIME_LOADING_ENV, declared_adapters, vllm_lora_args
    from guard.upstream.default_model import DEFAULT_MODEL_NAME, prepare_default_model
    from guard.upstream.launcher import ManagedVLLM

    model_dir = settings.vllm_model_dir or str(await asyncio.to_thread(prepare_default_model))
    adapters = declared_adapters(settings.policies) if settings.policies.is_dir() else []
    launcher = ManagedVLLM(
        model_dir,
        port=settings.vllm_port or None,
        max_model_len=settings.vllm_max_model_len,
        dtype="bfloat16",
        served_model_name=settings.model or (DEFAULT_MODEL_NAME if not settings.vllm_model_dir else None),
        # The policies' LoRA adapters, and runtime loading for those declared while guard runs.
        extra_args=vllm_lora_args(adapters),
        env=RUNTIME_LOADING_ENV if adapters else None,
        log_path=settings.cache_dir / "vllm.log",
    )
    log.info(
        "starting a local vLLM on %s%s (log: %s)", model_dir,
        f" with LoRA adapters {', '.join(adapter.name for adapter in adapters)}" if adapters else "",
        settings.cache_dir / "vllm.log",
    )  # fmt: skip
    await asyncio.to_thread(launcher.start)
    try:
        yield [launcher.url], launcher.served_model_name
    finally:
        await asyncio.to_thread(launcher.stop)


def worker_index() -> str | None:
    """This process's index among its supervisor's workers; None outside a supervisor."""
    return os.environ.get(INDEX_ENV)


def notify_ready(orphaned: Callable[[], None]) -> None:
    """In a worker: tells the supervisor that both doors serve and SIGTERM drains; calls `orphaned`
    if the supervisor dies (even by SIGKILL) so the worker drains instead of holding the ports.
    Nothing outside a supervisor."""
    fd = os.environ.get(READY_FD_ENV)
    if fd is None:
        return
    loop = asyncio.get_running_loop()
    link = socket.socket(fileno=int(fd))
    link.sendall(b"ready")
    link.setblocking(False)

    def supervisor_gone() -> None:  # the supervisor never writes again: readable means its end closed
        loop.remove_reader(link)
        link.close()
        log.error("the supervisor is gone: draining")
        orphaned()

    loop.add_reader(link, supervisor_gone)


def supervise(settings: Settings) -> int:
    """Runs settings.workers workers until SIGTERM/SIGINT; the exit status. RuntimeError: they could not start."""
    return asyncio.run(Supervisor(settings).run())


@dataclass(eq=False)
class _Worker:
    index: int
    process: asyncio.subprocess.Process | None = None
    serving: bool = False  # the current process said it serves


class Supervisor:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.workers = [_Worker(i) for i in range(settings.workers)]
        self.stopping = asyncio.Event()
        self.all_served = False  # every worker served once: from then on a dead worker is restarted, not fatal
        self.failure: str | None = None
        self.unclean = False
        self.metrics_dir = ""

    async def run(self) -> int:
        settings = self.settings
        self.metrics_dir = tempfile.mkdtemp(prefix="guard-metrics-")
        metrics_server = None
        try:
            if settings.metrics_port:
                metrics_server = self._serve_metrics()
            async with upstreams(settings) as (urls, model):
                doors = [(settings.port, "gRPC")] + ([(settings.http_port, "HTTP")] if settings.http_port >= 0 else [])
                ports = _check_ports(settings.host, doors)
                worker_settings = replace(
                    settings, upstream=urls, model=model, port=ports[0], http_port=ports[1] if len(ports) > 1 else -1,
                    metrics_port=0, workers=1, reuse_port=True,
                )
                await self._supervise({**os.environ, **worker_settings.to_env(), MULTIPROC_ENV: self.metrics_dir})
        finally:
            if metrics_server is not None:
                metrics_server.shutdown()
                metrics_server.server_close()
            shutil.rmtree(self.metrics_dir, ignore_errors=True)
        if self.failure is not None:
            raise RuntimeError(self.failure)
        return 1 if self.unclean else 0

    def _serve_metrics(self):
        registry = CollectorRegistry()
        MultiProcessCollector(registry, path=self.metrics_dir)
        registry.register(_ProcessMetrics(self.workers))
        PlatformCollector(registry=registry)  # the interpreter's version: the same in every worker
        host = self.settings.metrics_host or self.settings.host
        try:
            server, _ = start_http_server(self.settings.metrics_port, addr=host, registry=registry)
        except OSError as exc:
            raise RuntimeError(f"cannot bind metrics port {host}:{self.settings.metrics_port}: {exc}") from exc
        return server

    async def _supervise(self, env: dict[str, str]) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._stop, sig)
        kept = asyncio.gather(*(self._keep(worker, env) for worker in self.workers))
        await self.stopping.wait()
        try:
            await asyncio.wait_for(asyncio.shield(kept), self.settings.grace_seconds + KILL_AFTER_GRACE)
        except TimeoutError:
            for worker in self.workers:
                if worker.process is not None and worker.process.returncode is None:
                    log.error("worker %d (pid %d) still running after the grace period: killing it", worker.index, worker.process.pid)
                    worker.process.kill()
            await kept

    def _stop(self, sig: signal.Signals) -> None:
        if not self.stopping.is_set() and self.failure is None:
            log.info("%s: draining %d workers", sig.name, len(self.workers))
        self.stopping.set()
        for worker in self.workers:
            if worker.process is not None and worker.process.returncode is None:
                worker.process.send_signal(sig)

    async def _keep(self, worker: _Worker, env: dict[str, str]) -> None:
        """Runs one worker slot: starts its process, and a new one after each unexpected exit."""
        backoff = FIRST_BACKOFF
        while True:
            started = time.monotonic()
            try:
                process, link = await self._start(worker, env)
            except OSError as exc:  # out of processes or file descriptors
                self.failure = f"cannot start worker {worker.index}: {exc}"
                self._stop(signal.SIGTERM)
                return
            try:
                said = await link[0].read(16)  # b"ready", or b"" when it exited first
                if said and not self.stopping.is_set():
                    worker.serving = True
                    if self.all_served:
                        log.info("worker %d (pid %d) serving again", worker.index, process.pid)
                    elif all(w.serving for w in self.workers):
                        self.all_served = True
                        log.info("guard serving with %d workers (metrics merged from %s)", len(self.workers), self.metrics_dir)
                code = await process.wait()
            finally:
                link[1].close()  # only once it exited: a worker drains when its supervisor's end closes
            mark_process_dead(process.pid, self.metrics_dir)  # its live* gauges no longer count
            if self.stopping.is_set():
                if code != 0 and worker.serving:
                    log.error("worker %d (pid %d) exited with %d while draining", worker.index, process.pid, code)
                    self.unclean = True
                return
            if not self.all_served:
                self.failure = f"worker {worker.index} exited with {code} before serving (its log is above)"
                self._stop(signal.SIGTERM)
                return
            ran = time.monotonic() - started
            if ran >= STABLE_SECONDS:
                backoff = FIRST_BACKOFF
            log.error("worker %d (pid %d) exited with %d after %.0fs; restarting it in %.0fs", worker.index, process.pid, code, ran, backoff)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.stopping.wait(), backoff)
                return
            backoff = min(2 * backoff, MAX_BACKOFF)

    async def _start(self, worker: _Worker, env: dict[str, str]):
        """A started worker process and the supervisor's end of its link, as an asyncio (reader, writer)."""
        mine, theirs = socket.socketpair()
        try:
            process = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "guard.cli", "serve",
                env={**env, INDEX_ENV: str(worker.index), READY_FD_ENV: str(theirs.fileno())},
                pass_fds=(theirs.fileno(),),
            )
        except BaseException:
            mine.close()
            raise
        finally:
            theirs.close()  # only the worker holds its end now: its exit closes the link
        worker.process, worker.serving = process, False
        log.info("worker %d started (pid %d)", worker.index, process.pid)
        if self.stopping.is_set():  # a signal came while it was being started
            process.terminate()
        return process, await asyncio.open_connection(sock=mine)


def _check_ports(host: str, doors: list[tuple[int, str]]) -> list[int]:
    """The ports, each free (a port 0 becomes a free one), or RuntimeError: workers reusing a taken
    port would join whatever SO_REUSEPORT group holds it instead of failing."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    ports = []
    with contextlib.ExitStack() as held:  # held together, so two port 0s become two ports
        for port, door in doors:
            probe = held.enter_context(socket.socket(family, socket.SOCK_STREAM))
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind((host, port))
            except OSError as exc:
                raise RuntimeError(f"cannot bind {door} port {host}:{port}: {exc}") from exc
            ports.append(probe.getsockname()[1])
    return ports


class _ProcessMetrics:
    """process_* metrics (CPU, memory, fds) of the supervisor and each live worker, labelled
    process="supervisor" or "worker<i>": ProcessCollector reads one process, and the workers'
    own registries are not what /metrics serves."""

    def __init__(self, workers: list[_Worker]) -> None:
        self.workers = workers

    def collect(self):
        processes = [("supervisor", os.getpid())]
        processes += [
            (f"worker{w.index}", w.process.pid) for w in self.workers if w.process is not None and w.process.returncode is None
        ]
        merged = {}
        for name, pid in processes:
            for family in ProcessCollector(pid=lambda pid=pid: pid, registry=None).collect():
                samples = [sample._replace(labels={**sample.labels, "process": name}) for sample in family.samples]
                if family.name in merged:
                    merged[family.name].samples += samples
                else:
                    family.samples = samples
                    merged[family.name] = family
        return list(merged.values())
