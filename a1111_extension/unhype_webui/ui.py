"""Gradio UI: the script panel and the UnHype tab (files, probe, bake LoRA).

Imported only when the host builds its UI (gradio 3.41 in A1111 1.10, gradio 4 in Forge; only
components and ``gr.update`` common to both are used).
"""

from __future__ import annotations

import html
import warnings

import gradio as gr

from unhype.errors import UnHypeError

from unhype_webui import files, host, runner, tab_logic


def _tool_button(value):
    try:
        from modules.ui_components import ToolButton

        return ToolButton(value=value)
    except ImportError:
        return gr.Button(value=value)


def _names():
    return list(files.list_files())


def _file_dropdown(names, **kwargs):
    """A file dropdown whose value is a text also when the folder is empty: the host converts a
    pasted infotext value to the type of the value the component was built with
    (infotext_utils.connect_paste), and ``type(None)(name)`` fails, so a panel built before any
    file existed never took a pasted file."""
    with warnings.catch_warnings():  # gradio 4: "" is not among the (no) choices
        warnings.filterwarnings("ignore", message="The value passed into gr.Dropdown")
        return gr.Dropdown(choices=names, value=names[0] if names else "", **kwargs)


def _table(rows, headers):
    """A Dataframe value that keeps its column names when it has no rows: gradio 3.41 cuts the
    headers to the first row's length, so an empty list showed a table without any."""
    return rows if rows else {"headers": list(headers), "data": [[]]}


def describe_md(name):
    if not name:
        return ""
    try:
        _, path = files.resolve(name)
        d = files.describe(path)
    except UnHypeError as exc:
        return f"**{html.escape(str(exc))}**"
    concepts = ", ".join(d["concepts"]) or "?"
    return (f"{d['family']} · rank {d['rank']} · {d['targets']} layers · erases: "
            f"{html.escape(concepts)}")


def panel(script, is_img2img):
    names = _names()
    with gr.Accordion("UnHype concept erasure", open=False,
                      elem_id=script.elem_id("unhype_accordion")):
        with gr.Row():
            enabled = gr.Checkbox(False, label="Enable", elem_id=script.elem_id("unhype_enabled"))
            cond_only = gr.Checkbox(True, label="Apply to conditional branch only (paper)",
                                    elem_id=script.elem_id("unhype_cond_only"))
        with gr.Row():
            hypernet = _file_dropdown(names, label="Hypernetwork",
                                      elem_id=script.elem_id("unhype_file"))
            refresh = _tool_button("\U0001f504")
            strength = gr.Slider(-2.0, 2.0, value=1.0, step=0.05, label="Strength",
                                 elem_id=script.elem_id("unhype_strength"))
        info = gr.Markdown(describe_md(names[0]) if names else
                           f"No hypernetworks in {html.escape(host.unhype_dir())}")

    def do_refresh(current):
        choices = _names()
        return gr.update(choices=choices, value=current if current in choices else
                         (choices[0] if choices else ""))

    def on_change(name):
        # a pasted or sent file may be newer than this dropdown's list, and gradio 4 shows a
        # value missing from the choices as empty while generation uses it
        return describe_md(name), gr.update(choices=_names())

    refresh.click(fn=do_refresh, inputs=[hypernet], outputs=[hypernet])
    hypernet.change(fn=on_change, inputs=[hypernet], outputs=[info, hypernet])

    # string names (runner.PASTE_FIELDS): what "Send to img2img" copies and what a pasted
    # infotext sets, through runner.infotext_pasted
    components = {"enabled": enabled, "name": hypernet, "strength": strength,
                  "cond_only": cond_only}
    script.infotext_fields = [(components[k], runner.PASTE_FIELDS[k]) for k in components]
    script.paste_field_names = [runner.PASTE_FIELDS[k] for k in components]
    return [enabled, hypernet, strength, cond_only]


def _queued(fn):
    """`fn` run under the web UI's queue lock, as generations run (call_queue.wrap_queued_call):
    Probe and Bake use the model's text encoder, which a generation must not share with them."""
    try:
        from modules.call_queue import wrap_queued_call
    except ImportError:
        return fn
    return wrap_queued_call(fn)


def _probe(name, prompts_text):
    rows, status = tab_logic.probe_ui(name, prompts_text)
    return _table(rows, tab_logic.PROBE_HEADERS), status


def tab():
    with gr.Blocks(analytics_enabled=False) as block:
        gr.Markdown(f"Hypernetworks in `{html.escape(host.unhype_dir())}` "
                    "(Settings > UnHype to change)")
        with gr.Row():
            refresh = gr.Button("Refresh list")
        table = gr.Dataframe(headers=tab_logic.FILE_HEADERS, interactive=False, wrap=True,
                             value=_table(tab_logic.file_rows(), tab_logic.FILE_HEADERS))
        names = _names()
        with gr.Tab("Details"):
            d_file = gr.Dropdown(choices=names, value=names[0] if names else None,
                                 label="Hypernetwork")
            d_info = gr.Markdown(tab_logic.details_md(names[0]) if names else "")
            d_file.change(fn=tab_logic.details_md, inputs=[d_file], outputs=[d_info])
        with gr.Tab("Probe"):
            p_file = gr.Dropdown(choices=names, value=names[0] if names else None,
                                 label="Hypernetwork")
            p_prompts = gr.Textbox(lines=4, label="Prompts (one per line)")
            p_button = gr.Button("Probe", variant="primary")
            p_table = gr.Dataframe(headers=tab_logic.PROBE_HEADERS, interactive=False)
            p_status = gr.Markdown("")
            p_button.click(fn=_queued(_probe), inputs=[p_file, p_prompts],
                           outputs=[p_table, p_status])
        with gr.Tab("Bake LoRA"):
            b_file = gr.Dropdown(choices=names, value=names[0] if names else None,
                                 label="Hypernetwork")
            b_prompt = gr.Textbox(lines=2, label="Prompt the LoRA is generated for")
            b_strength = gr.Slider(-2.0, 2.0, value=1.0, step=0.05, label="Strength")
            b_name = gr.Textbox(label="Output name (in the Lora folder)", value="")
            b_overwrite = gr.Checkbox(False, label="Replace an existing file of that name")
            b_button = gr.Button("Bake", variant="primary")
            b_status = gr.Markdown("")
            b_button.click(fn=_queued(tab_logic.bake_ui),
                           inputs=[b_file, b_prompt, b_strength, b_name, b_overwrite],
                           outputs=[b_status])

        def refresh_all():
            choices = _names()
            up = gr.update(choices=choices)
            return _table(tab_logic.file_rows(), tab_logic.FILE_HEADERS), up, up, up

        refresh.click(fn=refresh_all, outputs=[table, d_file, p_file, b_file])
    return [(block, "UnHype", "unhype")]
