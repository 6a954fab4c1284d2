"""Indexes hot-reload like policies: a rebuilt index is picked up without a restart, a broken one is logged and
kept out while the last good version serves."""

from __future__ import annotations

import asyncio
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest

from guard import metrics
from guard.retrieval.chunking import Chunk, ChunkingParams
from guard.retrieval.index import ANN_FILE, BrokenIndex, write_index
from guard.retrieval.registry import Indexes
from guard.safety.embedder import BUNDLED


def write(path: Path, texts: list[str]) -> Path:
    """An index whose chunk i has the i-th unit vector (no encoder needed)."""
    chunks = [Chunk("doc.md", i, "Doc", text) for i, text in enumerate(texts)]
    return write_index(path, [], chunks, np.eye(len(texts), 384, dtype=np.float32), encoder=BUNDLED, params=ChunkingParams())


def reloads(result: str) -> float:
    return metrics.REGISTRY.get_sample_value("guard_index_reloads_total", {"result": result}) or 0.0


def first_text(indexes: Indexes, path: Path) -> str:
    [hit] = indexes.open(path).index.search(np.eye(1, 384, dtype=np.float32)[0], 1)
    return hit.text


async def test_a_rebuilt_index_is_picked_up_by_the_poll(tmp_path):
    path = write(tmp_path / "docs.index", ["old text"])
    indexes = Indexes(poll_interval=0.05)
    handle = indexes.open(path)
    old = handle.index.version
    await indexes.start()
    try:
        write(path, ["new text", "more"])
        for _ in range(100):
            await asyncio.sleep(0.05)
            if handle.index.version != old:
                break
        assert handle.index.version != old and len(handle.index) == 2
        assert first_text(indexes, path) == "new text"
        assert indexes.open(str(path)) is handle  # one handle per directory, however it is named
    finally:
        await indexes.stop()


async def test_a_broken_index_keeps_the_last_good_version_serving(tmp_path, caplog):
    path = write(tmp_path / "docs.index", ["good text"])
    indexes = Indexes()
    handle = indexes.open(path)
    good = handle.index.version
    errors = reloads("error")

    (path / ANN_FILE).write_bytes((path / ANN_FILE).read_bytes()[:100])  # a half-copied file
    with caplog.at_level(logging.ERROR, logger="guard.retrieval.registry"):
        await indexes.reload_changed()
    assert handle.index.version == good and first_text(indexes, path) == "good text"
    assert "incomplete copy" in handle.last_error and reloads("error") == errors + 1
    assert f"version {good} keeps serving" in caplog.text
    await indexes.reload_changed()  # unchanged since: not retried, not logged again
    assert reloads("error") == errors + 1

    shutil.rmtree(path)  # gone (e.g. mid-swap by hand): still the last good version
    await indexes.reload_changed()
    assert handle.index.version == good and "not an index directory" in handle.last_error

    write(path, ["fixed text"])
    await indexes.reload_changed()
    assert handle.index.version != good and handle.last_error is None and first_text(indexes, path) == "fixed text"


async def test_a_touched_index_is_not_reloaded(tmp_path):
    path = write(tmp_path / "docs.index", ["text"])
    indexes = Indexes()
    handle = indexes.open(path)
    index, ok = handle.index, reloads("ok")
    (path / "manifest.json").touch()
    await indexes.reload_changed()
    assert handle.index is index and reloads("ok") == ok


def test_opening_a_broken_index_fails_and_retain_drops_the_unnamed(tmp_path):
    indexes = Indexes()
    with pytest.raises(BrokenIndex):
        indexes.open(tmp_path / "nothing")
    kept, dropped = write(tmp_path / "a.index", ["a"]), write(tmp_path / "b.index", ["b"])
    indexes.open(kept), indexes.open(dropped)
    indexes.retain([str(kept)])
    assert [handle.path for handle in indexes.handles()] == [kept]
