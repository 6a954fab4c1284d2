"""The index on disk: what `guard index build` writes, what `guard index query` prints, and what a load refuses."""

from __future__ import annotations

import hashlib
import json
import shutil
import sqlite3
import tempfile
from pathlib import Path

import numpy as np
import pytest

from guard import cli
from guard.retrieval.build import build_index
from guard.retrieval.chunking import Chunk, ChunkingParams
from guard.retrieval.index import ANN_FILE, CHUNKS_FILE, MANIFEST, BrokenIndex, load_index, write_index
from guard.safety.embedder import BUNDLED, Embedder
from tests.support.manuals import write_manuals


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("index")
    report = build_index(write_manuals(root / "docs"), root / "manuals.index", params=ChunkingParams(max_words=100, overlap_words=20))
    return root, report


@pytest.fixture(scope="module")
def encoder():
    return Embedder()


def copy_of(built, tmp_path: Path) -> Path:
    return Path(shutil.copytree(built[1].path, tmp_path / "copy.index"))


def test_the_index_directory_holds_a_manifest_the_graph_and_the_chunks_and_no_pickle(built):
    root, report = built
    assert sorted(p.name for p in report.path.iterdir()) == [CHUNKS_FILE, MANIFEST, ANN_FILE]
    manifest = json.loads((report.path / MANIFEST).read_text())
    assert (manifest["format"], manifest["format_version"]) == ("guard-index", 1)
    assert manifest["encoder"] == {"model": BUNDLED, "dimension": 384}
    assert manifest["chunking"] == {"splitter": "sentences-v1", "max_words": 100, "overlap_words": 20}
    assert manifest["ann"]["library"] == "faiss" and manifest["ann"]["structure"] == "HNSWFlat"
    assert manifest["chunks"] == report.chunks == 9 and report.documents == 4
    aurora = next(d for d in manifest["documents"] if d["path"] == "aurora-x200.md")
    assert aurora["sha256"] == hashlib.sha256((root / "docs" / "aurora-x200.md").read_bytes()).hexdigest()
    assert aurora["chunks"] == 3
    with sqlite3.connect(report.path / CHUNKS_FILE) as db:
        assert db.execute("SELECT id, document FROM chunks WHERE row = 0").fetchone() == ("aurora-x200.md#0", "aurora-x200.md")
    assert set(report.seconds) == {"read", "chunk", "load_encoder", "embed", "write"} and report.chunks_per_second > 0


def test_search_finds_the_chunk_that_answers(built, encoder):
    index = load_index(built[1].path)
    [query] = encoder.encode(["What does error F2 on the espresso machine mean?"])
    hits = index.search(query, 3)
    assert [hit.id for hit in hits][0] == "nimbus-k7.md#2"
    assert hits[0].heading == "Nimbus K7 espresso machine > Error codes" and "water tank is empty" in hits[0].text
    assert hits[0].score == pytest.approx(float(query @ index.vectors([hits[0].row])[0]), abs=1e-5)
    assert [h.score for h in hits] == sorted((h.score for h in hits), reverse=True)
    assert len(index.search(query, 50)) == len(index) == 9


def test_guard_index_query_prints_scores_and_sources(built, capsys):
    assert cli.main(["index", "query", str(built[1].path), "How do I reset the thermostat?", "-k", "2"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert "9 chunks" in lines[0]
    assert lines[1].startswith("1. 0.") and "tundra-t5.txt#0  (tundra-t5)" in lines[1]
    assert "hold the dial for 10 seconds" in lines[2]
    assert cli.main(["index", "query", str(built[1].path), "descale", "-k", "1", "--json"]) == 0
    [record] = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert record["id"] == "nimbus-k7.md#1" and set(record) == {"id", "score", "document", "heading", "text"}


def test_guard_index_build_reports_and_refuses_an_empty_directory(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert cli.main(["index", "build", str(tmp_path / "empty"), "-o", str(tmp_path / "x.index")]) == 1
    assert "no text in any" in capsys.readouterr().err
    assert cli.main(["index", "build", str(tmp_path / "missing"), "-o", str(tmp_path / "x.index")]) == 1
    assert "is not a directory" in capsys.readouterr().err


def test_a_rebuild_replaces_the_index_in_place_and_changes_its_version(tmp_path, built):
    path = copy_of(built, tmp_path)
    before = load_index(path).version
    chunks = [Chunk("a.md", 0, "A", "one"), Chunk("a.md", 1, "A", "two")]
    vectors = np.eye(2, 384, dtype=np.float32)
    write_index(path, [], chunks, vectors, encoder=BUNDLED, params=ChunkingParams())
    index = load_index(path)
    assert index.version != before and len(index) == 2
    assert [hit.id for hit in index.search(vectors[1], 1)] == ["a.md#1"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["copy.index"]  # no staging or retired directory left


def test_write_index_will_not_replace_a_directory_that_is_not_an_index(tmp_path):
    (tmp_path / "precious").mkdir()
    (tmp_path / "precious" / "thesis.md").write_text("mine")
    with pytest.raises(FileExistsError):
        write_index(tmp_path / "precious", [], [], np.zeros((0, 384), np.float32), encoder=BUNDLED, params=ChunkingParams())
    assert (tmp_path / "precious" / "thesis.md").read_text() == "mine"


def _truncate(path: Path) -> None:
    data = (path / ANN_FILE).read_bytes()
    (path / ANN_FILE).write_bytes(data[: len(data) // 2])


def _flip_a_byte(path: Path) -> None:
    data = bytearray((path / CHUNKS_FILE).read_bytes())
    data[-10] ^= 0xFF
    (path / CHUNKS_FILE).write_bytes(bytes(data))


def _future_version(path: Path) -> None:
    manifest = json.loads((path / MANIFEST).read_text())
    manifest["format_version"] = 2
    (path / MANIFEST).write_text(json.dumps(manifest))


def _not_json(path: Path) -> None:
    (path / MANIFEST).write_text("{")


@pytest.mark.parametrize(
    ("damage", "reason"),
    [
        (_truncate, "incomplete copy"),
        (_flip_a_byte, "differs from the manifest's SHA-256"),
        (_future_version, "rebuild it"),
        (_not_json, "not JSON"),
        (lambda path: (path / MANIFEST).unlink(), "not an index directory"),
    ],
)
def test_a_damaged_index_is_refused_with_the_reason(tmp_path, built, damage, reason):
    path = copy_of(built, tmp_path)
    damage(path)
    with pytest.raises(BrokenIndex, match=reason):
        load_index(path)


def test_the_graph_finds_what_exact_search_finds():
    rng = np.random.default_rng(0)
    centers = rng.standard_normal((40, 384)).astype(np.float32)
    vectors = centers[rng.integers(0, 40, 3000)] + rng.standard_normal((3000, 384)).astype(np.float32) * 0.06
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    chunks = [Chunk("synthetic.md", i, "", f"chunk {i}") for i in range(len(vectors))]
    with tempfile.TemporaryDirectory() as directory:
        index = load_index(write_index(Path(directory) / "s.index", [], chunks, vectors, encoder=BUNDLED, params=ChunkingParams()))
        queries = vectors[:100] + rng.standard_normal((100, 384)).astype(np.float32) * 0.03
        queries /= np.linalg.norm(queries, axis=1, keepdims=True)
        found = exact = 0
        for query in queries:
            truth = set(np.argsort(-(vectors @ query))[:10])
            found += len(truth & {hit.row for hit in index.search(query, 10)})
            exact += 10
        assert found / exact >= 0.97
