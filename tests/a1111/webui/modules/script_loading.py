"""modules/script_loading.py load_module (Forge L10-16, same in A1111 1.10): a script file is
imported by path under its file name, not as a package module."""

import importlib.util
import os

loaded_scripts = {}


def load_module(path):
    module_spec = importlib.util.spec_from_file_location(os.path.basename(path), path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    loaded_scripts[path] = module
    return module
