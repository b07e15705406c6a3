"""The root install.py as A1111/Forge and ComfyUI-Manager run it: only missing packages, never
torch, never an upgrade; in a web UI only what the extension needs (safetensors)."""

import importlib.metadata
import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def install(monkeypatch, tmp_path):
    spec = importlib.util.spec_from_file_location("unhype_install", ROOT / "install.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    (tmp_path / "requirements.txt").write_text(
        "torch>=2.1\nsafetensors>=0.4  # tensors\ndiffusers>=0.30\ntransformers>=4.40\n")
    monkeypatch.setattr(module, "ROOT", str(tmp_path))
    calls = []
    monkeypatch.setattr(module.subprocess, "call", lambda cmd: calls.append(cmd) or 0)
    present = {"transformers"}

    def version(name):
        if name not in present:
            raise importlib.metadata.PackageNotFoundError(name)
        return "4.30.2"  # older than required: must not be upgraded

    monkeypatch.setattr(module.importlib.metadata, "version", version)
    monkeypatch.delenv("UNHYPE_INSTALL_ALL", raising=False)
    return module, calls, tmp_path


def test_in_a_web_ui_only_missing_safetensors_is_installed(install, monkeypatch, tmp_path):
    module, calls, _ = install
    webui = tmp_path / "webui"
    (webui / "modules").mkdir(parents=True)
    (webui / "launch.py").write_text("")
    monkeypatch.chdir(webui)
    assert module.in_webui()
    assert module.main() == 0
    assert calls == [[module.sys.executable, "-m", "pip", "install", "safetensors>=0.4"]]


def test_elsewhere_missing_requirements_without_torch_or_upgrades(install, monkeypatch):
    module, calls, tmp_path = install
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("PYTHONPATH", "")
    assert not module.in_webui()
    module.main()
    assert calls == [[module.sys.executable, "-m", "pip", "install", "safetensors>=0.4",
                      "diffusers>=0.30"]]


def test_root_scripts_folder_holds_only_the_thin_loader():
    files = sorted(p.name for p in (ROOT / "scripts").iterdir() if p.suffix == ".py")
    assert files == ["unhype_a1111.py"]
    code = (ROOT / "scripts" / "unhype_a1111.py").read_text()
    assert "from unhype_webui.script import UnHypeScript" in code and "class " not in code
