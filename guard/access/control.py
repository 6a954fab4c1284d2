"""Authenticates callers and decides which policies, traces and refusal details they get.

Without a key file guard is open (meant for loopback): every caller is the `anonymous`
tenant, limited only by `--allow-policies`. With one, every Generate/Score/ListPolicies call
needs `authorization: Bearer <key>`; the file is re-read when it changes, and a file that
does not validate keeps the last good one in force (like policies).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from guard.access.keys import ALL_POLICIES, KeyFile, RateLimit, hash_key, load_key_file
from guard.access.ratelimit import TenantLimiter
from guard.errors import PermissionDenied, Unauthenticated
from guard.policy.loader import PolicyError

log = logging.getLogger(__name__)

ANONYMOUS = "anonymous"
_NEVER_READ = object()
OTHER = "other"  # the metric label of callers that are no known tenant (unauthenticated ones)


@dataclass(frozen=True)
class Tenant:
    name: str
    policies: frozenset[str] | None  # None: every policy served
    default_policy: str | None  # None: the server's default policy
    trace: bool
    refusal_details: bool
    rate_limit: RateLimit | None = None

    def may_use(self, policy: str) -> bool:
        return self.policies is None or policy in self.policies


def _tenants(config: KeyFile) -> tuple[dict[str, Tenant], dict[str, str]]:
    """(tenants by name, tenant name by key hash)."""
    tenants = {
        entry.name: Tenant(
            name=entry.name,
            policies=None if ALL_POLICIES in entry.policies else frozenset(entry.policies),
            default_policy=entry.default_policy or entry.policies[0],
            trace=entry.trace,
            refusal_details=entry.refusal_details,
            rate_limit=entry.rate_limit,
        )
        for entry in config.tenants
    }
    return tenants, {key.sha256: key.tenant for key in config.keys}


class AccessControl:
    def __init__(
        self,
        key_file: Path | None = None,
        *,
        allow_policies: Sequence[str] = (),
        poll_interval: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.key_file = key_file
        self.poll_interval = poll_interval
        self.clock = clock
        self.last_error: PolicyError | None = None
        allowed = frozenset(allow_policies) or None
        self.anonymous = Tenant(
            ANONYMOUS,
            policies=allowed,
            # A fixed policy (one allowed) needs no name in requests.
            default_policy=allow_policies[0] if len(allow_policies) == 1 else None,
            trace=True,
            refusal_details=True,
        )
        self._tenants: dict[str, Tenant] = {}
        self._by_hash: dict[str, str] = {}
        self._limiters: dict[str, TenantLimiter] = {}
        self._seen: object = _NEVER_READ  # the file's (mtime, size, inode) when last read; None: unreadable
        self._task: asyncio.Task | None = None
        if key_file is not None:
            self.reload_now()
            if self.last_error is not None:
                raise self.last_error  # no last good version to fall back on at startup

    @property
    def open(self) -> bool:
        return self.key_file is None

    def tenant_names(self) -> list[str]:
        return sorted(self._tenants) if not self.open else [ANONYMOUS]

    def authenticate(self, authorization: str | None) -> Tenant:
        """The tenant of an `authorization` header / metadata value ("Bearer <key>")."""
        if self.open:
            return self.anonymous
        if not authorization:
            raise Unauthenticated("authorization: missing API key (send 'authorization: Bearer <key>')")
        scheme, _, key = authorization.strip().partition(" ")
        if scheme.lower() != "bearer" or not key.strip():
            raise Unauthenticated("authorization: expected 'Bearer <key>'")
        digest = hash_key(key.strip())
        # The lookup compares hashes of keys, so its timing tells nothing about any stored key.
        tenant = self._by_hash.get(digest)
        if tenant is None:
            raise Unauthenticated("authorization: unknown API key")
        return self._tenants[tenant]

    def policy_for(self, tenant: Tenant, requested: str, server_default: str) -> str:
        """The policy a request gets: the one it names, else the tenant's default, else the server's."""
        name = requested or tenant.default_policy or server_default
        if not tenant.may_use(name):
            raise PermissionDenied(f"policy: tenant {tenant.name!r} may not use policy {name!r}")
        return name

    def check_trace(self, tenant: Tenant) -> None:
        if not tenant.trace:
            raise PermissionDenied(f"include_trace: tenant {tenant.name!r} may not receive traces")

    def admit(self, tenant: Tenant) -> None:
        """Counts a request against the tenant's rate limit (raises ResourceExhausted)."""
        limiter = self._limiter(tenant)
        if limiter is not None:
            limiter.admit()

    def charge_tokens(self, tenant: Tenant, tokens: int) -> None:
        limiter = self._limiter(tenant)
        if limiter is not None:
            limiter.charge_tokens(tokens)

    def _limiter(self, tenant: Tenant) -> TenantLimiter | None:
        # By name, with the limits in force now: a request admitted before a reload charges the same buckets.
        current = self._tenants.get(tenant.name, tenant)
        if current.rate_limit is None:
            return None
        limiter = self._limiters.get(current.name)
        if limiter is None:
            limiter = self._limiters[current.name] = TenantLimiter(current.name, current.rate_limit, self.clock)
        return limiter

    def metric_label(self, tenant: Tenant | None) -> str:
        return tenant.name if tenant is not None else OTHER

    # Hot reload, like the policy store: poll (mtime, size, inode).

    def reload_now(self) -> bool:
        """Re-reads the key file if it changed; True when a new version took effect."""
        assert self.key_file is not None
        try:
            stat = self.key_file.stat()
            fingerprint = (stat.st_mtime_ns, stat.st_size, stat.st_ino)
        except OSError:
            fingerprint = None  # load_key_file reports why
        if fingerprint == self._seen:
            return False
        self._seen = fingerprint
        try:
            config = load_key_file(self.key_file)
        except PolicyError as exc:
            self.last_error = exc
            kept = "the last good keys stay in force" if self._tenants else "no key is accepted"
            log.error("API key file rejected (%s):\n%s", kept, exc)
            return False
        self._tenants, self._by_hash = _tenants(config)
        # A tenant whose limits were edited starts with fresh buckets; the others keep theirs.
        self._limiters = {
            name: limiter
            for name, limiter in self._limiters.items()
            if name in self._tenants and self._tenants[name].rate_limit == limiter.limit
        }
        self.last_error = None
        log.info("API keys loaded from %s: %d tenants, %d keys", self.key_file, len(self._tenants), len(self._by_hash))
        return True

    async def start(self) -> None:
        if self.key_file is not None and self._task is None:
            self._task = asyncio.create_task(self._poll(), name="key-file-reload")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def _poll(self) -> None:
        while True:
            await asyncio.sleep(self.poll_interval)
            self.reload_now()
