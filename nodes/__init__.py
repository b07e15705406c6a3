"""UnHype's ComfyUI nodes (needs a running ComfyUI: imports folder_paths and comfy.*)."""

from . import glue
from .definitions import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS

glue.register_folder()

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
