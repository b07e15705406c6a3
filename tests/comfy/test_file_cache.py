"""The Loader's file cache: the most recently used files (CACHE_FILES, or $UNHYPE_CACHE_FILES),
each loaded again when its modification time or size changes."""

from __future__ import annotations

import os
import shutil

import pytest


@pytest.fixture
def glue(pack, monkeypatch):
    """The pack's glue with an empty cache (the session's comes back afterwards)."""
    glue = pack.nodes.glue
    monkeypatch.setattr(glue, "_CACHE", type(glue._CACHE)())
    monkeypatch.delenv("UNHYPE_CACHE_FILES", raising=False)
    return glue


def copies(hyper_file, tmp_path, n):
    paths = [str(tmp_path / f"h{i}.safetensors") for i in range(n)]
    for path in paths:
        shutil.copy(hyper_file, path)
    return paths


def test_the_least_recently_used_file_goes_first(glue, hyper_file, tmp_path):
    paths = copies(hyper_file, tmp_path, glue.CACHE_FILES + 1)
    first = [glue.load_cached(p) for p in paths[:-1]]
    assert glue.load_cached(paths[0]) is first[0]  # a hit, now the most recently used
    glue.load_cached(paths[-1])  # one file too many: paths[1] is the least recently used
    assert len(glue._CACHE) == glue.CACHE_FILES
    assert glue.load_cached(paths[0]) is first[0]
    reloaded = glue.load_cached(paths[1])
    assert reloaded is not first[1] and reloaded.meta.family == first[1].meta.family


def test_unhype_cache_files_sets_how_many(glue, hyper_file, tmp_path, monkeypatch):
    a, b = copies(hyper_file, tmp_path, 2)
    monkeypatch.setenv("UNHYPE_CACHE_FILES", "1")
    first = glue.load_cached(a)
    glue.load_cached(b)
    assert glue.load_cached(a) is not first
    monkeypatch.setenv("UNHYPE_CACHE_FILES", "many")  # not a number: the default
    kept = glue.load_cached(a), glue.load_cached(b)
    assert glue.load_cached(a) is kept[0] and glue.load_cached(b) is kept[1]


def test_a_changed_file_is_loaded_again(glue, hyper_file, tmp_path):
    import tiny

    (path,) = copies(hyper_file, tmp_path, 1)
    first = glue.load_cached(path)
    st = os.stat(path)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # touched: another mtime
    touched = glue.load_cached(path)
    assert touched is not first and glue.load_cached(path) is touched
    tiny.save_tiny_hypernet(path, rank=3)  # another size, the same mtime
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    assert os.stat(path).st_size != st.st_size
    resized = glue.load_cached(path)
    assert resized is not touched and resized.meta.config.rank == 3
    assert len(glue._CACHE) == 1  # the older loads of the same path are not kept
