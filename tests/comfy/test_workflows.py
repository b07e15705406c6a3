"""The shipped workflows: well-formed (UI and API format agree, every type and link checks out)
and runnable through ComfyUI's own validator and executor on the tiny model."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
WORKFLOWS = sorted(p for p in (ROOT / "workflows").glob("*_api.json")
                   if "flux" not in p.name)  # FLUX: tests/comfy/test_flux.py
FRONTEND_ONLY = {"Note", "MarkdownNote", "PrimitiveNode", "Reroute"}
WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN"}


@pytest.fixture(scope="module")
def classes(pack):
    import nodes

    # what ComfyUI's load_custom_node does with a pack's mappings
    nodes.NODE_CLASS_MAPPINGS.update(pack.NODE_CLASS_MAPPINGS)
    nodes.NODE_DISPLAY_NAME_MAPPINGS.update(pack.NODE_DISPLAY_NAME_MAPPINGS)
    return nodes.NODE_CLASS_MAPPINGS


def input_specs(cls) -> dict:
    spec = cls.INPUT_TYPES()
    return {**spec.get("required", {}), **spec.get("optional", {})}


def is_widget(spec) -> bool:
    kind = spec[0]
    return isinstance(kind, (list, tuple)) or kind in WIDGET_TYPES


def ui_to_api(ui: dict, classes) -> dict:
    """Convert a UI-format workflow to API format, checking every link's types on the way."""
    links = {link[0]: link for link in ui["links"]}
    by_id = {n["id"]: n for n in ui["nodes"]}
    api = {}
    for node in ui["nodes"]:
        if node["type"] in FRONTEND_ONLY:
            continue
        assert node["type"] in classes, f"unknown node type {node['type']}"
        cls = classes[node["type"]]
        specs = input_specs(cls)
        inputs, linked = {}, set()
        for slot, inp in enumerate(node.get("inputs", [])):
            if inp.get("link") is None:
                continue
            link_id, src, src_slot, dst, dst_slot, kind = links[inp["link"]]
            assert (dst, dst_slot) == (node["id"], slot)
            src_cls = classes[by_id[src]["type"]]
            assert src_cls.RETURN_TYPES[src_slot] == kind == specs[inp["name"]][0] == inp["type"]
            assert by_id[src]["outputs"][src_slot]["type"] == kind
            assert link_id in by_id[src]["outputs"][src_slot]["links"]
            inputs[inp["name"]] = [str(src), src_slot]
            linked.add(inp["name"])
        values = list(node.get("widgets_values", []))
        for name, spec in specs.items():
            if name in linked or not is_widget(spec):
                continue
            assert values, f"{node['type']}: no widget value for {name}"
            inputs[name] = values.pop(0)
            if name in ("seed", "noise_seed"):
                assert values.pop(0) in ("fixed", "increment", "decrement", "randomize")
        assert not values, f"{node['type']}: extra widget values {values}"
        api[str(node["id"])] = {"class_type": node["type"], "inputs": inputs}
    return api


@pytest.mark.parametrize("api_path", WORKFLOWS, ids=lambda p: p.stem)
def test_ui_and_api_formats_agree_and_type_check(classes, api_path):
    ui_path = api_path.with_name(api_path.name.replace("_api.json", ".json"))
    ui = json.loads(ui_path.read_text())
    api = json.loads(api_path.read_text())
    converted = ui_to_api(ui, classes)
    assert converted == {k: {"class_type": v["class_type"], "inputs": v["inputs"]}
                         for k, v in api.items()}
    types = {n["type"] for n in ui["nodes"]}
    assert {"UnHypeLoader", "UnHypeApply", "KSampler", "Note"} <= types
    # the template-browser copy is the same workflow
    assert json.loads((ROOT / "example_workflows" / ui_path.name).read_text()) == ui
    # the sampler's positive comes out of UnHype Apply, the negative does not
    sampler = next(v for v in api.values() if v["class_type"] == "KSampler")
    assert api[sampler["inputs"]["positive"][0]]["class_type"] == "UnHypeApply"
    assert api[sampler["inputs"]["model"][0]]["class_type"] == "UnHypeApply"
    assert api[sampler["inputs"]["negative"][0]]["class_type"] == "CLIPTextEncode"
    # the positive is encoded with the node that keeps a long prompt's windows
    apply_node = api[sampler["inputs"]["positive"][0]]
    assert api[apply_node["inputs"]["conditioning"][0]]["class_type"] == "UnHypeTextEncode"


class StubServer:
    """What PromptExecutor needs of ComfyUI's PromptServer."""

    client_id = None
    last_node_id = None
    last_prompt_id = None

    def __init__(self):
        self.messages = []

    def send_sync(self, event, data, sid=None):
        self.messages.append((event, data))


def validate(prompt):
    import asyncio
    import inspect

    import execution

    if inspect.iscoroutinefunction(execution.validate_prompt):  # current ComfyUI
        return asyncio.run(execution.validate_prompt("test", prompt, None))
    return execution.validate_prompt(prompt)


LONG_PROMPT = "masterpiece, best quality, ultra detailed, " * 15 + "a photo of a cat on a sofa"


@pytest.mark.parametrize("long_prompt", [False, True], ids=["own_prompt", "long_prompt"])
@pytest.mark.parametrize("api_path", WORKFLOWS, ids=lambda p: p.stem)
def test_workflow_runs_in_comfys_executor(pack, classes, api_path, long_prompt, tiny_parts,
                                          hyper_file, comfy_dirs, monkeypatch):
    import execution
    import nodes

    from unhype import comfy_apply
    from unhype.prompt_windows import prompt_windows

    prompt = json.loads(api_path.read_text())
    if long_prompt:
        next(n for n in prompt.values()
             if n["class_type"] == "UnHypeTextEncode")["inputs"]["text"] = LONG_PROMPT
    for node in prompt.values():  # shrink to the tiny model's scale
        if node["class_type"] == "EmptyLatentImage":
            node["inputs"].update(width=64, height=64)
        if node["class_type"] == "KSampler":
            node["inputs"].update(steps=2)
        if node["class_type"] == "CheckpointLoaderSimple":
            (comfy_dirs["checkpoints"] / node["inputs"]["ckpt_name"]).write_bytes(b"")
        if node["class_type"] == "UnHypeLoader":
            shutil.copy(hyper_file, comfy_dirs["unhype"] / node["inputs"]["hypernetwork"])
    # the checkpoint loader hands out the tiny model instead of reading the (empty) file
    monkeypatch.setattr(nodes.CheckpointLoaderSimple, "load_checkpoint",
                        lambda self, ckpt_name, *a, **k: (tiny_parts["model"], tiny_parts["clip"],
                                                          tiny_parts["vae"]))
    calls = []
    original = comfy_apply.UnHypeWrapper.__call__

    def counting(self, apply_model, args):
        calls.append(list(args["cond_or_uncond"]))
        return original(self, apply_model, args)

    monkeypatch.setattr(comfy_apply.UnHypeWrapper, "__call__", counting)
    windows_seen = []
    build_plan = pack.nodes.definitions.build_plan

    def spying(unhype, conditioning, *a, **k):
        windows_seen.append([e[1].get(comfy_apply.WINDOWS_KEY) for e in conditioning])
        return build_plan(unhype, conditioning, *a, **k)

    monkeypatch.setattr(pack.nodes.definitions, "build_plan", spying)
    valid = validate(prompt)
    assert valid[0], valid[1:]
    executor = execution.PromptExecutor(StubServer())
    before = {k: v.clone() for k, v in tiny_parts["model"].model.state_dict().items()}
    executor.execute(prompt, "test-" + api_path.stem, {}, valid[2])
    errors = [m for m in executor.status_messages if m[0] == "execution_error"]
    assert executor.success, errors
    assert len(calls) == 2 and all(sorted(c) == [0, 1] for c in calls)  # 2 steps, batched
    # Apply got the positive's window embeddings through the executor (a long prompt only)
    (seen,) = windows_seen
    if long_prompt:
        assert seen[0].shape[0] == len(prompt_windows(LONG_PROMPT)) >= 3
    else:
        assert seen == [None]
    images = list(comfy_dirs["output"].glob("UnHype_*.png"))
    assert images
    after = tiny_parts["model"].model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
