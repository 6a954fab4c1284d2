"""guard: inference-time alignment middleware in front of vLLM."""

__version__ = "0.1.0"
