"""Where the layers live between their visits: the engine's :class:`LayerStore`.

The engine loads layer ``i`` from its store before the visit and commits it after; the store
decides where the layer goes meanwhile: back to its home device (:class:`MemoryStore`, a model in
memory), or to a shard file and the meta device (:class:`~rankdown.storage.StreamedModel`). A
store that resumes a killed run (:class:`~rankdown.storage.ResumableStore`) answers ``load`` with
the records of a layer already finished, and the engine then only runs it to feed the next one.
"""

from __future__ import annotations

from typing import Callable, Protocol

import torch
from torch import nn


class LayerStore(Protocol):
    """What the engine's layer loop asks of the place the model's layers are kept."""

    streams: bool  # whether the layers are read and written one at a time (the model never whole in memory)

    def begin(self, device: torch.device) -> None:
        """A walk over the layers on ``device`` begins."""

    def end(self) -> None:
        """The walk ended (also after an error): what the store moved is given back."""

    def load_outside(self, head: bool = False) -> None:
        """Make ready what the calibration capture runs outside the layers (the input embeddings),
        and with ``head`` what runs after them too (final norm, output head: the loss)."""

    def drop_outside(self) -> None:
        """The capture is over: what :meth:`load_outside` made ready may go."""

    def load(self, i: int, layer: nn.Module) -> dict | None:
        """Fill layer ``i`` before its visit. Returns its records (``modules``, ``guards``, ``seconds``)
        when it was finished already (a resumed run): then it is not visited again, only run."""

    def commit(self, i: int, layer: nn.Module, records: dict | None) -> None:
        """Take layer ``i`` back after its visit: compressed, with its ``records``, or None when the
        walk only read statistics."""

    def plan(self, make: Callable[[], dict[str, int]]) -> dict[str, int]:
        """The ranks to compress with: ``make()``, or those a resumed run began with."""

    def digest(self) -> str:
        """A fingerprint of the model's weights (the statistics cache's key)."""

    def check_finite(self, progress: bool = False) -> None:
        """Refuse a NaN or Inf weight before any work, naming the tensor."""


class MemoryStore:
    """The :class:`LayerStore` of a model in memory: each layer is put back on its home device (where
    the model's weights were when the walk began) after its visit on another device."""

    streams = False

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self._device = torch.device("cpu")
        self._home = torch.device("cpu")

    def begin(self, device: torch.device) -> None:
        self._device = torch.device(device)
        self._home = next((p.device for p in self.model.parameters() if not p.is_meta), torch.device("cpu"))

    def end(self) -> None:
        if self._device.type != "cpu":
            self.model.to(self._home)

    def load_outside(self, head: bool = False) -> None:
        pass

    def drop_outside(self) -> None:
        pass

    def load(self, i: int, layer: nn.Module) -> dict | None:
        return None

    def commit(self, i: int, layer: nn.Module, records: dict | None) -> None:
        if self._device.type != "cpu":
            layer.to(self._home)

    def plan(self, make: Callable[[], dict[str, int]]) -> dict[str, int]:
        return make()

    def digest(self) -> str:
        from rankdown.stats_cache import model_digest

        return model_digest(self.model)

    def check_finite(self, progress: bool = False) -> None:
        from rankdown.io import ModelFolderError

        for name, t in self.model.state_dict().items():
            if not t.is_floating_point() or t.device.type == "meta":
                continue
            flat = t.detach().reshape(-1)
            for a in range(0, flat.numel(), 2**24):  # a bounded temporary, whatever the tensor's size
                if not bool(torch.isfinite(flat[a : a + 2**24]).all()):
                    raise ModelFolderError(f"{name} holds NaN or Inf values: the weights are corrupt (or overflowed "
                                           "when converted to a narrower dtype); fix the model before compressing")
