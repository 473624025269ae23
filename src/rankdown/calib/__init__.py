"""Calibration data: where text comes from (:mod:`.sources`) and how it becomes token batches
(:mod:`.sampling`)."""

from rankdown.calib.sampling import (
    CalibrationData,
    calibration_data,
    check_seqlen,
    check_size,
    pad_id,
    record_ids,
    render_record,
    source_text,
    tokenize_text,
)
from rankdown.calib.sources import SOURCE_NAMES, CalibrationError, check_source, load_records, load_texts

__all__ = [
    "SOURCE_NAMES",
    "CalibrationData",
    "CalibrationError",
    "calibration_data",
    "check_seqlen",
    "check_size",
    "check_source",
    "load_records",
    "load_texts",
    "pad_id",
    "record_ids",
    "render_record",
    "source_text",
    "tokenize_text",
]
