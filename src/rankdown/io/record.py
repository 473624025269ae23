"""What a model folder's config.json says: the ``rankdown`` record (checked before a model is built
from it), the weights it lists, the dtype they are stored in, the library versions and the class
names a saved folder is written under."""

from __future__ import annotations

import importlib.metadata
import json
import os
import platform
from pathlib import Path
from typing import Any

import torch

from rankdown.nn.portable import MODULE_TYPES

FORMAT = 1


class ModelFolderError(ValueError):
    """A model folder is missing, incomplete or corrupt."""


def _versions() -> dict[str, str]:
    def version(dist: str) -> str:
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            return "0+unknown"

    out = {name: version(name) for name in ("rankdown", "torch", "transformers", "safetensors")}
    out["python"] = platform.python_version()
    return out


def _stock_class(cls: type) -> type:
    """The first class of ``cls``'s MRO that a transformers model family defines (``LlamaForCausalLM``...)."""
    import transformers

    for base in cls.__mro__:
        if base.__module__.startswith("transformers.models.") and getattr(transformers, base.__name__, None) is base:
            return base
    raise TypeError(
        f"{cls.__name__} is not (a subclass of) a model or config class of transformers; rankdown saves only "
        "models of the families transformers ships"
    )


def _is_causal_lm(cls_name: str) -> bool:
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    for names in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values():
        if cls_name == names or (isinstance(names, (tuple, list)) and cls_name in names):
            return True
    return False


def _wrapper_name(stock_name: str) -> str:
    return "RankdownForCausalLM" if _is_causal_lm(stock_name) else "RankdownModel"


def _read_config(path: Path) -> dict:
    """config.json of a model folder, with its ``rankdown`` record (if any) checked (:func:`_check_record`)."""
    if not path.is_dir():
        raise ModelFolderError(f"{path} is not a folder; pass a folder that rankdown saved, or any HF model folder")
    cfg_path = path / "config.json"
    if not cfg_path.is_file():
        raise ModelFolderError(f"{path} has no config.json, so it is not a Hugging Face model folder")
    try:
        cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ModelFolderError(f"{cfg_path} is not valid JSON ({e}); the folder is corrupt") from e
    except UnicodeDecodeError as e:
        raise ModelFolderError(f"{cfg_path} is not UTF-8 text (byte {e.object[e.start]:#04x} at position {e.start}); "
                               "the file is corrupt: fetch the model again") from None
    if not isinstance(cfg, dict):
        raise ModelFolderError(f"{cfg_path} holds a JSON {type(cfg).__name__}, not an object; the folder is corrupt")
    if cfg.get("rankdown") is not None:
        _check_record(cfg_path, cfg["rankdown"])
    return cfg


def _check_record(cfg_path: Path, record: Any) -> None:
    """Refuse a ``rankdown`` section that :func:`load` could not rebuild the model from."""
    fix = "the file is corrupt or was edited; restore it, or compress the original model again"
    if not isinstance(record, dict):
        raise ModelFolderError(f"{cfg_path}: its \"rankdown\" section is a JSON {type(record).__name__}, "
                               f"not an object; {fix}")
    structure = record.get("structure", {})
    if not isinstance(structure, dict):
        raise ModelFolderError(f"{cfg_path}: rankdown.structure is {json.dumps(structure)}, not an object; {fix}")
    modules, unfused = structure.get("modules", {}), structure.get("unfused_experts", [])
    if not isinstance(modules, dict):
        raise ModelFolderError(f"{cfg_path}: rankdown.structure.modules is {json.dumps(modules)[:80]}, not an "
                               f"object of module path -> spec; {fix}")
    if not isinstance(unfused, list) or not all(isinstance(u, str) for u in unfused):
        raise ModelFolderError(f"{cfg_path}: rankdown.structure.unfused_experts is {json.dumps(unfused)[:80]}, not "
                               f"a list of module paths; {fix}")
    for name, spec in modules.items():
        kind = spec.get("type") if isinstance(spec, dict) else None
        if kind not in MODULE_TYPES:
            versions = record.get("versions")
            written = versions.get("rankdown") if isinstance(versions, dict) else None
            mine = _versions()["rankdown"]
            how = (f"the folder was written by rankdown {written}: install that version, or compress the original "
                   "model again with this one") if written not in (None, mine) else fix
            raise ModelFolderError(
                f"{cfg_path}: module {name} is of type {json.dumps(kind if isinstance(spec, dict) else spec)[:80]}, "
                f"which this rankdown ({mine}) does not know (it knows {', '.join(MODULE_TYPES)}); {how}")


def check_weights(path: Path) -> None:
    """Refuse a model folder whose weights are absent, listed but missing, or unreadable (a
    truncated download), with what to do, before transformers meets them."""
    from safetensors import SafetensorError, safe_open

    fetch = "the download is incomplete or corrupt; fetch the model again"
    index = path / "model.safetensors.index.json"
    if index.is_file():
        try:
            files = sorted({path / f for f in json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()})
        except (json.JSONDecodeError, KeyError, AttributeError, TypeError) as e:
            raise ModelFolderError(f"{index} is not a valid safetensors index ({e!r}); {fetch}") from None
    elif (path / "model.safetensors").is_file():
        files = [path / "model.safetensors"]
    elif any((path / f).is_file() for f in ("pytorch_model.bin", "pytorch_model.bin.index.json")):
        return  # torch pickles: transformers reads (and checks) them
    else:
        raise ModelFolderError(
            f"{path} has a config.json but no weights (no model.safetensors, model.safetensors.index.json or "
            "pytorch_model.bin): the download is incomplete, or the weights are in another folder; fetch the "
            "model again, or give the folder that holds them")
    for file in files:
        if not file.is_file():
            raise ModelFolderError(f"{file.name} is listed in {index.name} but missing from {path}: {fetch}")
        try:
            with safe_open(file, "pt"):
                pass
        except (SafetensorError, OSError) as e:
            raise ModelFolderError(f"{file} is not a readable safetensors file ({e}): it is truncated or "
                                   "corrupt (an incomplete download?); fetch the model again") from None


def check_model_type(path: Path, cfg: dict) -> None:
    """Refuse a config.json whose model_type transformers cannot build, naming it and what rankdown supports."""
    import transformers
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

    from rankdown.arch import UnsupportedModelError, supported_model_types

    record = cfg.get("rankdown") or {}
    model_type = record.get("base_model_type") or cfg.get("model_type")
    if isinstance(model_type, str) and model_type in CONFIG_MAPPING_NAMES:
        return
    what = f"model_type {model_type!r}" if model_type else "no model_type"
    raise UnsupportedModelError(
        f"{path / 'config.json'} has {what}, which is not a model family transformers {transformers.__version__} "
        f"knows, so the model cannot be built. rankdown supports: {', '.join(supported_model_types())}. If it is "
        "a family newer than this transformers, upgrade it (pip install -U transformers); otherwise fix config.json")


def checkpoint_dtype(path: str | os.PathLike) -> torch.dtype | None:
    """The dtype a model folder's weights are stored in: config.json's ``dtype`` (``torch_dtype`` in
    older files), else the first floating tensor of its safetensors files; None when neither says."""
    path = Path(path)
    cfg = _read_config(path)
    name = cfg.get("dtype") or cfg.get("torch_dtype")
    if isinstance(name, str) and isinstance(getattr(torch, name, None), torch.dtype):
        return getattr(torch, name)
    from safetensors import safe_open

    check_weights(path)
    for file in sorted(path.glob("*.safetensors")):
        with safe_open(file, "pt") as f:
            for key in f.keys():
                t = f.get_slice(key)
                code = t.get_dtype()
                if code in _SAFETENSORS_FLOAT:
                    return getattr(torch, _SAFETENSORS_FLOAT[code])
    return None


_SAFETENSORS_FLOAT = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16"}


def read_record(path: str | os.PathLike) -> dict | None:
    """The ``rankdown`` record of a saved folder's config.json; None for a plain (uncompressed) model."""
    return _read_config(Path(path)).get("rankdown")


def has_tokenizer(path: str | os.PathLike) -> bool:
    """Whether a model folder carries tokenizer files."""
    p = Path(path)
    return any((p / f).exists() for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model"))
