"""A retrieval index on disk: a directory guard builds once and serves read-only.

    INDEX/manifest.json    format version, encoder, chunking parameters, ANN parameters,
                           each document's SHA-256, each data file's SHA-256 and size
    INDEX/vectors.faiss    the approximate-nearest-neighbour graph (faiss HNSW over unit
                           vectors, inner product = cosine; the vectors are stored in it)
    INDEX/chunks.sqlite    chunk texts and metadata, row i = vector i

faiss was chosen by measurement against hnswlib and usearch (benchmarks/retrieval.py, README):
the same recall and query latency as hnswlib, wheels on PyPI (hnswlib compiles from source), and
faster queries than usearch at equal graph parameters. Nothing is pickled.

An index is written into a new directory beside its destination and swapped in by renames, so a
server polling the destination sees the old index or the new one; a load checks the format
version, every file's size and SHA-256, and the counts, so a torn or hand-edited index is
refused (and the server keeps the last good one: see registry.py).
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import json
import shutil
import sqlite3
import tempfile
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, ValidationError

from guard.retrieval.chunking import SPLITTER, Chunk, ChunkingParams, Document
from guard.safety.embedder import BUNDLED, EncoderSpec

FORMAT = "guard-index"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
ANN_FILE = "vectors.faiss"
CHUNKS_FILE = "chunks.sqlite"
VERSION_LENGTH = 12
# HNSW graph: 32 links per node, built with a 128-wide beam and searched with a 64-wide one (at
# least k): recall@10 >= 0.99 on the benchmark's 100k vectors at well under a millisecond a query.
HNSW_M = 32
HNSW_EF_CONSTRUCTION = 128
HNSW_EF_SEARCH = 64
_HASH_BLOCK = 1 << 20


class BrokenIndex(Exception):
    """An index directory that cannot be served (missing, wrong format, damaged)."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class EncoderInfo(_Strict):
    model: str  # BUNDLED, or the sentence-transformers directory it was built with
    dimension: int


class ChunkingInfo(_Strict):
    splitter: str
    max_words: int
    overlap_words: int


class AnnInfo(_Strict):
    library: Literal["faiss"]
    version: str
    structure: Literal["HNSWFlat"]
    metric: Literal["inner_product"]
    m: int
    ef_construction: int
    ef_search: int


class DocumentInfo(_Strict):
    path: str
    sha256: str
    bytes: int
    chunks: int


class FileInfo(_Strict):
    name: str
    sha256: str
    bytes: int


class Manifest(_Strict):
    format: Literal["guard-index"]
    format_version: Literal[1]
    created: str
    encoder: EncoderInfo
    chunking: ChunkingInfo
    ann: AnnInfo
    chunks: int
    documents: list[DocumentInfo]
    files: dict[Literal["ann", "chunks"], FileInfo]


@dataclass(frozen=True)
class Hit:
    row: int
    id: str  # "<document>#<ordinal>"
    document: str
    heading: str
    text: str
    score: float  # cosine similarity to the query


def encoder_spec(model: str) -> EncoderSpec:
    return EncoderSpec(None if model == BUNDLED else model)


class Index:
    """A loaded index. `search` blocks (milliseconds at most): call it from a worker thread."""

    def __init__(self, path: Path, manifest: Manifest, version: str, ann, chunks: sqlite3.Connection) -> None:
        self.path = path
        self.manifest = manifest
        self.version = version  # the manifest's content hash: changes with every build
        self.encoder = encoder_spec(manifest.encoder.model)
        self._ann = ann
        self._chunks = chunks
        self._lock = threading.Lock()  # one SQLite connection, shared by the worker threads

    def __len__(self) -> int:
        return self.manifest.chunks

    def search(self, query: np.ndarray, k: int, min_score: float = -1.0) -> list[Hit]:
        """The `k` chunks most similar to the unit vector `query`, best first, those below `min_score` left out."""
        if not len(self):
            return []
        import faiss

        k = min(k, len(self))
        # Per call, not on the shared index: searches run concurrently in worker threads.
        params = faiss.SearchParametersHNSW(efSearch=max(HNSW_EF_SEARCH, k))
        scores, rows = self._ann.search(np.ascontiguousarray(query, dtype=np.float32).reshape(1, -1), k, params=params)
        found = [(int(row), float(score)) for row, score in zip(rows[0], scores[0]) if row >= 0 and score >= min_score]
        if not found:
            return []
        marks = ",".join("?" * len(found))
        with self._lock:
            records = {
                row: (chunk_id, document, heading, text)
                for row, chunk_id, document, heading, text in self._chunks.execute(
                    f"SELECT row, id, document, heading, text FROM chunks WHERE row IN ({marks})", [row for row, _ in found]
                )
            }
        return [Hit(row, *records[row], score) for row, score in found]

    def vectors(self, rows: Sequence[int]) -> np.ndarray:
        """The stored unit vectors of these rows."""
        if not rows:
            return np.zeros((0, self.manifest.encoder.dimension), dtype=np.float32)
        return np.stack([self._ann.reconstruct(int(row)) for row in rows])

    def close(self) -> None:
        with self._lock:
            self._chunks.close()


def load_index(path: Path | str) -> Index:
    """Raises BrokenIndex naming what is wrong."""
    import faiss

    path = Path(path).expanduser()
    try:
        data = (path / MANIFEST).read_bytes()
    except OSError as exc:
        raise BrokenIndex(f"{path}: not an index directory ({exc.strerror or exc})") from None
    try:
        raw = json.loads(data)
    except ValueError as exc:
        raise BrokenIndex(f"{path / MANIFEST}: not JSON ({exc})") from None
    if not isinstance(raw, dict) or raw.get("format") != FORMAT:
        raise BrokenIndex(f"{path}: not a guard index (manifest format {raw.get('format') if isinstance(raw, dict) else None!r})")
    if raw.get("format_version") != FORMAT_VERSION:
        raise BrokenIndex(
            f"{path}: index format version {raw.get('format_version')!r}; this guard reads version {FORMAT_VERSION}: rebuild it"
        )
    try:
        manifest = Manifest.model_validate(raw)
    except ValidationError as exc:
        raise BrokenIndex(f"{path / MANIFEST}: {exc}") from None
    for info in manifest.files.values():
        _verify(path / info.name, info)
    ann = faiss.read_index(str(path / manifest.files["ann"].name))
    if ann.ntotal != manifest.chunks or ann.d != manifest.encoder.dimension:
        raise BrokenIndex(f"{path}: the vectors ({ann.ntotal} of dimension {ann.d}) do not match the manifest")
    chunks = sqlite3.connect(f"file:{path / manifest.files['chunks'].name}?mode=ro", uri=True, check_same_thread=False)
    try:
        (count,) = chunks.execute("SELECT count(*) FROM chunks").fetchone()
    except sqlite3.Error as exc:
        chunks.close()
        raise BrokenIndex(f"{path}: chunk store unreadable ({exc})") from None
    if count != manifest.chunks:
        chunks.close()
        raise BrokenIndex(f"{path}: {count} chunks stored, the manifest says {manifest.chunks}")
    return Index(path, manifest, hashlib.sha256(data).hexdigest()[:VERSION_LENGTH], ann, chunks)


def _verify(file: Path, info: FileInfo) -> None:
    try:
        size = file.stat().st_size
    except OSError as exc:
        raise BrokenIndex(f"{file}: missing ({exc.strerror or exc})") from None
    if size != info.bytes:
        raise BrokenIndex(f"{file}: {size} bytes, the manifest says {info.bytes} (incomplete copy?)")
    if _sha256(file) != info.sha256:
        raise BrokenIndex(f"{file}: content differs from the manifest's SHA-256 (damaged or edited)")


def _sha256(file: Path) -> str:
    digest = hashlib.sha256()
    with file.open("rb") as stream:
        while block := stream.read(_HASH_BLOCK):
            digest.update(block)
    return digest.hexdigest()


def write_index(
    out: Path | str,
    documents: Sequence[Document],
    chunks: Sequence[Chunk],
    vectors: np.ndarray,
    *,
    encoder: str,
    params: ChunkingParams,
    threads: int | None = None,
) -> Path:
    """Writes an index of `chunks` (row i has vector i, unit length) to `out`, replacing what is there."""
    import faiss

    out = Path(out).expanduser().resolve()
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    if vectors.ndim != 2 or len(vectors) != len(chunks):
        raise ValueError(f"{len(chunks)} chunks but vectors of shape {vectors.shape}")
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        ann = faiss.IndexHNSWFlat(vectors.shape[1], HNSW_M, faiss.METRIC_INNER_PRODUCT)
        ann.hnsw.efConstruction = HNSW_EF_CONSTRUCTION
        if threads is not None:
            faiss.omp_set_num_threads(threads)
        ann.add(vectors)
        faiss.write_index(ann, str(staging / ANN_FILE))
        with contextlib.closing(sqlite3.connect(staging / CHUNKS_FILE)) as db:
            db.execute("CREATE TABLE chunks (row INTEGER PRIMARY KEY, id TEXT NOT NULL UNIQUE, document TEXT NOT NULL, heading TEXT NOT NULL, text TEXT NOT NULL)")
            with db:
                db.executemany(
                    "INSERT INTO chunks VALUES (?, ?, ?, ?, ?)",
                    ((row, chunk.id, chunk.document, chunk.heading, chunk.text) for row, chunk in enumerate(chunks)),
                )
        per_document: dict[str, int] = {}
        for chunk in chunks:
            per_document[chunk.document] = per_document.get(chunk.document, 0) + 1
        manifest = Manifest(
            format=FORMAT,
            format_version=FORMAT_VERSION,
            created=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            encoder=EncoderInfo(model=encoder, dimension=vectors.shape[1]),
            chunking=ChunkingInfo(splitter=SPLITTER, max_words=params.max_words, overlap_words=params.overlap_words),
            ann=AnnInfo(
                library="faiss", version=faiss.__version__, structure="HNSWFlat", metric="inner_product",
                m=HNSW_M, ef_construction=HNSW_EF_CONSTRUCTION, ef_search=HNSW_EF_SEARCH,
            ),
            chunks=len(chunks),
            documents=[
                DocumentInfo(path=d.path, sha256=d.sha256, bytes=d.size, chunks=per_document.get(d.path, 0)) for d in documents
            ],
            files={
                role: FileInfo(name=name, sha256=_sha256(staging / name), bytes=(staging / name).stat().st_size)
                for role, name in (("ann", ANN_FILE), ("chunks", CHUNKS_FILE))
            },
        )
        # The manifest last: a directory without one is not an index.
        (staging / MANIFEST).write_text(manifest.model_dump_json(indent=1) + "\n")
        staging.chmod(0o755)  # mkdtemp's 0700 would hide the index from a server running as another user
        _swap_in(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out


def _swap_in(staging: Path, out: Path) -> None:
    """Renames `staging` to `out`; an existing `out` is renamed away first and deleted after."""
    if not out.exists():
        staging.rename(out)
        return
    if not (out / MANIFEST).is_file():
        raise FileExistsError(f"{out} exists and is not a guard index: not replacing it")
    retired = Path(tempfile.mkdtemp(prefix=f".{out.name}.old.", dir=out.parent))
    retired.rmdir()
    out.rename(retired)
    staging.rename(out)
    shutil.rmtree(retired, ignore_errors=True)
