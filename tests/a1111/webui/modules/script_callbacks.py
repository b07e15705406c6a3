"""modules/script_callbacks.py: on_before_ui (Forge L588), on_ui_tabs (L473), on_ui_settings
(L493), on_model_loaded (L467), on_infotext_pasted (L572; run by infotext_pasted_callback,
L378, before a paste reads the fields), clear_callbacks; signatures callback(*, name=None).
ui_tabs_callback (L278) / ui_settings_callback (L298) run them (the host logs a
callback's exception; here it is raised)."""

from collections import defaultdict

callback_map = defaultdict(list)


def clear_callbacks():
    callback_map.clear()


def _add(kind, callback, name):
    callback_map[kind].append((name, callback))


def on_before_ui(callback, *, name=None):
    _add("callbacks_before_ui", callback, name)


def on_ui_tabs(callback, *, name=None):
    _add("callbacks_ui_tabs", callback, name)


def on_ui_settings(callback, *, name=None):
    _add("callbacks_ui_settings", callback, name)


def on_model_loaded(callback, *, name=None):
    _add("callbacks_model_loaded", callback, name)


def on_infotext_pasted(callback, *, name=None):
    _add("callbacks_infotext_pasted", callback, name)


def infotext_pasted_callback(infotext: str, params):
    for _, c in callback_map["callbacks_infotext_pasted"]:
        c(infotext, params)


def before_ui_callback():
    for _, c in callback_map["callbacks_before_ui"]:
        c()


def model_loaded_callback(sd_model):
    for _, c in callback_map["callbacks_model_loaded"]:
        c(sd_model)


def ui_tabs_callback():
    res = []
    for _, c in callback_map["callbacks_ui_tabs"]:
        res += c() or []
    return res


def ui_settings_callback():
    for _, c in callback_map["callbacks_ui_settings"]:
        c()
