"""Atomic file writes: write a temp file next to the target, then rename it over the target.

Readers see the old file or the complete new one, never a half-written file; a write that
raises leaves the old content and no temp file behind. The temp file is in the target's folder
(a rename across file systems is not atomic) and has a unique name, so two writers never share
it. The file renamed into place has the target's old mode, or for a new file the usual one
(0666 less the umask), whatever mode the writer gave the temp file.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import stat
from pathlib import Path
from typing import Iterator


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _final_mode(path: Path) -> int:
    try:
        return stat.S_IMODE(path.stat().st_mode)
    except OSError:
        return 0o666 & ~_umask()


@contextlib.contextmanager
def atomic_path(path) -> Iterator[Path]:
    """A fresh temp path for the block to write; renamed onto `path` if the block succeeds,
    deleted if it raises."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    try:
        yield tmp
        os.chmod(tmp, _final_mode(path))  # writers such as safetensors create it 0600
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
