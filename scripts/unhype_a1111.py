"""AUTOMATIC1111 / Forge entry point when this repository is installed as an extension
("Install from URL"): the web UI imports every ``scripts/*.py`` of an extension by file path.
All code lives in ``a1111_extension/unhype_webui``; this file only makes it importable."""

import os
import sys

_repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
for _path in (_repo, os.path.join(_repo, "a1111_extension")):
    if _path not in sys.path:
        sys.path.insert(0, _path)

from unhype_webui.script import UnHypeScript, register_callbacks  # noqa: E402,F401

register_callbacks()
