"""The A1111/Forge script: an always-visible UnHype panel in txt2img and img2img.

Loaded by ``scripts/unhype_a1111.py`` (repository root, "Install from URL") or by
``a1111_extension/scripts/unhype_script.py`` (the folder installed on its own). Registers the
``<unhype:...>`` extra network, its cards page, the UnHype tab and the settings.
"""

from __future__ import annotations

import logging

from modules import extra_networks, script_callbacks, scripts

from unhype_webui import runner
from unhype_webui.extra_network import ExtraNetworkUnHype

log = logging.getLogger("unhype")


class UnHypeScript(scripts.Script):
    sorting_priority = 20

    def title(self):
        return "UnHype"

    def show(self, is_img2img):
        return scripts.AlwaysVisible

    def ui(self, is_img2img):
        from unhype_webui import ui

        return ui.panel(self, is_img2img)

    def process(self, p, *args):
        runner.process(p, *args)

    def postprocess(self, p, processed, *args):
        runner.postprocess(p)


def _register_network():
    extra_networks.register_extra_network(ExtraNetworkUnHype())


def _before_ui():
    _register_network()
    try:
        from modules import ui_extra_networks

        from unhype_webui.ui_page import ExtraNetworksPageUnHype

        ui_extra_networks.register_page(ExtraNetworksPageUnHype())
    except Exception:  # the cards page is optional; generation never depends on it
        log.exception("UnHype: could not register the extra-networks page")


def _on_ui_tabs():
    from unhype_webui import ui

    return ui.tab()


def _on_ui_settings():
    from unhype_webui import settings

    settings.add_options()


def register_callbacks():
    """Called by the loader file each time the host (re)loads scripts: the host clears its
    callback lists before re-running script files (modules/scripts.py load_scripts ->
    script_callbacks.clear_callbacks), but this module stays imported."""
    _register_network()
    script_callbacks.on_before_ui(_before_ui)
    script_callbacks.on_ui_tabs(_on_ui_tabs)
    script_callbacks.on_ui_settings(_on_ui_settings)
    script_callbacks.on_model_loaded(_on_model_loaded)
    script_callbacks.on_infotext_pasted(runner.infotext_pasted)


def _on_model_loaded(sd_model):
    runner.remove_all()
