"""Which base model a file was made from, by content: the hashes A1111, Civitai and kohya's
sd-scripts record for a single-file checkpoint (the full SHA-256, "AutoV2" being its first 10
hex digits, and the legacy 8-digit hash of 64 KiB at 1 MiB, A1111's old "Model hash"). A
diffusers folder or a hub id has no single file to hash: only its name is recorded."""

from __future__ import annotations

import hashlib
from pathlib import Path

from unhype.infotext import file_sha256


def legacy_hash(path) -> str:
    """A1111's old model hash (modules/hashes.py model_hash; kohya train_util.model_hash)."""
    with open(path, "rb") as fh:
        fh.seek(0x100000)
        return hashlib.sha256(fh.read(0x10000)).hexdigest()[:8]


def base_model_hashes(model) -> dict:
    """{"base_model_sha256", "base_model_legacy_hash"} of a single-file model; {} otherwise."""
    path = Path(model) if isinstance(model, (str, Path)) else None
    if path is None or not path.is_file():
        return {}
    return {"base_model_sha256": file_sha256(path), "base_model_legacy_hash": legacy_hash(path)}
