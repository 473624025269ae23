"""GGUF checkpoints (llama.cpp's format) as models to compress, evaluate or generate with.

A GGUF source is a ``.gguf`` file, or a folder that holds exactly one ``.gguf`` and no config.json.
It is loaded through transformers' GGUF support, dequantized to the compute dtype, and handed back
as an ordinary transformers model: the ``quantization_config`` transformers attaches (which makes
``save_pretrained`` refuse with "quantized with gguf and is not serializable") is dropped by
rebuilding the same class from the config without it, so a compressed GGUF model saves like any
other. The file's name and quantization type (``Q4_1``, ``Q8_0``...) go into the saved folder's
``rankdown.source`` record (see :func:`describe`).
"""

from __future__ import annotations

import copy
import functools
import logging
import os
from collections import Counter
from pathlib import Path
from typing import Any

from rankdown.io import ModelFolderError

log = logging.getLogger(__name__)

SUFFIX = ".gguf"
MIN_GGUF = (0, 10)  # what transformers' GGUF loading asks for


class GGUFError(ModelFolderError):
    """A GGUF source that cannot be read: the gguf package is missing, the folder is ambiguous,
    or the file is damaged."""


def find(name: str | os.PathLike | None) -> Path | None:
    """The ``.gguf`` file that ``name`` designates, or None when it designates none (a Hugging Face
    folder, a hub id, the reference model).

    ``name`` designates a file when it is a ``.gguf`` path, or a folder with no config.json that
    holds exactly one ``.gguf``. A missing ``.gguf`` path is a FileNotFoundError; a folder with
    several is a :class:`GGUFError` (which one is meant cannot be guessed).
    """
    if name is None:
        return None
    p = Path(name).expanduser()
    if p.suffix.lower() == SUFFIX and not p.is_dir():
        if not p.is_file():
            raise FileNotFoundError(f"{name}: no such GGUF file")
        return p
    if not p.is_dir() or (p / "config.json").exists():
        return None
    files = sorted(f for f in p.iterdir() if f.suffix.lower() == SUFFIX and f.is_file())
    if len(files) > 1:
        names = ", ".join(f.name for f in files)
        raise GGUFError(f"{p} holds {len(files)} .gguf files ({names}) and no config.json: give the file to "
                        f"load, e.g. {p / files[0].name}")
    return files[0] if files else None


def _require_gguf() -> Any:
    try:
        import gguf
    except ImportError as e:
        raise GGUFError(f"reading a .gguf file needs the gguf package ({e}): pip install 'rankdown[gguf]' "
                        "(or pip install 'gguf>=0.10')") from None
    import importlib.metadata

    try:
        version = importlib.metadata.version("gguf")
        if tuple(int(v) for v in version.split(".")[:2]) < MIN_GGUF:
            raise GGUFError(f"reading a .gguf file needs gguf>=0.10, found {version}: pip install -U 'gguf>=0.10'")
    except (importlib.metadata.PackageNotFoundError, ValueError):
        pass  # a source checkout, or a version string we cannot compare: let transformers judge
    return gguf


def _reader(file: Path) -> Any:
    gguf = _require_gguf()
    try:
        return gguf.GGUFReader(file)
    except (MemoryError, KeyboardInterrupt):
        raise
    except Exception as e:  # the reader fails in many ways on bad bytes (ValueError, IndexError, struct...)
        raise GGUFError(f"{file} is not a readable GGUF file, it may be damaged or truncated "
                        f"({type(e).__name__}: {e}); download it again") from None


def _quantization(gguf: Any, reader: Any) -> str:
    """``general.file_type`` as llama.cpp names it (MOSTLY_Q4_1 -> Q4_1, ALL_F32 -> F32); else the
    commonest type of the file's matrices."""
    field = reader.fields.get("general.file_type")
    if field is not None and field.data:
        try:
            name = gguf.LlamaFileType(int(field.parts[field.data[0]][0])).name
            if name != "GUESSED":
                return name.removeprefix("MOSTLY_").removeprefix("ALL_")
        except (ValueError, IndexError):
            pass
    types = Counter(t.tensor_type.name for t in reader.tensors if len(t.shape) >= 2)
    return types.most_common(1)[0][0] if types else "unknown"


def _text(field: Any) -> str | None:
    if field is None or not field.data:
        return None
    try:
        return bytes(field.parts[field.data[0]]).decode("utf-8")
    except (IndexError, TypeError, UnicodeDecodeError):
        return None


@functools.lru_cache(maxsize=8)
def _describe(file: Path, _stamp: tuple[int, int]) -> dict[str, Any]:
    gguf = _require_gguf()
    reader = _reader(file)
    if not reader.tensors:
        raise GGUFError(f"{file} holds no tensors: it is not a model checkpoint")
    arch = reader.fields.get("general.architecture")
    return {
        "gguf_file": file.name,
        "quantization": _quantization(gguf, reader),
        "architecture": _text(arch),
        "tensors": len(reader.tensors),
        "has_tokenizer": "tokenizer.ggml.model" in reader.fields,
    }


def describe(file: str | os.PathLike) -> dict[str, Any]:
    """What a GGUF file is: ``gguf_file`` (its name), ``quantization`` (e.g. ``Q4_1``),
    ``architecture``, ``tensors``, ``has_tokenizer``. Reads the header only (GGUFReader maps the
    file); a damaged file is a :class:`GGUFError`."""
    file = Path(file).expanduser().absolute()
    st = file.stat()
    return dict(_describe(file, (st.st_mtime_ns, st.st_size)))


def record(file: str | os.PathLike) -> dict[str, Any]:
    """The ``source`` entry of a saved folder's rankdown record for a model loaded from ``file``."""
    d = describe(file)
    return {"gguf_file": d["gguf_file"], "quantization": d["quantization"]}


def _serializable(model: Any) -> Any:
    """The same model without the GGUF ``quantization_config`` (which save_pretrained refuses): the
    same class built on the meta device from the config without it, given the loaded tensors."""
    import torch

    config = copy.deepcopy(model.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    with torch.device("meta"):
        fresh = type(model)(config)
    fresh.load_state_dict(model.state_dict(), strict=True, assign=True)
    for name, buf in model.named_buffers():  # rotary tables etc. are not in the state dict
        owner, _, leaf = name.rpartition(".")
        fresh.get_submodule(owner)._buffers[leaf] = buf
    fresh.tie_weights()
    if getattr(model, "generation_config", None) is not None:
        fresh.generation_config = copy.deepcopy(model.generation_config)
    left = [n for n, t in [*fresh.named_parameters(), *fresh.named_buffers()] if t.is_meta]
    if left:  # pragma: no cover - a family whose tensors live outside its state dict
        raise GGUFError(f"could not rebuild the model loaded from GGUF: {', '.join(left[:3])} were not loaded")
    return fresh.eval()


def load(file: str | os.PathLike, dtype: Any = None) -> tuple[Any, Any]:
    """(model, tokenizer) of a GGUF file, dequantized to ``dtype`` (default float32), in eval mode,
    savable with ``save_pretrained``; the tokenizer is None when the file carries none."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    file = Path(file).expanduser().absolute()
    dtype = dtype or torch.float32
    info = describe(file)  # checks the package and the file before transformers does
    log.info("loading %s (GGUF %s, %s), dequantized to %s", file, info["quantization"], info["architecture"],
             str(dtype).removeprefix("torch."))
    try:
        model = AutoModelForCausalLM.from_pretrained(file.parent, gguf_file=file.name, dtype=dtype)
    except (ValueError, KeyError, NotImplementedError) as e:  # unsupported architecture, unexpected content
        raise GGUFError(f"transformers could not load {file} ({type(e).__name__}: {e})") from None
    model = _serializable(model)
    tokenizer = None
    if info["has_tokenizer"]:
        try:
            tokenizer = AutoTokenizer.from_pretrained(file.parent, gguf_file=file.name)
        except (ValueError, KeyError, NotImplementedError) as e:
            raise GGUFError(f"transformers could not read the tokenizer of {file} ({type(e).__name__}: {e})") \
                from None
    else:
        log.info("%s carries no tokenizer", file)
    return model, tokenizer
