"""Atomic file writes: write a temp file next to the target, then rename it over the target.

Readers see the old file or the complete new one, never a half-written file; a write that
raises leaves the old content and no temp file behind. The temp file is in the target's folder
(a rename across file systems is not atomic) and has a unique name, so two writers never share
it; it is created by the writer, with the usual permissions.
"""

from __future__ import annotations

import contextlib
import os
import secrets
from pathlib import Path
from typing import Iterator


@contextlib.contextmanager
def atomic_path(path) -> Iterator[Path]:
    """A fresh temp path for the block to write; renamed onto `path` if the block succeeds,
    deleted if it raises."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_bytes(path, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(path, text: str, encoding: str = "utf-8") -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding=encoding)
