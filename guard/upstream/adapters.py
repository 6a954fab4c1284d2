"""LoRA adapters that policies ask vLLM for.

A policy names an adapter (`adapter: support-v2`: vLLM must already serve it) or declares one
(`adapter: {name: support-v2, path: adapters/support-v2}`, the path relative to the policy file). The
declared adapters of a policy directory are the ones guard makes vLLM serve: the managed vLLM starts with
them (`--enable-lora --lora-modules name=path ...`), and before each policy reload guard loads declared
adapters an upstream does not serve yet through vLLM's runtime loading (POST /v1/load_lora_adapter, offered
when vLLM runs with VLLM_ALLOW_RUNTIME_LORA_UPDATING=True), so a policy added while guard runs can declare a
new adapter. Whether a policy can be served is read from every upstream's /v1/models, where adapters appear
with their `parent` base model: a policy naming an adapter that some upstream does not serve is rejected at
load (file, line, reason) and the last good version keeps serving.

Nothing here imports torch: the supervisor of several workers starts the managed vLLM with these arguments.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import yaml

from guard.policy.loader import LoadedPolicy, PolicyBuildError, policy_files
from guard.upstream.client import AdapterLoadError, ServedModel, UpstreamClient, UpstreamError

log = logging.getLogger(__name__)

# The ranks vLLM's --max-lora-rank accepts.
VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
# vLLM's own default rank: room for adapters declared after the managed vLLM started.
MIN_MANAGED_RANK = 16
# Adapters in one batch; vLLM swaps others in as requests need them (each slot costs rank-sized buffers).
MAX_MANAGED_LORAS = 8
# While an adapter is declared or a policy waits for one, vLLM's list is read again this often: a restarted
# vLLM gets its declared adapters back, and a waiting policy is read again once its adapter appears.
RECHECK_SECONDS = 5.0

Ref = tuple[str, Path | None]  # (adapter name, declared path or None)
Fingerprint = tuple[int, int, int]


@dataclass(frozen=True)
class DeclaredAdapter:
    name: str
    path: Path
    rank: int


def resolve_adapter_path(source: str, path: str) -> Path:
    """A declared path as vLLM must see it: absolute, relative paths taken from the policy file's directory."""
    return (Path(source).parent / Path(path).expanduser()).resolve()


def adapter_rank(directory: Path) -> int:
    """The LoRA rank of a PEFT adapter directory (the largest, with per-module ranks). ValueError: why it is unusable."""
    config_file = directory / "adapter_config.json"
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ValueError(f"{directory} is not a PEFT adapter directory: it has no adapter_config.json") from None
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise ValueError(f"cannot read {config_file}: {exc}") from None
    if not isinstance(config, dict) or config.get("peft_type", "LORA") != "LORA":
        raise ValueError(f"{config_file}: not a LoRA adapter (peft_type {config.get('peft_type')!r})")
    ranks = [config.get("r")] + list((config.get("rank_pattern") or {}).values())
    if not all(isinstance(rank, int) and rank > 0 for rank in ranks):
        raise ValueError(f"{config_file}: no valid rank 'r'")
    return max(ranks)


def check_adapter_path(loaded: LoadedPolicy) -> Path | None:
    """The policy's declared adapter directory, resolved; PolicyBuildError when it is not a LoRA adapter."""
    adapter = loaded.policy.adapter
    if adapter is None or adapter.path is None:
        return None
    path = resolve_adapter_path(loaded.source, adapter.path)
    try:
        adapter_rank(path)
    except ValueError as exc:
        raise PolicyBuildError(("adapter", "path"), str(exc)) from None
    return path


def _ref(file: Path) -> Ref | None:
    """The adapter a policy file names, read leniently: what does not parse is the policy loader's to report."""
    try:
        data = yaml.safe_load(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return None
    adapter = data.get("adapter") if isinstance(data, dict) else None
    if isinstance(adapter, str):
        return adapter, None
    if isinstance(adapter, dict) and isinstance(adapter.get("name"), str):
        path = adapter.get("path")
        return adapter["name"], resolve_adapter_path(str(file), path) if isinstance(path, str) and path else None
    return None


def declared_adapters(directory: Path | str) -> list[DeclaredAdapter]:
    """The usable adapters the policy files of `directory` declare, the first declaration of each name.

    One that is not (no adapter_config.json, another path under a name already declared) is left out and
    logged; the policy declaring it is rejected when it loads.
    """
    found: dict[str, DeclaredAdapter] = {}
    for file in policy_files(Path(directory)):
        ref = _ref(file)
        if ref is None or ref[1] is None:
            continue
        name, path = ref
        if name in found:
            if found[name].path != path:
                log.warning("%s declares adapter %r at %s, already declared at %s: left out", file, name, path, found[name].path)
            continue
        try:
            found[name] = DeclaredAdapter(name, path, adapter_rank(path))
        except ValueError as exc:
            log.warning("%s declares adapter %r, which vLLM could not load: %s", file, name, exc)
    return list(found.values())


def vllm_lora_args(adapters: list[DeclaredAdapter]) -> list[str]:
    """The managed vLLM's arguments serving `adapters` (none: LoRA stays off, since on CPU it turns off torch.compile)."""
    if not adapters:
        return []
    needed = max(MIN_MANAGED_RANK, *(adapter.rank for adapter in adapters))
    rank = next((rank for rank in VLLM_LORA_RANKS if rank >= needed), VLLM_LORA_RANKS[-1])
    args = ["--enable-lora", "--max-lora-rank", str(rank), "--max-loras", str(min(len(adapters), MAX_MANAGED_LORAS))]
    return args + ["--lora-modules", *(f"{adapter.name}={adapter.path}" for adapter in adapters)]


# vLLM offers runtime loading only with this set; the managed vLLM has it when it starts with adapters.
RUNTIME_LOADING_ENV = {"VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True"}


class Adapters:
    """What the upstreams serve, kept current for the policies that name adapters.

    `prepare()` runs before each policy reload (awaited, on the event loop); `check()` runs in the policy
    builder (synchronous) and answers from what `prepare()` last read.
    """

    def __init__(self, upstream: UpstreamClient, directory: Path | None, *, recheck_seconds: float = RECHECK_SECONDS) -> None:
        self.upstream = upstream
        self.directory = directory
        self.recheck_seconds = recheck_seconds
        self._served: dict[str, dict[str, ServedModel]] = {}  # by endpoint URL, from its last answer
        self._unreachable: dict[str, str] = {}  # endpoint URL -> why it did not answer last time
        self._refs: dict[str, tuple[Fingerprint | None, Ref | None]] = {}  # by policy file
        self._load_errors: dict[Ref, str] = {}  # why vLLM did not load a declared adapter; cleared when its file changes
        self._waiting: set[str] = set()  # files rejected for their adapter: read again when an upstream's list changes
        self._next_check = 0.0

    async def prepare(self) -> set[str]:
        """Loads newly declared adapters, reads the upstreams' lists when a policy needs them, and returns the
        files the policy store should read again although they did not change (their adapter appeared)."""
        changed = self._scan()
        now = time.monotonic()
        needed = any(ref is not None for ref in changed.values())
        due = bool(self._waiting or self._declared()) and now >= self._next_check
        if not (needed or due):
            return set()
        self._next_check = now + self.recheck_seconds
        before = self._snapshot()
        await self._refresh()
        failures = await self._load_missing()
        if failures is not None:
            await self._refresh()
            for name, path, url, reason in failures:
                # Not retried until the declaring file changes: vLLM would fail the same way. Unless it serves the
                # adapter after all (another guard worker loaded it first).
                if name not in self._served.get(url, {}):
                    self._load_errors[(name, path)] = reason
                    log.error("%s", reason)
        # A waiting file edited between the last scan and the store's read was checked against a list read for its
        # older text, and the store will not read it again by itself.
        again = self._waiting & changed.keys()
        if self._snapshot() != before:
            again = set(self._waiting)
        self._waiting -= again
        return again

    def check(self, loaded: LoadedPolicy) -> None:
        """PolicyBuildError unless every upstream that answered serves the policy's adapter (from its path, if declared)."""
        adapter = loaded.policy.adapter
        if adapter is None:
            return
        path = check_adapter_path(loaded)  # a broken directory waits for an edit, not for vLLM
        try:
            self._check_served(adapter.name, path)
        except PolicyBuildError:
            self._waiting.add(loaded.source)
            raise
        self._waiting.discard(loaded.source)

    def _check_served(self, name: str, path: Path | None) -> None:
        if not self._served:
            why = "; ".join(self._unreachable.values()) or "not asked yet"
            raise PolicyBuildError(("adapter",), f"cannot check adapter {name!r}: no upstream answered /v1/models ({why})")
        for url, served in self._served.items():
            model = served.get(name)
            if model is None:
                reason = self._load_errors.get((name, path)) if path is not None else None
                if reason is None:
                    reason = f"upstream {url} does not serve adapter {name!r} (it serves: {', '.join(served) or 'nothing'})"
                    if path is None:
                        reason += "; declare it with a path, or start vLLM with --lora-modules"
                raise PolicyBuildError(("adapter",), reason)
            if model.parent is None:
                raise PolicyBuildError(("adapter",), f"{name!r} is a base model upstream {url} serves, not a LoRA adapter: use model: {name}")
            if path is not None and model.root is not None and Path(model.root).resolve() != path:
                reason = (
                    f"upstream {url} serves adapter {name!r} from {model.root}, not {path}: "
                    "one name, two adapters (give each adapter version its own name)"
                )
                raise PolicyBuildError(("adapter", "path"), reason)

    def _scan(self) -> dict[str, Ref | None]:
        """The adapter refs of the policy files changed since the last scan, by file."""
        if self.directory is None:
            return {}
        changed: dict[str, Ref | None] = {}
        try:
            files = {str(path): path for path in policy_files(self.directory)}
        except OSError:
            return {}  # the store logs an unreadable directory
        for file in self._refs.keys() - files.keys():
            del self._refs[file]
        for file, path in files.items():
            fingerprint = _fingerprint(path)
            if file in self._refs and self._refs[file][0] == fingerprint:
                continue
            ref = _ref(path)
            previous = self._refs.get(file, (None, None))[1]
            self._load_errors.pop(previous, None)  # an edit of the declaring file tries the load again
            if ref is not None:
                self._load_errors.pop(ref, None)
            self._refs[file] = (fingerprint, ref)
            changed[file] = ref
        return changed

    def _declared(self) -> dict[str, Path]:
        """Declared adapters by name, the first declaration in file order."""
        declared: dict[str, Path] = {}
        for file in sorted(self._refs):
            ref = self._refs[file][1]
            if ref is not None and ref[1] is not None:
                declared.setdefault(ref[0], ref[1])
        return declared

    def _snapshot(self) -> dict[str, frozenset[ServedModel]]:
        return {url: frozenset(served.values()) for url, served in self._served.items()}

    async def _refresh(self) -> None:
        for endpoint in self.upstream.endpoints:
            try:
                models = await self.upstream.models_at(endpoint.url)
            except UpstreamError as exc:
                self._served.pop(endpoint.url, None)
                self._unreachable[endpoint.url] = str(exc)
                continue
            self._served[endpoint.url] = {model.id: model for model in models}
            self._unreachable.pop(endpoint.url, None)

    async def _load_missing(self) -> list[tuple[str, Path, str, str]] | None:
        """Asks each upstream that does not serve a declared adapter to load it: the failures as (name, path, url,
        reason), or None when no upstream was asked."""
        failures: list[tuple[str, Path, str, str]] | None = None
        for name, path in self._declared().items():
            if (name, path) in self._load_errors:
                continue
            try:
                adapter_rank(path)
            except ValueError:
                continue  # check() names the problem; vLLM would only fail on it
            for url, served in self._served.items():
                if name in served:
                    continue
                failures = failures if failures is not None else []
                try:
                    await self.upstream.load_lora_adapter(url, name, str(path))
                    log.info("upstream %s loaded adapter %r from %s", url, name, path)
                except UpstreamError as exc:
                    hint = (
                        " (it does not load adapters at run time: start it with --enable-lora and "
                        "VLLM_ALLOW_RUNTIME_LORA_UPDATING=True, or with --lora-modules; the managed vLLM does so when "
                        "policies declare adapters as guard starts)"
                        if isinstance(exc, AdapterLoadError) and exc.route_missing
                        else ""
                    )
                    failures.append((name, path, url, f"upstream {url} could not load adapter {name!r} from {path}: {exc}{hint}"))
        return failures


def _fingerprint(path: Path) -> Fingerprint | None:
    try:
        stat = path.stat()
    except OSError:
        return None
    return stat.st_mtime_ns, stat.st_size, stat.st_ino
