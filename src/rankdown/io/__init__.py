"""Saving and loading compressed models as ordinary Hugging Face folders.

A saved folder holds config.json, model.safetensors (sharded like ``save_pretrained``), the
tokenizer, and two generated files, ``configuration_rankdown.py`` and ``modeling_rankdown.py``,
so that ``AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)`` works on a
machine without rankdown. :func:`load` reads the same folder without running those files.

    writing.py   save: the folder, written beside its place and renamed into it
    reading.py   load, load_tokenizer: the model built in-process from the record
    record.py    config.json and its ``rankdown`` record, checked; weights, dtype, versions
    out_dir.py   the output folder: taken, inside the input, unwritable; a full disk
"""

from rankdown.io.out_dir import DISK_ERRNOS, OutputExistsError, as_disk_error, check_writable, clear_stale
from rankdown.io.reading import load, load_tokenizer
from rankdown.io.record import (
    FORMAT, ModelFolderError, check_model_type, check_weights, checkpoint_dtype, has_tokenizer, read_record,
)
from rankdown.io.writing import CONFIG_FILE, MODELING_FILE, save

# (private helpers that rankdown/stream.py, rankdown/realmodels.py and rankdown/pipeline.py reach here)
from rankdown.io.out_dir import _check_out_dir  # noqa: E402,F401
from rankdown.io.record import _read_config, _versions  # noqa: E402,F401

__all__ = [
    "CONFIG_FILE", "DISK_ERRNOS", "FORMAT", "MODELING_FILE", "ModelFolderError", "OutputExistsError", "as_disk_error",
    "check_model_type", "check_weights", "check_writable", "checkpoint_dtype", "clear_stale", "has_tokenizer", "load",
    "load_tokenizer", "read_record", "save",
]
