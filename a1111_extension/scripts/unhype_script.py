"""UnHype script loader for ``a1111_extension/`` installed (copied or linked) on its own."""

import os
import sys

_ext = os.path.dirname(os.path.dirname(os.path.realpath(__file__)))  # through a link
_repo = os.path.dirname(_ext)
for _path in ([_repo] if os.path.isdir(os.path.join(_repo, "unhype")) else []) + [_ext]:
    if _path not in sys.path:
        sys.path.insert(0, _path)

from unhype_webui.script import UnHypeScript, register_callbacks  # noqa: E402,F401

register_callbacks()
