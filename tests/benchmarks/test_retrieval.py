"""benchmarks/retrieval.py: its data is what it says, its comparison runs, its policies build as guard builds them."""

from __future__ import annotations

import numpy as np

from benchmarks import retrieval
from guard.pipeline.base import StepDeps
from guard.pipeline.runner import Pipelines
from guard.policy.loader import LoadedPolicy
from guard.policy.model import Policy
from guard.retrieval.chunking import ChunkingParams, Document, chunk_document
from guard.retrieval.registry import Indexes
from guard.safety.embedder import Embedders


def test_synthetic_vectors_are_unit_length_and_hard():
    vectors, queries = retrieval.synthetic_vectors(4000, 50)
    assert vectors.shape == (4000, retrieval.DIM) and queries.shape == (50, retrieval.DIM)
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    top = np.sort(queries @ vectors.T, axis=1)[:, ::-1]
    # A query's 10th neighbour is nearly as close as its first: what makes a graph search miss.
    assert 0.3 < top[:, 0].mean() < 0.6 and (top[:, 0] - top[:, 9]).mean() < 0.1


def test_the_ann_comparison_reports_recall_against_exact_search(tmp_path):
    rows, skipped = retrieval.compare_ann(1000, 20, tmp_path)
    by = {row["library"]: row for row in rows}
    assert by["numpy-exact"]["recall_at_10"] == 1.0 and by["numpy-exact"]["p50_speedup_vs_exact"] == 1.0
    assert by["faiss-hnsw"]["recall_at_10"] >= 0.9  # guard's own library is always compared
    assert all(row["query_p99_ms"] >= row["query_p50_ms"] > 0 for row in rows)
    assert len(rows) + len(skipped) == 4


def test_generated_manuals_chunk_by_section():
    manuals = retrieval.manuals(3)
    assert len(manuals) == 3
    text = next(iter(manuals.values()))
    chunks = chunk_document(Document("m.md", text, "", len(text)), ChunkingParams())
    assert len(chunks) == 10 and all(" > " in chunk.heading for chunk in chunks)


def test_the_step_policies_build(tmp_path):
    from guard.retrieval.chunking import Chunk
    from guard.retrieval.index import write_index
    from guard.safety.embedder import BUNDLED

    index = write_index(tmp_path / "i.index", [], [Chunk("a.md", 0, "A", "a")], np.eye(1, 384, dtype=np.float32),
                        encoder=BUNDLED, params=ChunkingParams())
    embedders = Embedders()
    try:
        pipelines = Pipelines(StepDeps(upstream=None, embedders=embedders, indexes=Indexes()))  # type: ignore[arg-type]
        for name, (description, steps) in retrieval.step_policies(str(index), str(index)).items():
            policy = Policy.model_validate({"name": name, "description": description, "steps": steps})
            pipelines.build(LoadedPolicy(policy, "v", "<bench>"))
    finally:
        embedders.close()


def test_headlines_compare_each_part_with_its_baseline():
    rows = [
        {"part": "build", "chunks": 100, "chunks_per_s": 80.0, "ratio_to_encoder_alone": 0.99},
        {"part": "query", "chunks": 10000, "query_p50_ms": 0.3, "query_p99_ms": 0.4, "p50_speedup_vs_exact": 2.0},
        {"part": "query", "chunks": None, "query_p50_ms": 10.0, "query_p99_ms": 12.0},
        {"part": "step", "policy": "passthrough", "added_p50_ms": 0.0, "added_cpu_ms": 0.0, "p50_ratio_to_passthrough": 1.0},
        {"part": "step", "policy": "retrieve", "added_p50_ms": 12.0, "added_cpu_ms": 11.0, "p50_ratio_to_passthrough": 15.0},
    ]
    names = [h["name"] for h in retrieval.headlines(rows)]
    assert len(names) == 3
    [step] = [h for h in retrieval.headlines(rows) if h["name"].startswith("retrieve")]
    assert "1.20× one query embedding" in step["unit"]
