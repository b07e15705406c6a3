"""Hypernetwork files in the UnHype models folder: listing, metadata, the load cache."""

from __future__ import annotations

import os

from unhype.errors import UnHypeError
from unhype.file_cache import FileCache, cache_limit
from unhype.fileformat import LoadedHypernet, load_hypernet, read_header, read_meta

from unhype_webui import host

_loaded = FileCache(lambda path: load_hypernet(path, device="cpu"))


def list_files(folder: str | None = None) -> dict[str, str]:
    """name -> path of every ``.safetensors`` under the folder (name: relative path, no ext)."""
    folder = folder or host.unhype_dir()
    out = {}
    if not os.path.isdir(folder):
        return out
    for root, _, names in os.walk(folder, followlinks=True):
        for fn in sorted(names):
            if fn.lower().endswith(".safetensors") and not fn.startswith("."):
                path = os.path.join(root, fn)
                name = os.path.splitext(os.path.relpath(path, folder))[0].replace(os.sep, "/")
                out[name] = path
    return dict(sorted(out.items(), key=lambda kv: kv[0].lower()))


def resolve(name: str, folder: str | None = None) -> tuple[str, str]:
    """(name, path) for a dropdown value or a tag name (relative path or bare file stem)."""
    files = list_files(folder)
    if name in files:
        return name, files[name]
    same = [k for k in files if k.rsplit("/", 1)[-1] == name]
    if len(same) > 1:  # a bare stem of files in two subfolders: which concept is not sure
        raise UnHypeError(f"UnHype: {name!r} names {len(same)} hypernetworks in "
                          f"{folder or host.unhype_dir()} ({', '.join(same)}); write the "
                          "subfolder too")
    if same:
        return same[0], files[same[0]]
    raise UnHypeError(f"UnHype: no hypernetwork named {name!r} in {folder or host.unhype_dir()}"
                      f" (found: {', '.join(list(files)[:8]) or 'none'})")


def load(path: str) -> LoadedHypernet:
    """Load (validated), keeping the ``unhype_cache_files`` most recently used files."""
    return _loaded.get(path, cache_limit(host.option("unhype_cache_files", 2) or 2, 2))


def describe(path: str) -> dict:
    """Metadata summary for the UI (header only)."""
    meta = read_meta(path)
    concepts = [c.get("target", "?") for c in meta.concepts]
    return {"family": meta.family, "embedding": meta.embedding.get("source", "?"),
            "variant": meta.config.variant, "rank": meta.config.rank,
            "targets": len(meta.config.targets), "hyper_steps": meta.config.hyper_steps,
            "concepts": concepts, "created": meta.created.get("date", "")}


def raw_metadata(path: str) -> dict:
    try:
        metadata, _ = read_header(path)
    except UnHypeError:
        return {}
    return dict(metadata)
