"""Atomic file writes: write a temp file next to the target, then rename it over the target.

Readers see the old file or the complete new one, never a half-written file; a write that
raises leaves the old content and no temp file behind. The temp file is in the target's folder
(a rename across file systems is not atomic) and has a unique name, so two writers never share
it. The file renamed into place has the target's old mode, or for a new file the usual one
(0666 less the umask), whatever mode the writer gave the temp file.

`check_output` refuses an output path that cannot be written before a command's work starts.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import stat
from pathlib import Path
from typing import Iterator

from unhype.errors import UnHypeError


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _final_mode(path: Path) -> int:
    try:
        return stat.S_IMODE(path.stat().st_mode)
    except OSError:
        return 0o666 & ~_umask()


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(path) -> Iterator[Path]:
    """A fresh temp path for the block to write; renamed onto `path` if the block succeeds,
    deleted if it raises. A symlinked `path` (a model folder shared between UIs) updates the
    file it points to and stays a link. The data reach the disk before the rename and the
    rename before returning, so a power loss leaves the old file or the new one."""
    path = Path(path)
    if path.is_symlink():
        path = Path(os.path.realpath(path))
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    try:
        yield tmp
        os.chmod(tmp, _final_mode(path))  # writers such as safetensors create it 0600
        _fsync(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    with contextlib.suppress(OSError):  # not every file system lets a folder be synced
        _fsync(path.parent)


def atomic_write_bytes(path, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(path, text: str, encoding: str = "utf-8") -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding=encoding)


def _same_file(a: Path, b: Path) -> bool:
    try:
        return a.exists() and b.exists() and os.path.samefile(a, b)
    except OSError:
        return False


def _try_create(probe: Path) -> str | None:
    """Create and delete an empty file; the reason it failed, or None."""
    try:
        os.close(os.open(probe, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))
    except OSError as exc:
        return exc.strerror or str(exc)
    probe.unlink(missing_ok=True)
    return None


def check_output(path, inputs=(), flag: str = "output") -> Path:
    """`path` as a file a command may write, checked before its work starts: not a folder, not
    one of the command's `inputs` (files it reads), in an existing folder it can create files
    in (tried, as permissions alone do not tell: root, read-only or virtual file systems)."""
    path = Path(path)
    if path.is_dir():
        raise UnHypeError(f"{flag} {path} is a folder; give a file name")
    if path.exists() and not path.is_file():
        raise UnHypeError(f"{flag} {path} exists and is not a regular file")
    for given in inputs:
        if given is not None and _same_file(path, Path(given)):
            raise UnHypeError(f"{flag} {path} is an input of this command ({given}); writing "
                              "it would replace it: give another output file")
    folder = path.parent
    if not folder.is_dir():
        raise UnHypeError(f"output folder {folder} does not exist")
    error = _try_create(folder / f".{path.name}.{secrets.token_hex(4)}.tmp")  # atomic_path's
    if error:
        raise UnHypeError(f"cannot write {path} in {folder} ({error})")
    return path


def check_output_folder(path, flag: str = "--out") -> Path:
    """`path` as a folder a command may create (with its parents) and write files in, checked
    before its work starts."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise UnHypeError(f"{flag} {path} is a file, not a folder")
    existing = path
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise UnHypeError(f"{flag} {path}: {existing} is a file, not a folder")
    error = _try_create(existing / f".unhype.{secrets.token_hex(4)}.tmp")
    if error:
        raise UnHypeError(f"{flag} {path}: cannot write in {existing} ({error})")
    return path
