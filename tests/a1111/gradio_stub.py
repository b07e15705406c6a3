"""A stand-in `gradio` module with the components the extension's UI builds, for the test venv
and CI: the web UIs' gradio pins do not fit the test venv's packages (gradio 3.41.2 requires
numpy 1, the venv has numpy 2; gradio 4.40.0 imports ``huggingface_hub.HfFolder``, gone from
the huggingface_hub 1.x that transformers 5 and diffusers 0.42 require). Components record
their arguments and the callbacks bound to them, so a test can call what a click would.
test_real_gradio.py builds the same UI with each real gradio, in side venvs (DEVELOPERS.md
"Real gradio")."""

import types


class Component:
    def __init__(self, *args, **kwargs):
        self.value = kwargs.get("value", args[0] if args else None)
        self.label, self.kwargs, self.bound = kwargs.get("label"), kwargs, []

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def click(self, fn=None, inputs=None, outputs=None, **kwargs):
        self.bound.append((fn, inputs, outputs))

    change = click


def module() -> types.ModuleType:
    gradio = types.ModuleType("gradio")
    for name in ("Accordion", "Row", "Checkbox", "Dropdown", "Slider", "Markdown", "Button",
                 "Blocks", "Tab", "Textbox", "Dataframe"):
        setattr(gradio, name, type(name, (Component,), {}))
    gradio.update = lambda **kw: kw
    return gradio
