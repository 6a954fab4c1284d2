"""The indexes the served policies retrieve from, hot-reloaded like policies.

One `IndexHandle` per index directory, shared by every policy (and policy version) that names it.
A poll task compares the directory's files (mtime, size, inode) every `poll_interval` and reloads
an index whose files changed, in a worker thread (loading reads and hashes every file); requests
keep using the version they found until the new one is ready. A change that does not load (a
half-copied directory, a hand edit, a missing directory) is logged and the last good version
keeps serving; it is tried again when the files change again.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Iterable
from pathlib import Path

from guard import metrics
from guard.retrieval.index import BrokenIndex, Index, load_index

log = logging.getLogger(__name__)

Fingerprint = tuple[tuple[str, int, int, int], ...]


def _fingerprint(path: Path) -> Fingerprint | None:
    """The directory's files as (name, mtime, size, inode); None when it is not there."""
    try:
        files = sorted(p for p in path.iterdir() if p.is_file())
        return tuple((p.name, (s := p.stat()).st_mtime_ns, s.st_size, s.st_ino) for p in files)
    except OSError:
        return None


class IndexHandle:
    """The current good version of one index directory."""

    def __init__(self, path: Path, index: Index, fingerprint: Fingerprint | None) -> None:
        self.path = path
        self.index = index
        self.fingerprint = fingerprint
        self.last_error: str | None = None


class Indexes:
    def __init__(self, poll_interval: float = 0.5) -> None:
        self.poll_interval = poll_interval
        self._handles: dict[Path, IndexHandle] = {}
        self._task: asyncio.Task[None] | None = None

    def open(self, path: str | Path) -> IndexHandle:
        """The handle of the index at `path`, loading it now if no policy uses it yet. Raises BrokenIndex.

        Blocking (the first load of a large index reads and hashes its files): it runs when a policy naming the
        index is built, before the policy serves.
        """
        resolved = Path(path).expanduser().resolve()
        handle = self._handles.get(resolved)
        if handle is None:
            fingerprint = _fingerprint(resolved)
            handle = self._handles[resolved] = IndexHandle(resolved, load_index(resolved), fingerprint)
            _loaded(handle)
        return handle

    def retain(self, paths: Iterable[str | Path]) -> None:
        """Stops watching indexes no served policy names (a pipeline still holding one keeps using it)."""
        keep = {Path(path).expanduser().resolve() for path in paths}
        for path in [p for p in self._handles if p not in keep]:
            del self._handles[path]
            metrics.INDEX_CHUNKS.remove(str(path))

    def handles(self) -> list[IndexHandle]:
        return list(self._handles.values())

    async def reload_changed(self) -> None:
        """Reloads every index whose files changed since it was last read."""
        for handle in list(self._handles.values()):
            fingerprint = _fingerprint(handle.path)
            if fingerprint == handle.fingerprint:
                continue
            handle.fingerprint = fingerprint
            try:
                index = await asyncio.to_thread(load_index, handle.path)
            except BrokenIndex as exc:
                _rejected(handle, str(exc))
                continue
            except Exception as exc:  # noqa: BLE001 - a library error on a damaged file is as broken as the rest
                _rejected(handle, f"{handle.path}: cannot load: {exc!r}")
                continue
            if index.version == handle.index.version:
                index.close()  # touched, not changed
                handle.last_error = None
                continue
            handle.index, handle.last_error = index, None
            _loaded(handle)

    async def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._poll(), name="index-reload")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def _poll(self) -> None:
        while True:
            await asyncio.sleep(self.poll_interval)
            try:
                await self.reload_changed()
            except Exception:  # noqa: BLE001 - a bug reloading one index must not end hot reload for all
                log.exception("index reload failed; keeping current indexes")


def _loaded(handle: IndexHandle) -> None:
    index = handle.index
    log.info("index %s loaded: version %s, %d chunks from %d documents", handle.path, index.version, len(index),
             len(index.manifest.documents))
    metrics.INDEX_RELOADS.labels(result="ok").inc()
    metrics.INDEX_CHUNKS.labels(str(handle.path)).set(len(index))


def _rejected(handle: IndexHandle, reason: str) -> None:
    handle.last_error = reason
    log.error("index rejected (version %s keeps serving): %s", handle.index.version, reason)
    metrics.INDEX_RELOADS.labels(result="error").inc()
