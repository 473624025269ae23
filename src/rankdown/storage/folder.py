"""The safetensors back end of :class:`~rankdown.storage.LayerStore`: a model bigger than memory,
one decoder layer in RAM at a time.

The model is built as a skeleton on the meta device (no memory); only the tensors outside the
layers that the calibration pass needs (the input embeddings) are read. The engine then asks for
layer ``i`` (:meth:`StreamedModel.load`: its tensors are read one by one from the safetensors
files, opening the file for each so the memory map never grows to the whole file), compresses it,
and gives it back (:meth:`StreamedModel.commit`): on the compressing pass its new tensors go to a
shard file of their own, then the layer returns to the meta device. The tensors outside the layers
are never compressed; they are copied from the input files into the last shard. With
``--max-memory`` the calibration activations go to disk too (see spill.py), so the peak is about
one layer, its statistics, and the activations allowed in RAM.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from rankdown import distributed, heap
from rankdown.io import ModelFolderError
from rankdown.storage.weights import _DTYPE_BYTES, INDEX, FolderWeights, _nbytes, _set, _sha256, weights_digest

class StreamedModel:
    """A :class:`~rankdown.storage.LayerStore`: a model skeleton whose layers are read from (and
    written to) files one at a time.

    ``work``: the folder the compressed layers' shards go to (``layer-00003.safetensors``).
    """

    streams = True  # the model is never whole in memory

    def __init__(
        self, path: str | os.PathLike, dtype: torch.dtype = torch.float32, work: Path | None = None,
        save_dtype: torch.dtype | None = None,
    ) -> None:
        from rankdown.arch import spec_for
        from rankdown.loading import folder_model

        self.path = Path(path).expanduser().absolute()
        self.weights = FolderWeights(self.path)
        self.dtype = dtype  # what the layers compute in
        self.save_dtype = save_dtype or dtype  # what the floating tensors are written in
        self.work = work
        self.written: dict[int, str] = {}  # layer -> sha256 of the shard this run wrote for it
        self.model = folder_model(self.path, dtype=dtype, empty=True)  # the skeleton: no weights read
        if hasattr(self.model, "tie_weights"):
            self.model.tie_weights()
        self.spec = spec_for(self.model)
        if self.spec.experts is not None:
            raise ModelFolderError(
                f"{self.spec.family} stores its experts fused in the model but per expert in checkpoints: "
                "streaming cannot map them yet; compress it in memory (--no-stream)"
            )
        self.layers_path, self.layers = self.spec.find_layers(self.model)
        names = dict(self.model.named_parameters(remove_duplicate=False))
        first: dict[int, str] = {}  # a tied tensor is saved under the name met first (as save_pretrained does)
        self.tied = {n for n, p in names.items() if first.setdefault(id(p), n) != n}
        state = [n for n in self.model.state_dict(keep_vars=True) if n not in self.tied]
        persistent = {n for n in state if n in names or self._persistent_buffer(n)}
        missing = sorted(n for n in persistent if n not in self.weights)
        if missing:
            more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
            others = sorted(k for k in self.weights.files if k not in state and k not in self.tied)
            if not others:  # every tensor of the files is one the model has: the missing ones are simply not there
                raise ModelFolderError(
                    f"{self.path} is incomplete: {', '.join(missing[:3])}{more} is in none of its weight files "
                    f"({', '.join(sorted({f.name for f in self.weights.files.values()}))}); fetch the model again")
            raise ModelFolderError(
                f"{self.path} lacks tensors the model needs ({', '.join(missing[:3])}{more}) and holds others it "
                f"does not know ({', '.join(others[:3])}{' ...' if len(others) > 3 else ''}): an older checkpoint "
                "layout; streaming needs the names transformers uses: compress in memory (--no-stream), which "
                "converts them"
            )
        self.outside = [n for n in persistent if not n.startswith(self.layers_path + ".")]
        self._check_shapes(persistent)

    def _check_shapes(self, names: set[str]) -> None:
        """Refuse, before any work, a tensor whose stored shape is not the one config.json implies."""
        from safetensors import safe_open

        want = self.model.state_dict(keep_vars=True)
        by_file: dict[Path, list[str]] = {}
        for n in sorted(names):
            by_file.setdefault(self.weights.files[n], []).append(n)
        for file, keys in by_file.items():
            with safe_open(file, "pt") as f:
                for n in keys:
                    stored = tuple(f.get_slice(n).get_shape())
                    if stored != tuple(want[n].shape):
                        raise ModelFolderError(
                            f"{n} in {file.name} has shape {stored}, but {self.path / 'config.json'} makes it "
                            f"{tuple(want[n].shape)}: the weights do not belong to this config; fix the folder "
                            "or fetch the model again")

    def _persistent_buffer(self, name: str) -> bool:
        owner_name, _, leaf = name.rpartition(".")
        owner = self.model.get_submodule(owner_name)
        return leaf in owner._buffers and leaf not in owner._non_persistent_buffers_set

    def load_outside(self, head: bool = False) -> None:
        """Read what the calibration pass runs before layer 0 (the engine calls this before it
        captures the layers' inputs, :meth:`drop_outside` after); the output head stays on meta
        unless ``head`` (the loss of the fisher allocation's backward pass needs it)."""
        out_head = self.model.get_output_embeddings() if hasattr(self.model, "get_output_embeddings") else None
        head_params = {id(p) for p in out_head.parameters()} if out_head is not None else set()
        params = dict(self.model.named_parameters(remove_duplicate=False))
        emb = self.model.get_input_embeddings()
        # A plain lookup table stored in fewer bits is kept so and its rows are widened as they
        # come out: the same hidden states, bit for bit, and half the memory of the calibration
        # pass's largest tensor (a 32000 x 2048 table: 131 MB instead of 262 MB).
        narrow = type(emb) is nn.Embedding and not head  # a tied head computes with the table as it is
        for name in self.outside:
            p = params.get(name)
            if not head and p is not None and id(p) in head_params and name not in self._input_side():
                continue
            dtype = self.dtype if p is not None and p.is_floating_point() else None
            if narrow and p is emb.weight and self._stored_narrower(name):
                dtype = None
            _set(self.model, name, self.weights.read(name, dtype))
        if hasattr(self.model, "tie_weights"):
            self.model.tie_weights()
        if emb.weight.dtype != self.dtype and emb.weight.is_floating_point():
            self._widen = emb.register_forward_hook(lambda mod, a, out: out.to(self.dtype))

    def _stored_narrower(self, name: str) -> bool:
        from safetensors import safe_open

        with safe_open(self.weights.files[name], "pt") as f:
            stored = f.get_slice(name).get_dtype()
        return stored in ("F16", "BF16", "F32", "F64") and _DTYPE_BYTES[stored] < torch.finfo(self.dtype).bits // 8

    def drop_outside(self) -> None:
        """Send the tensors outside the layers back to the meta device (they are copied from the
        input files when the folder is written)."""
        widen = self.__dict__.pop("_widen", None)
        if widen is not None:
            widen.remove()
        for name, mod in self.model.named_modules():
            if name == self.layers_path or name.startswith(self.layers_path + "."):
                continue
            for key, p in list(mod._parameters.items()):
                if p is not None and p.device.type != "meta":
                    mod._parameters[key] = nn.Parameter(p.data.to("meta"), requires_grad=p.requires_grad)
            for key in [k for k, b in mod._buffers.items() if b is not None and k not in mod._non_persistent_buffers_set]:
                mod._buffers[key] = mod._buffers[key].to("meta")
        if hasattr(self.model, "tie_weights"):
            self.model.tie_weights()
        heap.trim()

    def _input_side(self) -> set[str]:
        emb = self.model.get_input_embeddings()
        return {n for n, p in self.model.named_parameters(remove_duplicate=False)
                if any(p is q for q in emb.parameters())}

    def digest(self) -> str:
        """A fingerprint of the input folder's weights (the content of its files, as the resume
        fingerprint reads it: computed once a process) and the dtype: the statistics cache's key."""
        text = json.dumps([str(self.path), str(self.dtype), weights_digest(self.path, self.weights)])
        return hashlib.sha1(text.encode()).hexdigest()

    # -- the engine's layer store ---------------------------------------------------------------
    def begin(self, device: torch.device) -> None:
        """Nothing to do: the layers are read one at a time by :meth:`load`."""

    def end(self) -> None:
        """Nothing to give back: every layer went back to the meta device in :meth:`commit`."""

    def plan(self, make: Callable[[], dict[str, int]]) -> dict[str, int]:
        return make()

    def check_finite(self, progress: bool = False) -> None:
        """Every tensor of the files, read block by block: NaN or Inf refused, naming the tensor."""
        self.weights.check_finite(progress=progress)

    def load(self, i: int, layer: nn.Module) -> None:
        """Read layer ``i``'s tensors from the input files (nothing was finished before: None)."""
        prefix = f"{self.layers_path}.{i}."
        for name, t in layer.state_dict(keep_vars=True).items():
            full = prefix + name
            if full not in self.weights:
                if t.device.type == "meta":
                    raise ModelFolderError(f"{full} is missing from {self.path}")
                continue  # a non-persistent buffer built at init
            _set(layer, name, self.weights.read(full, self.dtype if t.is_floating_point() else None))

    def load_written(self, i: int, layer: nn.Module, modules: dict[str, dict]) -> None:
        """Layer ``i`` as an earlier run compressed and wrote it: ``modules`` (full path -> record)
        rebuilt, then its tensors read from its shard in the work folder (resume)."""
        from safetensors.torch import load_file

        from rankdown.nn.portable import build_module

        prefix = f"{self.layers_path}.{i}."
        for full, spec in modules.items():
            name = full[len(prefix):]
            layer.set_submodule(name, build_module(spec, layer.get_submodule(name)))
        tensors = load_file(self.work / f"layer-{i:05d}.safetensors")
        for name in layer.state_dict(keep_vars=True):
            if prefix + name in tensors:
                _set(layer, name, tensors[prefix + name])

    def commit(self, i: int, layer: nn.Module, records: dict | None) -> None:
        """Write layer ``i``'s shard when it was compressed (``records``; under torchrun process 0
        writes), then send the layer back to the meta device."""
        if records is not None and distributed.is_main():
            self.written[i] = self._write_layer(i, layer)
        layer.to("meta")
        heap.trim()

    def _write_layer(self, i: int, layer: nn.Module) -> str:
        """Write layer ``i``'s shard; return its sha256 (checked before a resumed run trusts it)."""
        from safetensors.torch import save_file

        assert self.work is not None
        prefix = f"{self.layers_path}.{i}."
        tensors = {prefix + n: t.detach().contiguous() for n, t in layer.state_dict().items()
                   if self._persistent_in_layer(layer, n)}
        tmp = self.work / f".layer-{i:05d}.tmp"
        save_file(tensors, tmp, metadata={"format": "pt"})
        sha = _sha256(tmp)
        os.replace(tmp, self.work / f"layer-{i:05d}.safetensors")
        return sha

    @staticmethod
    def _persistent_in_layer(layer: nn.Module, name: str) -> bool:
        owner_name, _, leaf = name.rpartition(".")
        owner = layer.get_submodule(owner_name) if owner_name else layer
        return leaf not in owner._non_persistent_buffers_set

    # -- writing the folder ---------------------------------------------------------------------
    def write_weights(self, folder: Path) -> None:
        """Move the layer shards into ``folder``, add the tensors outside the layers, write the index.

        The layer shards are in the compute dtype (so a resumed run replays exactly what the
        killed one computed) and are converted here, one at a time, when the saved dtype differs.
        Each tensor outside the layers gets its own shard, read in the saved dtype: only one of
        them (the embeddings or the head, the largest) is ever in memory.
        """
        from safetensors import safe_open
        from safetensors.torch import load_file, save_file

        n = len(self.layers)
        outside = sorted(self.outside)
        total = n + len(outside)
        weight_map: dict[str, str] = {}
        size = 0
        for i in range(n):
            src = self.work / f"layer-{i:05d}.safetensors"
            if not src.is_file():
                raise RuntimeError(f"layer {i} was never written to {self.work}")
            name = f"model-{i + 1:05d}-of-{total:05d}.safetensors"
            if self.save_dtype == self.dtype:
                shutil.copyfile(src, folder / name)
            else:
                tensors = {k: t.to(self.save_dtype) if t.is_floating_point() else t for k, t in load_file(src).items()}
                save_file(tensors, folder / name, metadata={"format": "pt"})
                del tensors
                heap.trim()
            with safe_open(folder / name, "pt") as f:
                for k in f.keys():
                    weight_map[k] = name
                    sl = f.get_slice(k)
                    size += _nbytes(sl.get_shape(), sl.get_dtype())
        for j, k in enumerate(outside):
            t = self.weights.read(k, self.save_dtype if self._floating(k) else None)
            name = f"model-{n + j + 1:05d}-of-{total:05d}.safetensors"
            save_file({k: t}, folder / name, metadata={"format": "pt"})
            weight_map[k] = name
            size += t.numel() * t.element_size()
            del t
            heap.trim()
        index = {"metadata": {"total_size": size}, "weight_map": dict(sorted(weight_map.items()))}
        (folder / INDEX).write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")

    def _floating(self, name: str) -> bool:
        t = self.model.get_parameter(name) if name in dict(self.model.named_parameters()) else self.model.get_buffer(name)
