"""Generation-parameter text ("infotext") fields for UnHype, and the file hash they carry.

Fields, as A1111/Forge write them under an image (values are quoted by the host when needed)::

    UnHype: nudity_v1 [3f2a9c1b7d04], UnHype strength: 0.8, UnHype cond only: False

``UnHype cond only`` is written only when it differs from the default (True, the paper's
behaviour). Tags in the prompt (``<unhype:name:s>``) stay in the prompt itself; their hashes go
in ``UnHype hashes: "name: hash, name2: hash2"`` as A1111 does for ``Lora hashes``.
The hash is the first 12 hex digits of the file's SHA-256 (A1111's ``shorthash`` length).
"""

from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass
from pathlib import Path

from unhype.dynamic_lora import check_strength
from unhype.errors import UnHypeError

FIELD_NAME = "UnHype"
FIELD_STRENGTH = "UnHype strength"
FIELD_COND_ONLY = "UnHype cond only"
FIELD_HASHES = "UnHype hashes"
SHORT_HASH = 12

_hash_cache: dict[tuple[str, int, int], str] = {}
_NAME_HASH = re.compile(r"^\s*(.*?)\s*(?:\[([0-9a-fA-F]{6,64})\])?\s*$")


def file_sha256(path) -> str:
    """Full SHA-256 of a file, cached on (path, size, mtime) so a UI refresh stays cheap."""
    path = Path(path)
    try:
        st = path.stat()
    except OSError:
        raise UnHypeError(f"{path}: no such file") from None
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    if key not in _hash_cache:
        digest = hashlib.sha256()
        with open(path, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                digest.update(block)
        _hash_cache[key] = digest.hexdigest()
    return _hash_cache[key]


def short_hash(path) -> str:
    return file_sha256(path)[:SHORT_HASH]


@dataclass(frozen=True)
class InfotextEntry:
    name: str
    hash: str | None
    strength: float | None  # None: the pasted strength is unusable (`problem` says why)
    cond_only: bool = True
    problem: str | None = None


def format_fields(name: str, file_hash: str | None, strength: float,
                  cond_only: bool = True) -> dict[str, str]:
    """The panel's fields for ``p.extra_generation_params``."""
    fields = {FIELD_NAME: f"{name} [{file_hash}]" if file_hash else name,
              FIELD_STRENGTH: _num(check_strength(strength))}
    if not cond_only:
        fields[FIELD_COND_ONLY] = "False"
    return fields


def format_hashes(pairs) -> str:
    """``UnHype hashes`` value for prompt tags: [(name, hash)] -> ``"a: 1234, b: 5678"``."""
    return ", ".join(f"{name.replace(':', '').replace(',', '')}: {h}" for name, h in pairs)


def parse_hashes(value: str) -> dict[str, str]:
    out = {}
    for part in (value or "").split(","):
        name, _, h = part.rpartition(":")
        if name.strip() and h.strip():
            out[name.strip()] = h.strip()
    return out


def parse_fields(params: dict) -> InfotextEntry | None:
    """The panel's entry from parsed generation parameters (strings or numbers), or None."""
    raw = params.get(FIELD_NAME)
    if raw is None or str(raw).strip() == "":
        return None
    m = _NAME_HASH.match(str(raw))
    name, file_hash = m[1], (m[2].lower() if m[2] else None)
    if not name and not file_hash:
        raise UnHypeError(f"infotext field {FIELD_NAME}: {raw!r} names no hypernetwork")
    raw_strength, problem = params.get(FIELD_STRENGTH, 1.0), None
    try:
        strength = check_strength(raw_strength)
    except UnHypeError as exc:  # the file is still named: only the strength is unusable
        strength, problem = None, f"infotext field {FIELD_STRENGTH}: {exc}"
    cond_only = str(params.get(FIELD_COND_ONLY, "True")).strip().lower() not in ("false", "0")
    return InfotextEntry(name, file_hash, strength, cond_only, problem)


def find_file(choices: dict[str, str], name: str, file_hash: str | None = None) -> str | None:
    """The choice key for an infotext entry: same hash first (files get renamed), then name."""
    if file_hash:
        for key, path in choices.items():
            try:
                if file_sha256(path).startswith(file_hash.lower()):
                    return key
            except UnHypeError:
                continue
    if not name:
        return None
    if name in choices:
        return name
    stems = [k for k in choices if os.path.splitext(os.path.basename(k))[0] == name]
    return stems[0] if len(stems) == 1 else None  # two files of that name: neither is sure


def _num(x: float) -> str:
    return f"{x:g}"
