"""Install hook run by ComfyUI-Manager and by AUTOMATIC1111/Forge (``python install.py`` with the
host's own interpreter), and the user's one-line setup: ``python install.py``.

Installs into ``sys.executable`` (``-m pip``) only what is missing, never torch (the host's
own build) and never an upgrade of a package the host already has (hosts pin their versions;
an upgrade can break them). In AUTOMATIC1111/Forge the extension needs only torch and
safetensors at run time, so there nothing but missing ``safetensors`` is installed; elsewhere
the missing packages of requirements.txt. Set UNHYPE_INSTALL_ALL=1 to install all of
requirements.txt anyway.
"""

import importlib.metadata
import os
import re
import subprocess
import sys

ROOT = os.path.dirname(os.path.abspath(__file__))
NEVER = {"torch", "torchvision", "torchaudio", "xformers"}
WEBUI_NEEDS = {"safetensors"}


def in_webui() -> bool:
    """A1111/Forge run install.py from the web UI folder with it on PYTHONPATH."""
    for folder in [os.getcwd()] + os.environ.get("PYTHONPATH", "").split(os.pathsep):
        if folder and os.path.isfile(os.path.join(folder, "launch.py")) and \
                os.path.isdir(os.path.join(folder, "modules")):
            return True
    return False


def requirements(path):
    out = []
    if not os.path.isfile(path):
        return out
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            line = line.split("#", 1)[0].strip()
            if line and not line.startswith("-"):
                out.append(line)
    return out


def dist_name(req: str) -> str:
    return re.split(r"[<>=!~;\[ ]", req, maxsplit=1)[0].strip()


def missing(reqs):
    todo = []
    for req in reqs:
        name = dist_name(req)
        if name.lower() in NEVER:
            continue
        try:
            importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            todo.append(req)
    return todo


def main() -> int:
    reqs = requirements(os.path.join(ROOT, "requirements.txt"))
    if in_webui() and os.environ.get("UNHYPE_INSTALL_ALL") != "1":
        reqs = [r for r in reqs if dist_name(r).lower() in WEBUI_NEEDS] or sorted(WEBUI_NEEDS)
    todo = missing(reqs)
    if not todo:
        return 0
    print(f"UnHype: installing {', '.join(todo)}", flush=True)
    return subprocess.call([sys.executable, "-m", "pip", "install", *todo])


if __name__ == "__main__":
    sys.exit(main())
