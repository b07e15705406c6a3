"""ComfyUI entry point of the UnHype node pack (the repository root is the custom-node folder).

ComfyUI imports this file as a package named after the folder it was cloned into, which is
usually ``unhype`` - the same name as the core library in ``./unhype``. Then this package also
serves the core's modules (``unhype.hypernet`` ...) by putting ``./unhype`` first on its path.
Current ComfyUI names the package by its path instead; then the core ``./unhype`` is imported
as ``unhype`` from this folder, so the nodes run the core they ship with even where another
version is pip-installed in ComfyUI's interpreter. Outside ComfyUI (pip, pytest collecting the
repository as a package) importing this file loads no ComfyUI module.
"""

import importlib.util
import os
import sys

_ROOT = os.path.dirname(os.path.abspath(__file__))
_CORE = os.path.join(_ROOT, "unhype")

NODE_CLASS_MAPPINGS = {}
NODE_DISPLAY_NAME_MAPPINGS = {}

if __name__ == "unhype":  # loaded by ComfyUI from custom_nodes/unhype
    __path__.insert(0, _CORE)  # noqa: F821 (package __path__)
    with open(os.path.join(_CORE, "__init__.py"), encoding="utf-8") as _fh:
        exec(compile(_fh.read(), os.path.join(_CORE, "__init__.py"), "exec"))
else:
    if "unhype" not in sys.modules:  # this folder's core, whatever else is installed
        _spec = importlib.util.spec_from_file_location(
            "unhype", os.path.join(_CORE, "__init__.py"), submodule_search_locations=[_CORE])
        _core = importlib.util.module_from_spec(_spec)
        sys.modules["unhype"] = _core
        try:
            _spec.loader.exec_module(_core)
        except BaseException:
            del sys.modules["unhype"]
            raise


def _inside_comfyui() -> bool:
    """ComfyUI's own top-level `nodes` module (nodes.py, with load_custom_node) is loaded."""
    host = sys.modules.get("nodes")
    return host is not None and hasattr(host, "load_custom_node") and \
        importlib.util.find_spec("folder_paths") is not None


if __package__ and _inside_comfyui():
    from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS  # noqa: F811

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
