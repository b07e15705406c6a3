"""modules/scripts.py: Script (Forge L53-353), AlwaysVisible (L14), load_scripts (L491-533) as
load_extension_scripts."""

import inspect
import sys

from modules import script_callbacks, script_loading

AlwaysVisible = object()


class Script:
    name = None
    section = None
    filename = None
    args_from = None
    args_to = None
    alwayson = False
    is_txt2img = False
    is_img2img = False
    tabname = None
    group = None
    create_group = True
    infotext_fields = None
    paste_field_names = None
    controls = None
    sorting_priority = 0

    def title(self):
        raise NotImplementedError()

    def ui(self, is_img2img):
        pass

    def show(self, is_img2img):
        return True

    def process(self, p, *args):
        pass

    def process_batch(self, p, *args, **kwargs):
        pass

    def before_hr(self, p, *args):
        pass

    def postprocess(self, p, processed, *args):
        pass

    def elem_id(self, item_id):
        return f"script_{'img2img' if self.is_img2img else 'txt2img'}_unhype_{item_id}"


scripts_data = []


def load_extension_scripts(extension_root, script_paths):
    """What load_scripts() (which scans every extension folder) does for one extension: clear
    callbacks, put the extension root first on sys.path while importing each script by file
    path, register every Script subclass, then restore sys.path (but the root stays: L499-501
    prepend every basedir beforehand)."""
    scripts_data.clear()
    script_callbacks.clear_callbacks()
    if extension_root not in sys.path:
        sys.path = [extension_root] + sys.path
    syspath = sys.path
    for path in script_paths:
        try:
            sys.path = [extension_root] + sys.path
            module = script_loading.load_module(path)
            for value in module.__dict__.values():
                if inspect.isclass(value) and issubclass(value, Script) and value is not Script:
                    scripts_data.append(value)
        finally:
            sys.path = syspath
    return scripts_data
