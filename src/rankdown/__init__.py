"""rankdown: make trained language models smaller by activation-guided low-rank decomposition.

    import rankdown
    model, tok = rankdown.load("reference"), rankdown.load_tokenizer("reference")
    report = rankdown.compress(model, tok, rankdown.ModeGPTConfig(ratio=0.3), calibration="reference")
    rankdown.save(model, tok, "out/small", report)
    small = rankdown.load("out/small")
"""

from __future__ import annotations

try:
    from importlib.metadata import PackageNotFoundError, version

    __version__ = version("rankdown")
except PackageNotFoundError:  # running from a source tree
    __version__ = "0+unknown"

from rankdown.api import CompressionReport, compress
from rankdown.config import ConfigError, MethodConfig, RunSettings
from rankdown.heal import HealConfig
from rankdown.methods import config_class, make_config, method_names
from rankdown.methods.asvd import ASVDConfig
from rankdown.methods.fwsvd import FWSVDConfig
from rankdown.methods.kfac import KFACConfig
from rankdown.methods.lillama import LillamaConfig
from rankdown.methods.modegpt import ModeGPTConfig
from rankdown.methods.rom import ROMConfig
from rankdown.methods.svd import SVDConfig
from rankdown.methods.svd_llm import SVDLLMConfig
from rankdown.reference import load_reference


def save(model, tokenizer, out_dir, report: CompressionReport, overwrite: bool = False, source: dict | None = None):
    """Save a compressed model as a Hugging Face folder that records how it was made.

    ``source``, when given, is recorded as ``rankdown.source`` in config.json: what the input was
    where its config does not say (a GGUF file: ``{"gguf_file": ..., "quantization": ...}``, see
    :func:`rankdown.gguf_source.record`).
    """
    from rankdown import io

    record = report.record()
    if source is not None:
        record["source"] = source
    # io.save adds the library versions itself
    return io.save(model, tokenizer, out_dir, record=record, structure=report.structure,
                   overwrite=overwrite, extra_files=report.artifacts)


def load(path, device="cpu", dtype=None):
    """Load a model saved by rankdown (or any plain Hugging Face folder); ``"reference"``: the built-in
    reference model (in float32 unless ``dtype`` says otherwise; it is stored in float16)."""
    from rankdown import io

    if str(path) == "reference":
        import torch

        from rankdown.reference import reference_dir

        return io.load(reference_dir(), device=device, dtype=dtype or torch.float32)
    return io.load(path, device=device, dtype=dtype)


def load_tokenizer(path):
    """The tokenizer of a saved folder (``"reference"``: the reference model's), without the
    remote-code prompt of ``AutoTokenizer``."""
    from rankdown import io

    if str(path) == "reference":
        from rankdown.reference import reference_dir

        path = reference_dir()
    return io.load_tokenizer(path)


__all__ = [
    "ASVDConfig", "CompressionReport", "FWSVDConfig", "ConfigError", "HealConfig", "KFACConfig", "LillamaConfig", "MethodConfig", "ModeGPTConfig", "ROMConfig", "SVDConfig", "SVDLLMConfig",
    "RunSettings", "compress", "config_class", "load", "load_reference", "load_tokenizer", "make_config", "method_names", "save", "__version__",
]
