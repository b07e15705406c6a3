"""The pack as ComfyUI sees it: import under the folder name, Bake LoRA, Inspect, the UI surface."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from unhype.errors import UnHypeError

ROOT = Path(__file__).resolve().parents[2]

LOADER = """
import importlib.util, os, sys
sys.path.insert(0, {comfy!r})
import comfy.cli_args; comfy.cli_args.args.cpu = True
import folder_paths, nodes
folder_paths.models_dir = {models!r}
name = {name!r}
spec = importlib.util.spec_from_file_location(name, os.path.join({root!r}, "__init__.py"),
                                              submodule_search_locations=[{root!r}])
module = importlib.util.module_from_spec(spec)
sys.modules[name] = module
spec.loader.exec_module(module)
import unhype.hypernet, unhype.fileformat
print(sorted(module.NODE_CLASS_MAPPINGS), folder_paths.get_folder_paths("unhype"))
print("core:", unhype.hypernet.__file__)
"""


@pytest.mark.parametrize("name", ["unhype", "/x/custom_nodes/unhype"],
                         ids=["folder-name (2024 loader)", "path-name (current loader)"])
@pytest.mark.parametrize("other", [False, True], ids=["alone", "another_unhype_installed"])
def test_pack_loads_the_way_comfyui_loads_custom_nodes(name, other, tmp_path):
    """ComfyUI's two ways of importing a custom node; with another `unhype` (an older pip
    install) first on the path, the nodes still run the core shipped beside them."""
    from comfy_path import comfyui_root

    code = LOADER.format(comfy=str(comfyui_root()), models=str(tmp_path), name=name,
                         root=str(ROOT))
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    if other:
        stale = tmp_path / "site" / "unhype"
        stale.mkdir(parents=True)
        (stale / "__init__.py").write_text("raise ImportError('the other unhype')\n")
        env["PYTHONPATH"] = str(tmp_path / "site")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=str(tmp_path), env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert ("['UnHypeAlsoReadText', 'UnHypeApply', 'UnHypeBakeLoRA', 'UnHypeInspect', "
            "'UnHypeLoader', 'UnHypeTextEncode']") in out.stdout
    assert str(tmp_path / "unhype") in out.stdout
    assert f"core: {ROOT / 'unhype' / 'hypernet.py'}" in out.stdout


def test_root_init_is_inert_without_comfyui(tmp_path):
    code = ("import importlib.util, sys; spec = importlib.util.spec_from_file_location('pkg', "
            f"{str(ROOT / '__init__.py')!r}, submodule_search_locations=[{str(ROOT)!r}]); "
            "m = importlib.util.module_from_spec(spec); sys.modules['pkg'] = m; "
            "spec.loader.exec_module(m); import unhype; "
            "print(m.NODE_CLASS_MAPPINGS, 'nodes' in sys.modules, 'comfy' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=str(tmp_path), timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "{} False False"


def test_every_input_has_a_tooltip_and_nodes_sit_under_unhype(pack):
    for name, cls in pack.NODE_CLASS_MAPPINGS.items():
        assert cls.CATEGORY.startswith("UnHype")
        assert name in pack.NODE_DISPLAY_NAME_MAPPINGS
        spec = cls.INPUT_TYPES()
        for group in ("required", "optional"):
            for inp, (kind, *opts) in spec.get(group, {}).items():
                assert opts and opts[0].get("tooltip"), f"{name}.{inp} has no tooltip"
        assert len(cls.OUTPUT_TOOLTIPS) == len(cls.RETURN_TYPES)


def test_bake_writes_a_lora_comfys_loader_applies_like_the_per_row_path(
        pack, tiny_parts, loaded, comfy_dirs):
    import comfy.lora
    import comfy.model_management
    import comfy.utils

    clip, model = tiny_parts["clip"], tiny_parts["model"]
    with torch.no_grad():
        cond, pooled = clip.encode_from_tokens(clip.tokenize("a photo of a cat"),
                                               return_pooled=True)
    conditioning = [[cond, {"pooled_output": pooled}]]
    node = pack.nodes.definitions.UnHypeBakeLoRA()
    path = node.bake(loaded, conditioning, "baked cat", 1.0, False, "a photo of a cat")["result"][0]
    assert Path(path).parent == comfy_dirs["loras"] and Path(path).name == "baked_cat.safetensors"
    with pytest.raises(UnHypeError, match="exists"):
        node.bake(loaded, conditioning, "baked cat", 1.0, False)
    import folder_paths

    blocked = comfy_dirs["loras"].parent / "loras_file"
    blocked.write_bytes(b"")  # a file where the loras folder should be: a message
    saved = folder_paths.folder_names_and_paths["loras"]
    folder_paths.folder_names_and_paths["loras"] = ([str(blocked)], {".safetensors"})
    try:
        with pytest.raises(UnHypeError, match="loras folder .* is a file"):
            node.bake(loaded, conditioning, "other", 1.0, False)
    finally:
        folder_paths.folder_names_and_paths["loras"] = saved
    sd = comfy.utils.load_torch_file(path, safe_load=True)
    key_map = comfy.lora.model_lora_keys_unet(model.model, {})
    patches = comfy.lora.load_lora(sd, key_map)
    assert len(patches) == 32  # every LoRA key was understood by ComfyUI's own loader
    lora_model = model.clone()
    assert len(lora_model.add_patches(patches, 1.0)) == 32
    per_row = pack.nodes.definitions.UnHypeApply().apply(
        model, conditioning, loaded, 1.0, "auto")["result"][0]
    x, t = torch.randn(1, 4, 8, 8), torch.tensor([3.0])
    args = {"input": x, "timestep": t, "cond_or_uncond": [0],
            "c": {"c_crossattn": cond, "transformer_options": {}}}
    before = {k: v.clone() for k, v in model.model.state_dict().items()}
    with torch.no_grad():
        want = per_row.model_options["model_function_wrapper"](model.model.apply_model, args)
        comfy.model_management.load_models_gpu([lora_model])
        got = lora_model.model.apply_model(x, t, c_crossattn=cond)
        comfy.model_management.unload_all_models()
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    after = model.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_inspect_reports_metadata_and_firing(pack, tiny_parts, loaded):
    node = pack.nodes.definitions.UnHypeInspect()
    report = node.inspect(loaded)["result"][0]
    assert "family: sd1" in report and "32 target layers" in report
    assert "a photo of a cat" in report  # the erased concept from the metadata
    report = node.inspect(loaded, tiny_parts["clip"], "a photo of a cat\na red car")["result"][0]
    lines = report.splitlines()
    assert any(line.startswith("prompt | applied ||dW|| | fires") for line in lines)
    cat = next(line for line in lines if line.startswith("a photo of a cat |"))
    car = next(line for line in lines if line.startswith("a red car |"))
    # the concept's own prompt is exactly as strong as itself
    assert cat.split(" | ")[4] == "1.0"
    assert float(car.split(" | ")[1]) > 0
    assert "connect a CLIP" in node.inspect(loaded, None, "x")["result"][0]
    assert "gate floor: none" in report  # the fixture predates the gate reference


def test_inspect_names_the_gate_floor_and_saturation(pack, loaded, tmp_path):
    from unhype.fileformat import load_hypernet, save_with_training

    node = pack.nodes.definitions.UnHypeInspect()
    path = save_with_training(loaded, tmp_path / "sat.safetensors", gate_reference=2.0,
                              gate_floor=0.05, gate_saturate=True,
                              final={"delta_target": 2.0, "delta_retain": 0.4})
    report = node.inspect(load_hypernet(path))["result"][0]
    assert "gate floor: prompts whose update is under 5% of 2 (the concepts' median ||dW||) " \
        "get none, full from 10%; saturated" in report
    # the same summary as `unhype inspect`: retain share and its warning, the file's history
    assert "retained: unrelated (retain) prompts got 20.0% of the reference" in report
    assert "WARNING: that is above the 5% floor" in report
    assert "changed: " in report and "gate_saturate None -> True" in report


LONG = "masterpiece, best quality, " * 20 + "a photo of a cat"


def _gated_on_cat(loaded, clip, text_encode):
    """`loaded` with a ConceptGate on "a photo of a cat", half open between LONG's first-chunk
    embedding and its last window's (so the window that names the cat is the strongest)."""
    from dataclasses import replace

    from tests.helpers import ConceptGate

    (cond,) = text_encode.encode(clip, LONG)
    own = cond[0][1]["pooled_output"].float()[0]
    last = cond[0][1]["unhype_pooled_windows"][-1]
    with torch.no_grad():
        concept = clip.encode_from_tokens(clip.tokenize("a photo of a cat"),
                                          return_pooled=True)[1][0].float()
    cos = torch.nn.functional.cosine_similarity(torch.stack([own, last]), concept[None])
    gate = ConceptGate(loaded.hypernet, concept, at=float(cos.mean()),
                       sharpness=8.0 / float(cos[1] - cos[0]))
    return replace(loaded, hypernet=gate), cond


def test_bake_of_a_long_prompt_is_the_update_apply_gives_it(pack, tiny_parts, loaded,
                                                            comfy_dirs):
    """A prompt from UnHype Text Encode whose concept is named after 75 tokens: Bake LoRA
    writes the update Apply gives that row (its strongest window's), not the first chunk's."""
    from unhype.bake import lora_state_dict
    from unhype.comfy_apply import build_plan
    from unhype.hypernet import delta_weight

    defs = pack.nodes.definitions
    gated, cond = _gated_on_cat(loaded, tiny_parts["clip"], defs.UnHypeTextEncode())
    path = defs.UnHypeBakeLoRA().bake(gated, cond, "long cat", 1.0, True)["result"][0]
    from safetensors.torch import load_file

    baked = load_file(path)
    plan = build_plan(gated, cond, 1.0)
    want = lora_state_dict(plan.factors, 1.0)
    first = next(k for k in want if k.endswith("lora_up.weight"))
    down = first.replace("lora_up", "lora_down")
    got_delta = delta_weight(baked[down].T, baked[first])  # kohya: down [r, in], up [out, r]
    want_delta = delta_weight(want[down].T, want[first])
    torch.testing.assert_close(got_delta, want_delta, rtol=1e-5, atol=1e-6)
    # and that is not what the first chunk alone would give
    truncated = build_plan(gated, [[cond[0][0], {"pooled_output": cond[0][1]["pooled_output"]}]],
                           1.0)
    trunc = lora_state_dict(truncated.factors, 1.0)
    assert float(delta_weight(trunc[down].T, trunc[first]).norm()) < 0.2 * float(
        want_delta.norm())


def test_inspect_reports_the_update_apply_applies(pack, tiny_parts, loaded, tmp_path):
    """Inspect's LoRA magnitude is the norm of what Apply applies: with the file's gate floor
    (a prompt under it: 0), with saturation (raised to the concepts' strength) and for a long
    prompt (its strongest window)."""
    from unhype.comfy_apply import build_plan
    from unhype.fileformat import load_hypernet, save_with_training
    from unhype.hypernet import delta_norm

    defs = pack.nodes.definitions
    clip, encode = tiny_parts["clip"], defs.UnHypeTextEncode()

    def applied(file, text):
        return float(delta_norm(build_plan(file, encode.encode(clip, text)[0], 1.0).factors))

    def reported(file, texts):
        report = defs.UnHypeInspect().inspect(file, clip, "\n".join(texts))["result"][0]
        rows = {line.split(" | ")[0]: line.split(" | ") for line in report.splitlines()
                if " | " in line}
        return [float(rows[t][1]) for t in texts]

    with torch.no_grad():
        car = float(delta_norm(loaded.hypernet(defs._encode_pooled(clip, "a red car"))))
    floored = load_hypernet(save_with_training(loaded, tmp_path / "floor.safetensors",
                                               gate_reference=car / 0.02, gate_floor=0.03))
    saturated = load_hypernet(save_with_training(loaded, tmp_path / "sat.safetensors",
                                                 gate_reference=car * 5, gate_floor=0.03,
                                                 gate_saturate=True))
    gated, _ = _gated_on_cat(loaded, clip, encode)
    texts = ["a photo of a cat", "a red car"]
    for file, prompts in ((floored, texts), (saturated, texts), (gated, [LONG])):
        want = [applied(file, t) for t in prompts]
        assert reported(file, prompts) == pytest.approx(want, rel=1e-4, abs=1e-6), file.path
    # the share column is on the floor's scale: applied ||dW|| / the file's gate_reference
    report = defs.UnHypeInspect().inspect(saturated, clip, "a red car")["result"][0]
    row = next(line.split(" | ") for line in report.splitlines() if line.startswith("a red car |"))
    assert float(row[4]) == pytest.approx(applied(saturated, "a red car") / (car * 5), abs=1e-4)
    assert reported(floored, ["a red car"]) == [0.0]
    assert applied(saturated, "a red car") > 2 * car  # raised: the raw network's would be car


def test_bake_shows_what_its_prompt_fires_and_warns_when_weak(pack, tiny_parts, loaded,
                                                              comfy_dirs, tmp_path):
    """Bake LoRA probes the row it bakes: with a CLIP it names the concept the prompt fires
    (in the note and the LoRA's metadata); a prompt at 0.3 of the file's reference gets the
    weak note, with or without a CLIP (the old node noted only an exactly zero update)."""
    from safetensors import safe_open

    from unhype.fileformat import load_hypernet, save_with_training
    from unhype.hypernet import delta_norm

    clip = tiny_parts["clip"]
    with torch.no_grad():
        cond, pooled = clip.encode_from_tokens(clip.tokenize("a photo of a cat"),
                                               return_pooled=True)
        norm = float(delta_norm(loaded.hypernet(pooled.float()))[0])
    conditioning = [[cond, {"pooled_output": pooled}]]
    node = pack.nodes.definitions.UnHypeBakeLoRA()
    out = node.bake(loaded, conditioning, "cat_fires", 1.0, True, "a photo of a cat",
                    clip=clip)
    (shown,) = out["ui"]["text"]
    assert "fires a photo of a cat; nearest concept a photo of a cat at cosine 1.00; " \
           "1.00 of a photo of a cat's reference" in shown and "weak" not in shown
    with safe_open(out["result"][0], "pt") as fh:
        assert "fires a photo of a cat" in fh.metadata()["modelspec.description"]
    weak = load_hypernet(save_with_training(loaded, tmp_path / "weak.safetensors",
                                            gate_reference=norm / 0.3, gate_floor=0.03))
    (shown,) = node.bake(weak, conditioning, "cat_weak", 1.0, True, "a photo of a cat",
                         clip=clip)["ui"]["text"]
    assert "this LoRA is weak for this prompt (fires nothing; nearest concept a photo of a " \
           "cat at cosine 1.00; 0.30 of a photo of a cat's reference, under the firing " \
           "threshold 0.5)" in shown
    (shown,) = node.bake(weak, conditioning, "cat_weak", 1.0, True)["ui"]["text"]
    assert "weak for this prompt (concepts not measured (no text encoder); 0.30 of the " \
           "reference" in shown
