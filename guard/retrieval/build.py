"""`guard index build`: documents -> chunks -> embeddings -> an index directory."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from guard.retrieval.chunking import ChunkingParams, chunk_document, read_documents
from guard.retrieval.index import write_index
from guard.safety.embedder import BUNDLED, Embedder, EncoderSpec, model_path

EMBED_BATCH = 256  # chunks handed to the encoder at once (it pads within its own batches of 32)


@dataclass
class BuildReport:
    path: Path
    documents: int
    chunks: int
    seconds: dict[str, float] = field(default_factory=dict)  # read, chunk, load_encoder, embed, write

    @property
    def chunks_per_second(self) -> float:
        """Chunks over the time spent on them: everything but loading the encoder (a constant few seconds)."""
        total = sum(value for name, value in self.seconds.items() if name != "load_encoder")
        return self.chunks / total if total else 0.0


def build_index(
    documents_dir: Path | str,
    out: Path | str,
    *,
    encoder: str | None = None,
    params: ChunkingParams = ChunkingParams(),
    progress: Callable[[int, int], None] | None = None,
) -> BuildReport:
    """`encoder`: a sentence-transformers directory; None: the bundled all-MiniLM-L6-v2.
    `progress(done, total)` is called as chunks are embedded."""
    seconds: dict[str, float] = {}
    started = time.perf_counter()
    documents = read_documents(Path(documents_dir).expanduser())
    seconds["read"] = time.perf_counter() - started

    started = time.perf_counter()
    chunks = [chunk for document in documents for chunk in chunk_document(document, params)]
    seconds["chunk"] = time.perf_counter() - started

    started = time.perf_counter()
    # A path is recorded absolute: the server that loads the index resolves it, not this directory.
    model = BUNDLED if encoder is None else str(Path(model_path(encoder)).resolve())
    embedder = Embedder(EncoderSpec(None if encoder is None else model))
    seconds["load_encoder"] = time.perf_counter() - started

    started = time.perf_counter()
    parts = []
    for start in range(0, len(chunks), EMBED_BATCH):
        parts.append(embedder.encode([chunk.embedded_text() for chunk in chunks[start : start + EMBED_BATCH]]))
        if progress is not None:
            progress(min(start + EMBED_BATCH, len(chunks)), len(chunks))
    vectors = np.concatenate(parts) if parts else np.zeros((0, embedder.dim), dtype=np.float32)
    seconds["embed"] = time.perf_counter() - started

    started = time.perf_counter()
    path = write_index(out, documents, chunks, vectors, encoder=model, params=params)
    seconds["write"] = time.perf_counter() - started
    return BuildReport(path, len(documents), len(chunks), seconds)
