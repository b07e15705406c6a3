"""A stand-in `gradio` module with the components the extension's UI builds (gradio cannot be
installed beside the test stack): components record their arguments and the callbacks bound to
them, so a test can call what a click would."""

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
