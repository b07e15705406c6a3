"""Install hook when ``a1111_extension/`` is installed (linked or copied) on its own.

The extension needs the ``unhype`` core: found beside this folder (a link into the repository),
or installed in the web UI's Python. Nothing heavy is installed here: the web UI already has
torch and safetensors; the repository's own install.py handles any missing package.
"""

import importlib.util
import os
import runpy

_repo = os.path.dirname(os.path.dirname(os.path.realpath(__file__)))

if os.path.isfile(os.path.join(_repo, "install.py")) and os.path.isdir(os.path.join(_repo, "unhype")):
    runpy.run_path(os.path.join(_repo, "install.py"), run_name="__main__")
elif importlib.util.find_spec("unhype") is None:
    print("UnHype: the core package 'unhype' is missing. Install the whole repository as the "
          "extension (Extensions > Install from URL), or link a1111_extension/ from a "
          "checkout of it instead of copying the folder alone.")
