"""A trained prompt-safety classifier: sentence embeddings in, P(harmful) out.

An artefact is one JSON file: the encoder it was trained on, a small head (a stack of
dense layers; logistic regression is one layer), the decision threshold chosen on a
validation split, the window settings, and the exact data it was trained on (paths,
sha256, counts) with its validation metrics. JSON and base64 float32, never pickle:
loading an artefact cannot run code.
"""

from __future__ import annotations

import base64
import json
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

FORMAT = "guard-classifier/1"
DEFAULT_ARTEFACT = "prompt-harm-minilm.json"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Layer(_Strict):
    shape: tuple[int, int] = Field(..., description="(outputs, inputs)")
    weight: str = Field(..., description="base64 of float32 weights, row-major (outputs x inputs)")
    bias: str = Field(..., description="base64 of float32 biases")
    activation: Literal["relu", "none"]


class WindowSettings(_Strict):
    """Windows about one request long: a short harmful request inside a long text decides its own window
    instead of being averaged away with the filler around it."""

    words: int = Field(32, ge=8)
    stride: int = Field(16, ge=1)


class Artefact(_Strict):
    format: Literal["guard-classifier/1"]
    encoder: str | None = Field(None, description="Sentence-transformers model directory; None: bundled MiniLM.")
    encoder_patch: str | None = Field(
        None, description="safetensors file of fine-tuned encoder weights applied over `encoder`, relative to the artefact."
    )
    encoder_layers: int | None = Field(None, ge=1, description="Only the encoder's first N layers run (None: all).")
    dim: int
    view: Literal["plain"] = "plain"
    layers: list[Layer]
    threshold: float = Field(..., ge=0.0, le=1.0)
    windows: WindowSettings = WindowSettings()
    training: dict[str, Any] = Field(default_factory=dict, description="Data manifest, parameters, validation metrics.")


def encoder_spec(artefact: Artefact):
    from guard.safety.embedder import EncoderSpec

    return EncoderSpec(artefact.encoder, artefact.encoder_patch, artefact.encoder_layers)


def encode_array(array: np.ndarray) -> str:
    return base64.b64encode(np.ascontiguousarray(array, dtype=np.float32).tobytes()).decode("ascii")


def _decode_array(data: str, shape: tuple[int, ...]) -> np.ndarray:
    return np.frombuffer(base64.b64decode(data), dtype=np.float32).reshape(shape)


class Head:
    """The artefact's dense layers in numpy: microseconds per batch, no framework needed."""

    def __init__(self, artefact: Artefact) -> None:
        self.layers = []
        inputs = artefact.dim
        for index, layer in enumerate(artefact.layers):
            outputs, layer_inputs = layer.shape
            if layer_inputs != inputs:
                raise ValueError(f"layer {index} takes {layer_inputs} inputs, the previous one gives {inputs}")
            weight = _decode_array(layer.weight, layer.shape)
            bias = _decode_array(layer.bias, (outputs,))
            self.layers.append((weight, bias, layer.activation))
            inputs = outputs
        if inputs != 1:
            raise ValueError(f"the last layer must have one output (a logit), not {inputs}")

    def probabilities(self, embeddings: np.ndarray) -> np.ndarray:
        x = embeddings.astype(np.float32, copy=False)
        for weight, bias, activation in self.layers:
            x = x @ weight.T + bias
            if activation == "relu":
                x = np.maximum(x, 0.0)
        return 1.0 / (1.0 + np.exp(-x[:, 0]))


def default_artefact_path() -> Path:
    return Path(str(resources.files("guard.safety") / "artefacts" / DEFAULT_ARTEFACT))


def artefact_path(path: str | None) -> Path:
    return default_artefact_path() if path is None else Path(path).expanduser()


@lru_cache(maxsize=16)
def _load(path: str, mtime_ns: int) -> tuple[Artefact, Head]:
    data = json.loads(Path(path).read_text())
    if data.get("format") != FORMAT:
        raise ValueError(f"{path}: not a guard classifier artefact (format {data.get('format')!r}, expected {FORMAT!r})")
    artefact = Artefact.model_validate(data)
    if artefact.encoder_patch is not None:
        patch = (Path(path).parent / artefact.encoder_patch).resolve()
        if not patch.is_file():
            raise ValueError(f"its encoder patch {str(patch)!r} does not exist")
        artefact = artefact.model_copy(update={"encoder_patch": str(patch)})
    return artefact, Head(artefact)


def load_artefact(path: str | None) -> tuple[Artefact, Head]:
    """The artefact at `path` (None: the shipped default), cached until the file changes."""
    resolved = artefact_path(path)
    try:
        return _load(str(resolved), resolved.stat().st_mtime_ns)
    except FileNotFoundError:
        raise ValueError(f"classifier artefact {str(resolved)!r} does not exist") from None
    except (OSError, ValueError) as exc:
        raise ValueError(f"cannot load classifier artefact {str(resolved)!r}: {exc}") from None


def save_artefact(artefact: Artefact, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(artefact.model_dump(mode="json"), indent=1) + "\n")
