"""Building a model: the one way from a name to (model, tokenizer), and what a name implies.

A model name is the built-in reference (``"reference"`` or None), a GGUF file (or a folder holding
exactly one), a local Hugging Face folder (plain, or saved by rankdown: its recorded structure is
applied as it is built) or a hub id. :func:`load_model` tells them apart; the command line, the
benchmark and :func:`rankdown.io.load` all build through here, so a model loads the same way
whichever door it comes in by. :func:`folder_model` also builds the weightless skeleton that
streaming fills one layer at a time (see rankdown/stream.py), from the same class and config a
full load uses.

:func:`defaults_for` is the one place that decides what the reference model implies (its own
calibration and held-out texts, 256-token windows, code prompts) against any other model
(wikitext2, 2048-token windows, prose prompts).
"""

from __future__ import annotations

import contextlib
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

if TYPE_CHECKING:  # imported where used: ``rankdown --help`` does not wait for torch
    import torch
    from torch import nn

logger = logging.getLogger(__name__)

REFERENCE = "reference"

# greedy continuations of these prompts give the benchmark's degeneration measure (repeated 4-grams):
# the reference model was trained on Python code, other models on prose
CODE_PROMPTS = ("def __init__(self", "import os\nimport sys\n\n", "class Parser:\n    \"\"\"",
                "    for i in range(", "if __name__ == ")
TEXT_PROMPTS = ("The history of the city begins", "In mathematics, a group is", "She opened the door and",
                "The main advantage of this method is", "According to the report,")


def is_reference(name: str | None) -> bool:
    """Whether ``name`` designates the built-in reference model (None: the default model)."""
    return name in (None, REFERENCE)


# ----------------------------------------------------------------------------- defaults
@dataclass(frozen=True)
class ModelDefaults:
    """What a setting left out means for one model: the reference model has its own texts and a
    short context; any other model gets the texts and window length of the papers' tables."""

    calib: str  # calibration source
    ppl: str  # perplexity source
    seqlen: int  # tokens per calibration / perplexity window
    prompts: tuple[str, ...]  # prompts of the degeneration measure


def defaults_for(model: str | None) -> ModelDefaults:
    """The defaults of ``model`` (a name as :func:`load_model` takes it)."""
    if is_reference(model):
        return ModelDefaults(calib=REFERENCE, ppl="reference-heldout", seqlen=256, prompts=CODE_PROMPTS)
    return ModelDefaults(calib="wikitext2", ppl="wikitext2", seqlen=2048, prompts=TEXT_PROMPTS)


# ----------------------------------------------------------------------------- from a name
def load_model(name: str | None, dtype: str = "float32") -> tuple[Any, Any]:
    """(model, tokenizer) from a hub id, a local folder (plain or rankdown-saved), a GGUF file (or a
    folder holding exactly one, dequantized to ``dtype``) or the reference."""
    import torch

    torch_dtype = getattr(torch, dtype)
    if is_reference(name):
        from rankdown.reference import load_reference

        return load_reference(torch_dtype)
    from rankdown import gguf_source
    from rankdown.io import has_tokenizer, load_tokenizer

    gguf_file = gguf_source.find(name)
    if gguf_file is not None:
        return gguf_source.load(gguf_file, torch_dtype)
    path = Path(name).expanduser()
    if not path.exists() and (name.startswith((".", "/", "~")) or name.count("/") > 1):
        raise FileNotFoundError(f"{name}: no such model folder (and not a hub id of the form owner/name)")
    if path.exists():
        if not (path / "config.json").exists():
            raise FileNotFoundError(f"{path} has no config.json (nor a .gguf file): give a Hugging Face model "
                                    "folder, a .gguf file or a hub id")
        model = folder_model(path, dtype=torch_dtype)
        tokenizer = load_tokenizer(path) if has_tokenizer(path) else None
        return model, tokenizer
    return _load_hub(name, torch_dtype)


def encoder_model_types() -> frozenset[str]:
    """The model_types loaded with ``AutoModel`` rather than ``AutoModelForCausalLM``: those of the
    families the architecture table marks as not causal (bert, roberta, xlm-roberta)."""
    from rankdown.arch import FAMILIES

    return frozenset(t for spec in FAMILIES if not spec.causal for t in spec.model_types)


def _load_hub(name: str, dtype: "torch.dtype") -> tuple[Any, Any]:
    """(model, tokenizer) of a hub id (or the local cache of one)."""
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer

    def unreachable(e: OSError) -> FileNotFoundError:
        return FileNotFoundError(f"could not load {name!r}: it is not a local folder and the hub could not "
                                 f"provide it ({e}). Give a local model folder, or check the hub id and your network.")

    try:
        config = AutoConfig.from_pretrained(name)
    except OSError as e:
        raise unreachable(e) from None
    except ValueError as e:  # a model_type this transformers does not know
        from rankdown.arch import UnsupportedModelError, supported_model_types

        raise UnsupportedModelError(
            f"{name}: {str(e).splitlines()[0]} rankdown supports: {', '.join(supported_model_types())}") from None
    try:
        auto = AutoModel if config.model_type in encoder_model_types() else AutoModelForCausalLM
        model = auto.from_pretrained(name, dtype=dtype).eval()
        return model, AutoTokenizer.from_pretrained(name)
    except OSError as e:
        raise unreachable(e) from None


def no_tokenizer(model: str, what: str) -> str:
    """The error for a model without a tokenizer that ``what`` needs."""
    if Path(model).expanduser().is_dir():
        return (f"{model} has no tokenizer files, and {what} needs them: copy the tokenizer files "
                "(tokenizer.json, tokenizer_config.json ...) of the model it was made from into it")
    return f"{model} carries no tokenizer, and {what} needs one: give the model as a folder with its tokenizer files"


def stored_dtype(name: str | None) -> "torch.dtype | None":
    """The dtype the weights of model ``name`` are stored in (what a compressed copy is saved in by
    default); None for a GGUF file (quantized blocks: the dtype it is dequantized to) or when the
    model does not say."""
    import torch

    from rankdown.io import checkpoint_dtype

    if is_reference(name):
        from rankdown.reference import reference_dir

        return checkpoint_dtype(reference_dir())
    from rankdown import gguf_source

    if gguf_source.find(name) is not None:
        return None
    if Path(name).expanduser().is_dir():
        return checkpoint_dtype(Path(name).expanduser())
    from transformers import AutoConfig  # a hub id: its config says (in the local cache once the model is loaded)

    found = getattr(AutoConfig.from_pretrained(name), "dtype", None)
    return getattr(torch, found) if isinstance(found, str) else found


def save_dtype(name: str | None, save: str = "auto", dtype: str = "float32") -> "torch.dtype":
    """The dtype a compressed copy of model ``name`` is saved in: ``save`` ("float32", "bfloat16",
    "float16"), where ``auto`` is the dtype the model is stored in (else ``dtype``, the one it is
    loaded in). A GGUF file's quantized blocks have no float dtype: ``auto`` saves it in bfloat16
    (or the 16-bit ``dtype`` it was loaded in), not in the float32 it is dequantized to, which
    would make a 94 MB Q4 file a 415 MB folder."""
    import torch

    if save != "auto":
        return getattr(torch, save)
    loaded = getattr(torch, dtype)
    if not is_reference(name):
        from rankdown import gguf_source

        if gguf_source.find(name) is not None:
            return loaded if loaded.itemsize == 2 else torch.bfloat16
    return stored_dtype(name) or loaded


def should_stream(name: str | None, out: str | os.PathLike | None, method: str, want: bool | None = None) -> bool:
    """Whether to compress model ``name`` layer by layer from its files (see rankdown/stream.py).

    Default (``want`` None): yes for a local folder of safetensors weights saved to ``out``, unless
    the family's checkpoints cannot be mapped one layer at a time (fused experts); a method that
    takes gradients of the loss gets them layer by layer (rankdown/engine/backward.py).
    ``want=True`` insists (and says why it cannot), False loads the whole model. A GGUF file is never streamed: it is dequantized whole,
    in memory.
    """
    from rankdown import gguf_source
    from rankdown.config import ConfigError
    from rankdown.stream import can_stream, streamable_family

    gguf_file = None if is_reference(name) else gguf_source.find(name)
    if gguf_file is not None:
        if want:
            raise ConfigError(f"--stream reads safetensors folders layer by layer; {gguf_file.name} is a GGUF file, "
                              "which rankdown dequantizes and compresses in memory (drop --stream)")
        logger.info("%s is a GGUF file: loaded whole and compressed in memory (streaming reads safetensors folders)",
                    gguf_file)
        return False
    possible = not is_reference(name) and can_stream(name)
    if want and not possible:
        raise ConfigError("--stream reads a local model folder with safetensors weights; "
                          f"{name or REFERENCE!r} is not one (drop --stream)")
    if want and not out:
        raise ConfigError("--stream writes the model as it goes: give --out FOLDER")
    return bool(possible and out and want is not False and (want or streamable_family(name)))


def source_record(name: str | None) -> dict[str, Any] | None:
    """What a saved folder's record says about its input, where there is more to say than the
    model's config (a GGUF file: its name and quantization type)."""
    from rankdown import gguf_source

    gguf_file = None if is_reference(name) else gguf_source.find(name)
    return gguf_source.record(gguf_file) if gguf_file is not None else None


# ----------------------------------------------------------------------------- from a folder
def folder_model(path: str | os.PathLike, *, dtype: "torch.dtype | None" = None,
                 device: "str | torch.device" = "cpu", empty: bool = False) -> "nn.Module":
    """The model of a local folder, plain Hugging Face or saved by rankdown, in eval mode.

    A rankdown folder is built from its stock class with the recorded structure applied (the
    in-process twin of its generated code, which is not run). ``empty``: a skeleton on the meta
    device (buffers such as rotary frequencies real), no weights read, for streaming; otherwise the
    weights are loaded and checked against config.json. ``dtype=None`` keeps the saved dtype.
    """
    import torch

    from rankdown.io import record

    path = Path(path).expanduser().absolute()
    cfg = record._read_config(path)
    record.check_model_type(path, cfg)
    if empty:  # the streamed model's FolderWeights checked the weights already
        import transformers
        from accelerate import init_empty_weights

        cls, config = folder_class(path, cfg, empty=True)
        with init_empty_weights(include_buffers=False):
            if issubclass(cls, transformers.PreTrainedModel):
                return cls._from_config(config, dtype=dtype).eval()
            return cls.from_config(config, dtype=dtype).eval()  # an Auto class
    record.check_weights(path)
    cls, config = folder_class(path, cfg, empty=False)
    # mismatched shapes are reported (then raised by _check_loading_info) rather than raised by transformers
    kwargs: dict[str, Any] = {"dtype": "auto" if dtype is None else dtype, "output_loading_info": True,
                              "ignore_mismatched_sizes": True}
    if torch.device(device).type != "cpu":
        kwargs["device_map"] = torch.device(device)
    with _quiet_transformers():  # its load report would repeat what _check_loading_info says
        model, info = cls.from_pretrained(path, config=config, **kwargs)
    _check_loading_info(info, path, strict=cfg.get("rankdown") is not None)
    return model.eval()


def folder_class(path: Path, cfg: dict, empty: bool) -> tuple[type, Any]:
    """:func:`_folder_class`, a config.json value of the wrong type (``"hidden_size": "abc"``)
    refused in one line rather than as transformers' validation traceback."""
    from huggingface_hub.errors import StrictDataclassError

    from rankdown.io import ModelFolderError

    try:
        return _folder_class(path, cfg, empty)
    except StrictDataclassError as e:
        why = str(e.__cause__ or e).splitlines()[-1].strip()
        raise ModelFolderError(f"{path / 'config.json'} holds a value transformers refuses ({why}): fix that value, "
                               "or fetch the model again") from None


def check_folder_config(path: str | os.PathLike) -> None:
    """Refuse, in one line, a model folder whose config.json no model can be built from: not UTF-8,
    not JSON, an unknown model_type, a value of the wrong type. Cheap: no weight is read."""
    from rankdown.io import record

    path = Path(path).expanduser().absolute()
    cfg = record._read_config(path)
    record.check_model_type(path, cfg)
    folder_class(path, cfg, empty=True)


def _folder_class(path: Path, cfg: dict, empty: bool) -> tuple[type, Any]:
    """The class that builds a folder's model, and its config.

    Plain folders: the class config.json names (``BertForMaskedLM`` keeps its head), else an Auto
    class: a skeleton is always the causal LM (streaming maps checkpoint names one to one, which a
    base ``AutoModel``'s names are not), a full load the causal LM only when an architecture listed
    is one (transformers maps checkpoint prefixes itself)."""
    import transformers

    from rankdown.io import reading, record as folder

    record = cfg.get("rankdown")
    if record is None:
        config = transformers.AutoConfig.from_pretrained(path)
        archs = getattr(config, "architectures", None) or []
        cls = getattr(transformers, archs[0], None) if archs else None
        if isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel):
            return cls, config
        causal = empty or any(folder._is_causal_lm(a) for a in archs)
        return (transformers.AutoModelForCausalLM if causal else transformers.AutoModel), config
    if not empty and record.get("format") != folder.FORMAT:  # (the skeleton has never checked the format)
        raise folder.ModelFolderError(
            f"{path} was saved in rankdown format {record.get('format')!r}; this rankdown reads format {folder.FORMAT}. "
            "Install the rankdown version recorded in config.json (rankdown.versions)"
        )
    stock, config = reading._base_config(path, cfg, record)
    return reading._wrapper_class(stock), config


@contextlib.contextmanager
def _quiet_transformers() -> Iterator[None]:
    """transformers' warnings silenced for the duration (its verbosity restored after)."""
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)


def _check_loading_info(info: dict, path: Path, strict: bool) -> None:
    """Refuse weights that do not match config.json; ``strict`` (a rankdown folder): unexpected
    keys too, which a plain checkpoint as downloaded may carry (they are logged)."""
    from rankdown.io import ModelFolderError

    problems = []
    for kind in ("missing_keys", "unexpected_keys", "mismatched_keys"):
        keys = sorted(
            f"{k[0]} (file {tuple(k[1])}, model {tuple(k[2])})" if isinstance(k, tuple) else str(k)
            for k in info.get(kind) or ()
        )
        if keys and (strict or kind != "unexpected_keys"):
            more = f" and {len(keys) - 3} more" if len(keys) > 3 else ""
            problems.append(f"{kind.replace('_', ' ')}: {', '.join(keys[:3])}{more}")
        elif keys:
            logger.warning("%s: unexpected keys ignored: %s", path, ", ".join(keys[:3]))
    problems += [str(m) for m in info.get("error_msgs") or ()]
    if problems and not strict:  # a plain checkpoint, as downloaded
        raise ModelFolderError(
            f"the weights in {path} do not match its config.json ({'; '.join(problems)}): the checkpoint is "
            "incomplete, or config.json belongs to other weights; fetch the model again"
        )
    if problems:
        raise ModelFolderError(
            f"the weights in {path} do not match its config.json ({'; '.join(problems)}): the folder is "
            "corrupt or incomplete, or was written by another rankdown version; save the model again"
        )
