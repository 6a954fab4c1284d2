"""Retrieval over the operator's documents: chunking, the index on disk, hot-reloaded indexes, citations.

`guard index build` writes an index (build.py, index.py); policies' retrieve steps read it through
registry.Indexes; grounding_check compares answers with what was retrieved. No torch import here
beyond the encoder a build or query uses.
"""
