"""The policies being served, hot-reloaded from a directory.

A polling task (no inotify dependency; works on network and ConfigMap mounts)
compares each file's (mtime, size, inode) every `poll_interval` and reloads
only the files that changed. A file that fails to validate is rejected: its
last good version keeps serving and its error is kept in `last_errors`.
Readers never see a half-applied reload: the name -> policy map is replaced,
not mutated.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
from collections.abc import Awaitable, Callable, Iterable
from pathlib import Path
from typing import Literal

from guard.policy.loader import (
    Builder,
    LoadedPolicy,
    PolicyError,
    duplicate_name_error,
    load_policy_file,
    policy_files,
)
from guard.policy.model import Policy

log = logging.getLogger(__name__)

ReloadResult = Literal["ok", "error", "removed"]
ReloadCallback = Callable[[ReloadResult, str], None]
# Awaited before each reload; returns files to read again although they did not change.
Prepare = Callable[[], Awaitable[Iterable[str]]]
Fingerprint = tuple[int, int, int]


class UnknownPolicy(KeyError):
    def __str__(self) -> str:
        # KeyError's str() would wrap the message in quotes.
        return str(self.args[0]) if self.args else ""


class PolicyStore:
    def __init__(
        self,
        directory: Path | str | None,
        default_policy: str = "default",
        poll_interval: float = 0.5,
        *,
        build: Builder | None = None,
        prepare: Prepare | None = None,
    ) -> None:
        self.directory = Path(directory) if directory is not None else None  # None: a fixed set (tests)
        self.default_policy = default_policy
        self.poll_interval = poll_interval
        self._build = build  # e.g. the pipeline builder: a policy that cannot run is rejected like a bad one
        # What a build checks outside the file (e.g. the LoRA adapters vLLM serves) is brought up to date here,
        # asynchronously, before files are read; the files it returns depend on what changed and are read again.
        self._prepare = prepare
        # Bumped whenever the set of served policies or any version changes.
        self.generation = 0
        self.last_errors: dict[str, PolicyError] = {}  # by file
        self._policies: dict[str, LoadedPolicy] = {}  # by name
        self._good: dict[str, LoadedPolicy] = {}  # by file: the last version that validated
        self._seen: dict[str, Fingerprint] = {}  # by file: what was last read
        self._callbacks: list[ReloadCallback] = []
        self._task: asyncio.Task[None] | None = None
        self._poll_failure: str | None = None

    @classmethod
    def from_policies(cls, policies: Iterable[Policy], default_policy: str = "default") -> PolicyStore:
        """A fixed store for tests: no directory is read; versions hash the policy's content."""
        store = cls(None, default_policy)
        for policy in policies:
            version = hashlib.sha256(policy.model_dump_json().encode()).hexdigest()[:12]
            store._policies[policy.name] = LoadedPolicy(policy, version, f"<memory:{policy.name}>")
        store.generation = 1
        return store

    def get(self, name: str = "") -> LoadedPolicy:
        """The policy called `name`; the default policy for ""."""
        name = name or self.default_policy
        try:
            return self._policies[name]
        except KeyError:
            known = ", ".join(sorted(self._policies)) or "none"
            raise UnknownPolicy(f"unknown policy {name!r} (known: {known})") from None

    def list(self) -> list[LoadedPolicy]:
        return sorted(self._policies.values(), key=lambda loaded: loaded.policy.name)

    def on_reload(self, callback: ReloadCallback) -> None:
        """`callback(result, file)` after each file reloaded: "ok", "error" or "removed"."""
        self._callbacks.append(callback)

    async def reload(self) -> None:
        """`reload_now()` after the prepare hook."""
        if self._prepare is not None and self.directory is not None:
            for file in await self._prepare():
                self._seen.pop(file, None)
        self.reload_now()

    def reload_now(self) -> None:
        """Applies every change since the last call. Raises OSError if the directory is unreadable."""
        if self.directory is None:
            return
        listed = {str(path): _fingerprint(path) for path in policy_files(self.directory)}
        current = {file: fingerprint for file, fingerprint in listed.items() if fingerprint is not None}
        events: list[tuple[ReloadResult, str]] = []
        for file in sorted(self._seen.keys() - current.keys()):
            del self._seen[file]
            self.last_errors.pop(file, None)
            if self._good.pop(file, None) is not None:
                events.append(("removed", file))
                log.info("policy file %s removed; its policy is no longer served", file)
            # A file rejected as a duplicate of this one may now be valid: read it again.
            stem = Path(file).stem
            for other in [other for other in self.last_errors if Path(other).stem == stem]:
                self._seen.pop(other, None)
        for file, fingerprint in sorted(current.items()):
            if self._seen.get(file) != fingerprint:
                self._seen[file] = fingerprint
                event = self._load(file)
                if event is not None:
                    events.append((event, file))
        policies = {loaded.policy.name: loaded for loaded in self._good.values()}
        if policies != self._policies:
            self._policies = policies
            self.generation += 1
        for result, file in events:
            self._notify(result, file)

    def _load(self, file: str) -> ReloadResult | None:
        previous = self._good.get(file)
        try:
            loaded = load_policy_file(file, build=self._build)
            owner = next((f for f, p in self._good.items() if f != file and p.policy.name == loaded.policy.name), None)
            if owner is not None:
                raise duplicate_name_error(Path(file), loaded.policy.name, owner)
        except PolicyError as exc:
            self.last_errors[file] = exc
            serving = f"version {previous.version} keeps serving" if previous else "not served"
            log.error("policy file rejected (%s):\n%s", serving, exc)
            return "error"
        had_error = self.last_errors.pop(file, None) is not None
        if previous is not None and previous.version == loaded.version and not had_error:
            return None  # touched, not changed
        self._good[file] = loaded
        log.info("policy %s loaded from %s: version %s", loaded.policy.name, file, loaded.version)
        return "ok"

    def _notify(self, result: ReloadResult, file: str) -> None:
        for callback in self._callbacks:
            try:
                callback(result, file)
            except Exception:  # noqa: BLE001 - an observer must not stop reloads
                log.exception("policy reload callback %r failed", callback)

    async def start(self) -> None:
        """Starts polling (call `reload()` first to serve policies from the start)."""
        if self._task is None:
            self._task = asyncio.create_task(self._poll(), name="policy-reload")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def _poll(self) -> None:
        while True:
            await asyncio.sleep(self.poll_interval)
            # Reading is synchronous on purpose: stat()ing and reading a few small files takes well
            # under a millisecond, and staying on the loop keeps the store single-threaded.
            try:
                await self.reload()
                self._poll_failure = None
            except OSError as exc:
                # e.g. the directory is briefly unmounted: keep serving what we have, log once.
                if str(exc) != self._poll_failure:
                    log.error("cannot read policy directory %s: %s; keeping current policies", self.directory, exc)
                self._poll_failure = str(exc)
            except Exception:  # noqa: BLE001 - a bug reading one file must not end hot reload for all
                log.exception("policy reload failed; keeping current policies")


def _fingerprint(path: Path) -> Fingerprint | None:
    try:
        stat = path.stat()
    except FileNotFoundError:  # deleted since the directory was listed: gone, like any deleted file
        return None
    # The inode catches atomic replace-by-rename even within one mtime tick.
    return stat.st_mtime_ns, stat.st_size, stat.st_ino
