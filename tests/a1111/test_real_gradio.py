"""The extension's UI built with the real gradio, as A1111 1.10 (gradio 3.41.2) and Forge
(gradio 4.40.0) build it: the script panel in a txt2img and an img2img interface, the UnHype tab
(an ``on_ui_tabs`` Blocks rendered into the page), the settings section; each event the UI binds
is fired through gradio's own ``process_api`` (preprocess, the bound function, postprocess, the
session state of gradio 4), and the host's paste / "Send to img2img" bindings are made as
``modules/infotext_utils.py`` makes them. Skipped, with the reason, where gradio is not
importable (the test stack's venv); DEVELOPERS.md "Real gradio" makes the side venvs."""

from __future__ import annotations

import asyncio
import importlib
import sys
import warnings
from pathlib import Path

import pytest

try:
    import gradio as gr

    MAJOR = int(gr.__version__.split(".")[0])
    _SKIP = None if MAJOR in (3, 4) else \
        f"gradio {gr.__version__}: the web UIs pin 3.41.2 (A1111) and 4.40.0 (Forge)"
except Exception as exc:  # noqa: BLE001  ImportError, or a gradio that breaks on import
    gr, MAJOR = None, 0
    _SKIP = (f"real gradio not importable ({type(exc).__name__}: {exc}); DEVELOPERS.md "
             "'Real gradio' makes the side venvs")

pytestmark = pytest.mark.skipif(_SKIP is not None, reason=_SKIP or "")

ROOT = Path(__file__).resolve().parents[2]
PANEL_LABELS = ["Enable", "Hypernetwork", "Strength", "Apply to conditional branch only (paper)"]


# --- gradio's event machinery, in process -----------------------------------------------------
def dependencies(blocks):
    """(handle, [(component, event)], inputs, outputs) of every event bound in `blocks`."""
    if MAJOR >= 4:
        for fn in blocks.fns.values():
            yield (fn, [(blocks.blocks.get(i), e) for i, e in fn.targets], list(fn.inputs),
                   list(fn.outputs))
    else:
        for i, d in enumerate(blocks.dependencies):
            yield (i, [(blocks.blocks.get(t), d["trigger"]) for t in d["targets"]],
                   [blocks.blocks[x] for x in d["inputs"]],
                   [blocks.blocks[x] for x in d["outputs"]])


def new_state(blocks):
    """A browser session: gradio 4 keeps each component's updated props (choices) in it."""
    if MAJOR >= 4:
        from gradio.state_holder import SessionState

        return SessionState(blocks)
    return {}


def fire(blocks, component, event, values, state):
    """What the browser receives when `event` of `component` fires with `values` (the inputs'
    payloads): gradio's process_api (the output count checked by gradio), then the response
    encoding gradio's routes use (it must serialise)."""
    from gradio.routes import ORJSONResponse

    found = [(h, ins, outs) for h, targets, ins, outs in dependencies(blocks)
             if (component, event) in targets]
    assert len(found) == 1, f"{len(found)} {event} events on {component}"
    handle, inputs, outputs = found[0]
    assert len(values) == len(inputs)
    data = asyncio.run(blocks.process_api(handle, list(values), state=state))["data"]
    assert len(data) == len(outputs)
    ORJSONResponse._render(data)
    return data


def choices(component, state=None):
    """The choices the browser's dropdown lists now (gradio 4: the session's copy)."""
    if MAJOR >= 4 and state is not None and component._id in state:
        component = state[component._id]
    return [c[1] if isinstance(c, (tuple, list)) else c for c in component.choices]


def update_value(update):
    assert isinstance(update, dict) and update.get("__type__") in ("update", "generic_update")
    return update.get("value")


def update_choices(update) -> list | None:
    """The choices an update sends (gradio 4: [name, value] pairs), None when it sends none."""
    if not isinstance(update, dict) or "choices" not in update:
        return None
    return [c[1] if isinstance(c, (tuple, list)) else c for c in update["choices"]]


# --- the host's own steps, as modules/* take them ---------------------------------------------
def paste_func(fields, params):
    """infotext_utils.connect_paste paste_func (Forge L574-614, A1111 1.10 the same): each
    field's update from the parsed, callback-edited infotext; a string key is converted to the
    type of the component's value at UI build time."""
    res = []
    for output, key in fields:
        v = key(params) if callable(key) else params.get(key, None)
        if v is None:
            res.append(gr.update())
        elif isinstance(v, type(gr.update())):
            res.append(v)
        else:
            try:
                valtype = type(output.value)
                if valtype == bool and v == "False":
                    val = False
                elif valtype == int:
                    val = float(v)
                else:
                    val = valtype(v)
                res.append(gr.update(value=val))
            except Exception:  # noqa: BLE001  the host's own catch-all
                res.append(gr.update())
    return res


def parse_infotext(text: str) -> dict:
    """What parse_generation_parameters gives for the UnHype lines: strings."""
    return dict(line.split(": ", 1) for line in text.splitlines() if ": " in line)


def script_ui(script_class, is_img2img):
    """scripts.py ScriptRunner: initialize_scripts sets the tab, setup_ui_for_section wraps an
    always-visible script in a gr.Group, create_script_ui_inner calls ui(is_img2img) and reads
    each control for the API's ScriptInfo."""
    from modules import scripts

    script = script_class()
    script.filename = str(ROOT / "scripts" / "unhype_a1111.py")
    script.is_txt2img, script.is_img2img = not is_img2img, is_img2img
    script.tabname = "img2img" if is_img2img else "txt2img"
    assert script.show(is_img2img) is scripts.AlwaysVisible
    script.alwayson = True
    with gr.Group(visible=True):
        controls = script.ui(is_img2img)
    api_args = []
    for control in controls:
        control.custom_script_source = "unhype_a1111.py"
        arg = {"label": control.label or ""}
        for field in ("value", "minimum", "maximum", "step"):
            if getattr(control, field, None) is not None:
                arg[field] = getattr(control, field)
        if getattr(control, "choices", None) is not None:
            arg["choices"] = [x[0] if isinstance(x, tuple) else x for x in control.choices]
        api_args.append(arg)
    return script, controls, api_args


# --- fixtures ----------------------------------------------------------------------------------
def write_file(folder: Path, name: str, concept: str) -> Path:
    """A small valid sd1 hypernetwork (one cross-attention layer; no diffusers needed)."""
    from unhype.fileformat import save_hypernet
    from unhype.hypernet import HyperNetConfig, build_hypernet

    target = {"name": "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k",
              "path": "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k",
              "module_type": "attn2.to_k", "in_dim": 768, "out_dim": 32}
    net = build_hypernet(HyperNetConfig(variant="per_layer", targets=[target], embed_dim=768,
                                        rank=1, hidden=8))
    path = folder / f"{name}.safetensors"
    save_hypernet(path, net, "sd1", concepts=[{"target": concept}])
    return path


@pytest.fixture
def ui(monkeypatch, webui_dirs):
    """unhype_webui.ui imported afresh against the real gradio (another test may have imported
    it against the stand-in)."""
    import unhype_webui

    monkeypatch.setitem(sys.modules, "gradio", gr)
    monkeypatch.delitem(sys.modules, "unhype_webui.ui", raising=False)
    module = importlib.import_module("unhype_webui.ui")
    monkeypatch.setattr(unhype_webui, "ui", module)
    return module


@pytest.fixture
def script_class(ui):
    from modules import scripts

    classes = scripts.load_extension_scripts(str(ROOT), [str(ROOT / "scripts" / "unhype_a1111.py")])
    return classes[0]


class Page:
    """txt2img and img2img interfaces with the panel, the UnHype tab, and the page that renders
    them, with the host's paste and "Send to img2img" bindings (modules/ui.py create_ui)."""

    def __init__(self, script_class):
        from modules import script_callbacks

        self.panels, self.fields, self.paste_names = {}, {}, {}
        interfaces = []
        for tab in ("txt2img", "img2img"):
            with gr.Blocks(analytics_enabled=False) as interface:
                if tab == "txt2img":
                    self.prompt = gr.Textbox(label="Prompt")
                    self.paste = gr.Button("paste")
                script, controls, self.api_args = script_ui(script_class, tab == "img2img")
            self.panels[tab] = controls
            self.fields[tab] = list(script.infotext_fields)
            self.paste_names[tab] = list(script.paste_field_names)
            interfaces.append((interface, tab.capitalize(), tab))
        interfaces += script_callbacks.ui_tabs_callback()
        self.tab = interfaces[-1][0]
        with gr.Blocks(analytics_enabled=False) as self.demo:
            self.send = gr.Button("Send to img2img")
            fields = self.fields["txt2img"]
            # infotext_utils.connect_paste (toprow paste button) and connect_paste_params_buttons
            self.paste.click(fn=lambda text: paste_func(fields, self._pasted(text)),
                             inputs=[self.prompt], outputs=[c for c, _ in fields])
            names = self.paste_names["img2img"]
            self.send.click(fn=lambda *x: x,
                            inputs=[c for c, n in fields if n in names],
                            outputs=[c for c, n in self.fields["img2img"] if n in names])
            with gr.Tabs():
                for interface, label, ifid in interfaces:
                    with gr.TabItem(label, id=ifid):
                        interface.render()
        self.state = new_state(self.demo)

    @staticmethod
    def _pasted(text):
        from modules import script_callbacks

        params = parse_infotext(text)
        script_callbacks.infotext_pasted_callback(text, params)
        return params

    def button(self, value, blocks=None):
        found = [b for b in (blocks or self.tab).blocks.values()
                 if isinstance(b, gr.Button) and b.value == value]
        assert len(found) == 1, value
        return found[0]

    def fire(self, component, event, values):
        return fire(self.demo, component, event, values, self.state)


@pytest.fixture
def page(script_class, webui_dirs):
    return lambda: Page(script_class)


# --- the script panel ------------------------------------------------------------------------
def test_panel_components_and_api_args(page, webui_dirs):
    write_file(webui_dirs["unhype"], "erase_cat", "cat")
    write_file(webui_dirs["unhype"], "erase_dog", "dog")
    p = page()
    enabled, hypernet, strength, cond_only = p.panels["txt2img"]
    assert [type(c) for c in p.panels["txt2img"]] == [gr.Checkbox, gr.Dropdown, gr.Slider,
                                                      gr.Checkbox]
    assert [a["label"] for a in p.api_args] == PANEL_LABELS
    assert choices(hypernet) == ["erase_cat", "erase_dog"] and hypernet.value == "erase_cat"
    assert p.api_args[1]["choices"] == ["erase_cat", "erase_dog"]
    assert strength.minimum <= strength.value <= strength.maximum
    assert (enabled.value, cond_only.value) == (False, True)
    # every infotext field is one of this panel's components, under the names Send copies
    assert [c for c, _ in p.fields["txt2img"]] == p.panels["txt2img"]
    assert [n for _, n in p.fields["txt2img"]] == p.paste_names["txt2img"]


def test_panel_refresh_lists_new_files_and_keeps_the_choice(page, webui_dirs):
    write_file(webui_dirs["unhype"], "erase_cat", "cat")
    write_file(webui_dirs["unhype"], "erase_dog", "dog")
    p = page()
    hypernet = p.panels["txt2img"][1]
    write_file(webui_dirs["unhype"], "erase_zebra", "zebra")
    refresh = [b for b in p.demo.blocks.values() if isinstance(b, gr.Button) and b.value ==
               "\U0001f504"][0]
    (update,) = p.fire(refresh, "click", ["erase_dog"])
    assert update_value(update) == "erase_dog"
    assert update_choices(update) == ["erase_cat", "erase_dog", "erase_zebra"]
    info = p.fire(hypernet, "change", ["erase_zebra"])[0]
    assert "erases: zebra" in info


def test_panel_built_without_files_takes_a_pasted_file(page, webui_dirs):
    """First use: the web UI started before any file was in the folder. A pasted infotext
    (PNG Info, the paste button) of an image made with a file put there since must set the
    panel's file, not only tick Enable (then Generate stops: no hypernetwork selected). The
    host converts a pasted string to the type of the component's value at UI build time."""
    from unhype import infotext

    p = page()
    path = write_file(webui_dirs["unhype"], "erase_cat", "cat")
    fields = infotext.format_fields("erase_cat", infotext.short_hash(str(path)), 0.75)
    text = "a photo of a cat\n" + "\n".join(f"{k}: {v}" for k, v in fields.items())
    updates = p.fire(p.paste, "click", [text])
    enabled, name, strength, cond_only = [update_value(u) for u in updates]
    assert (enabled, name, strength) == (True, "erase_cat", 0.75)


def test_pasted_or_sent_file_is_listed_by_the_dropdown(page, webui_dirs):
    """A file pasted into a panel (or sent to img2img) that this panel's list does not hold yet
    (added since the page was built): gradio 4's dropdown shows a value missing from its
    choices as empty (js/dropdown/shared/Dropdown.svelte set_input_text) while generation uses
    it. The change the new value fires must list it."""
    write_file(webui_dirs["unhype"], "erase_cat", "cat")
    p = page()
    write_file(webui_dirs["unhype"], "erase_dog", "dog")
    txt, img = p.panels["txt2img"], p.panels["img2img"]
    sent = p.fire(p.send, "click", [True, "erase_dog", 1.25, False])
    assert [update_value(u) if isinstance(u, dict) else u for u in sent] == \
        [True, "erase_dog", 1.25, False]
    out = p.fire(img[1], "change", ["erase_dog"])
    assert "erases: dog" in out[0]
    assert [update_choices(u) for u in out[1:]] == [["erase_cat", "erase_dog"]]
    if MAJOR >= 4:  # what the session's dropdown lists from now on
        assert choices(img[1], p.state) == ["erase_cat", "erase_dog"]
    assert choices(txt[1], p.state) == ["erase_cat"]  # the other tab's list is its own


# --- the UnHype tab ------------------------------------------------------------------------
def table(payload):
    return payload["headers"], [row for row in payload["data"] if row]


def test_tab_file_table_keeps_its_headers_when_empty(page, webui_dirs, ui):
    """gradio 3.41's Dataframe cuts its headers to the first row's length: an empty table
    (empty folder, a refresh finding none) lost every column name."""
    from unhype_webui import tab_logic

    p = page()
    files_table = [b for b in p.tab.blocks.values() if isinstance(b, gr.Dataframe)][0]
    config = [c for c in p.demo.get_config_file()["components"] if c["id"] == files_table._id]
    assert table(config[0]["props"]["value"]) == (tab_logic.FILE_HEADERS, [])
    out = p.fire(p.button("Refresh list"), "click", [])
    assert table(out[0]) == (tab_logic.FILE_HEADERS, [])
    write_file(webui_dirs["unhype"], "erase_cat", "cat")
    out = p.fire(p.button("Refresh list"), "click", [])
    headers, rows = table(out[0])
    assert headers == tab_logic.FILE_HEADERS and [r[:3] for r in rows] == [
        ["erase_cat", "sd1", "cat"]]
    assert [update_choices(u) for u in out[1:]] == [["erase_cat"]] * 3


def test_tab_probe_and_bake_through_gradio(page, webui_dirs, monkeypatch):
    """Probe's table keeps its headers on an error as on a result; Bake writes the LoRA. The
    text encoder is a stand-in (no checkpoint here): this test is about the UI's plumbing."""
    import torch

    from unhype_webui import tab_logic

    write_file(webui_dirs["unhype"], "erase_cat", "cat")
    monkeypatch.setattr(tab_logic, "_embedder", lambda loaded, model: (
        lambda texts: torch.stack([torch.full((768,), float(len(t))) for t in texts])))
    p = page()
    probe, bake = p.button("Probe"), p.button("Bake")
    rows, status = p.fire(probe, "click", ["erase_cat", "a cat\na dog"])
    assert table(rows)[0] == tab_logic.PROBE_HEADERS and [r[0] for r in table(rows)[1]] == [
        "a cat", "a dog"]
    assert "of 2 prompt(s)" in status
    rows, status = p.fire(probe, "click", ["erase_cat", ""])
    assert table(rows) == (tab_logic.PROBE_HEADERS, []) and "write at least one" in status
    (status,) = p.fire(bake, "click", ["erase_cat", "a cat", 1.0, "baked", False])
    assert "saved" in status and (webui_dirs["lora"] / "baked.safetensors").exists()
    (status,) = p.fire(bake, "click", ["erase_cat", "a cat", 1.0, "baked", False])
    assert "exists" in status
    details = [b for b in p.tab.blocks.values() if isinstance(b, gr.Dropdown)][0]
    (md,) = p.fire(details, "change", ["erase_cat"])
    assert "sha256: " in md


# --- Settings --------------------------------------------------------------------------------
def test_settings_build_as_the_settings_page_builds_them(webui_dirs, ui):
    """ui_settings.create_setting_component: the option's component (or Textbox for a str
    default) with label, value and component_args; run_settings then requires each value the
    page sends back to have the default's type (options.py same_type: int and float alike)."""
    from modules import script_callbacks, scripts, shared

    scripts.load_extension_scripts(str(ROOT), [str(ROOT / "scripts" / "unhype_a1111.py")])
    script_callbacks.ui_settings_callback()
    keys = [k for k, info in shared.opts.data_labels.items() if k.startswith("unhype_")]
    assert keys == ["unhype_dir", "unhype_on_family_mismatch", "unhype_lora_dir",
                    "unhype_cache_files"]
    with gr.Blocks():
        for key in keys:
            info = shared.opts.data_labels[key]
            args = info.component_args() if callable(info.component_args) else \
                info.component_args
            comp = info.component or {str: gr.Textbox, int: gr.Number, bool: gr.Checkbox}[
                type(info.default)]
            with warnings.catch_warnings():
                warnings.simplefilter("error")  # gradio 4 warns of a value not in choices
                res = comp(label=info.label, value=info.default, elem_id=f"setting_{key}",
                           **(args or {}))
            sent = res.preprocess(res.value) if MAJOR >= 4 else res.preprocess(
                res.postprocess(res.value))
            same = {int: float}
            assert same.get(type(sent), type(sent)) == same.get(type(info.default),
                                                                 type(info.default)), key
            if isinstance(res, gr.Slider):
                assert res.minimum <= info.default <= res.maximum
