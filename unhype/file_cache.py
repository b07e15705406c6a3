"""The hypernetwork files a host keeps loaded: the most recently used few, each loaded again
when its size or modification time changes. Each file holds its network and, for a file of
several concepts, their signatures (a file of 50 FLUX concepts: about 1.25 GB on the CPU), so
the hosts bound how many stay: the A1111 extension's ``unhype_cache_files`` setting, ComfyUI's
``UNHYPE_CACHE_FILES``.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from typing import Callable

from unhype.errors import UnHypeError
from unhype.fileformat import LoadedHypernet, load_hypernet


def cache_limit(value, default: int) -> int:
    """The number of files to keep from a setting's `value` (at least 1); `default` when it is
    empty or not a whole number."""
    try:
        return max(1, int(value))
    except (TypeError, ValueError):
        return default


class FileCache:
    """Loaded files by absolute path, least recently used first."""

    def __init__(self, load: Callable[[str], LoadedHypernet] = load_hypernet):
        self._load = load
        self._files: OrderedDict[str, tuple[tuple[int, int], LoadedHypernet]] = OrderedDict()

    def get(self, path: str, limit: int) -> LoadedHypernet:
        """The loaded file at `path` (validated by the loader); at most `limit` files stay."""
        try:
            st = os.stat(path)
        except OSError:
            raise UnHypeError(f"{path}: no such file") from None
        key, stamp = os.path.abspath(path), (st.st_mtime_ns, st.st_size)
        hit = self._files.pop(key, None)  # a changed file's old load is dropped, not kept
        if hit is None or hit[0] != stamp:
            hit = (stamp, self._load(path))
        self._files[key] = hit
        while len(self._files) > max(1, limit):
            self._files.popitem(last=False)
        return hit[1]

    def __len__(self) -> int:
        return len(self._files)

    def clear(self) -> None:
        self._files.clear()
