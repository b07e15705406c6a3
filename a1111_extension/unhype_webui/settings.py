"""UnHype's section in Settings (modules/shared.py opts.add_option + OptionInfo)."""

from __future__ import annotations

from unhype_webui.session import MISMATCH_CONTINUE, MISMATCH_STOP

SECTION = ("unhype", "UnHype")


def add_options():
    import gradio as gr
    from modules import shared

    opts = [
        ("unhype_dir", shared.OptionInfo(
            "", "Hypernetwork folder (empty: models/UnHype)", section=SECTION)),
        ("unhype_on_family_mismatch", shared.OptionInfo(
            MISMATCH_STOP, "When a hypernetwork does not fit the loaded model (e.g. SDXL file, "
            "SD1 checkpoint)", gr.Radio, {"choices": [MISMATCH_STOP, MISMATCH_CONTINUE]},
            section=SECTION)),
        ("unhype_lora_dir", shared.OptionInfo(
            "", "Folder for baked LoRAs (empty: the Lora folder)", section=SECTION)),
        ("unhype_cache_files", shared.OptionInfo(
            2, "Hypernetworks kept loaded in memory", gr.Slider,
            {"minimum": 1, "maximum": 8, "step": 1}, section=SECTION)),
    ]
    for key, info in opts:
        shared.opts.add_option(key, info)
