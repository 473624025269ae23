"""Where the model and the activations are kept: the engine's :class:`LayerStore` (a model in
memory, or read from and written to a safetensors folder one layer at a time, resumable), and the
activations that go to disk beyond ``--max-memory``."""

from rankdown.storage.base import LayerStore, MemoryStore
from rankdown.storage.spill import MemoryBudget, TensorStore, parse_bytes

__all__ = ["LayerStore", "MemoryBudget", "MemoryStore", "TensorStore", "parse_bytes"]
