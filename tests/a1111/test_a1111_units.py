"""Host-agnostic pieces the extension stands on: tags, plain text, infotext fields, row
matching by conditioning, family detection, probe."""

import sys

import pytest
import torch

from unhype import infotext
from unhype.errors import UnHypeError
from unhype.model_check import detect_family, family_problem
from unhype.probe import gram, probe
from unhype.prompt_tags import (Tag, find_tags, has_break, parse_tag_items, plain_text, split_and,
                                strip_tags)
from unhype.row_match import CondBank


# --- tags ------------------------------------------------------------------------------
def test_tags_found_with_and_without_strength():
    prompt = "a <unhype:nudity v1:0.5> photo <UNHYPE:sub/dir.x> of <lora:other:1> a cat"
    assert find_tags(prompt) == [Tag("nudity v1", 0.5), Tag("sub/dir.x", 1.0)]
    assert find_tags("<unhype:a:>", default=0.7) == [Tag("a", 0.7)]
    assert find_tags("<unhype:a:-1.5e0>") == [Tag("a", -1.5)]
    assert strip_tags(prompt) == "a  photo  of <lora:other:1> a cat"
    assert strip_tags(prompt, all_networks=True) == "a  photo  of  a cat"


@pytest.mark.parametrize("items, message", [
    (["a", "strong"], "not a number"), (["a", "nan"], "finite"), ([""], "without a"),
    (["a", "1", "2"], "3 fields"),
    (["a", "10000"], r"outside \[-100, 100\]")])  # fp16 activations became NaN
def test_bad_tags_name_the_problem(items, message):
    with pytest.raises(UnHypeError, match=message):
        parse_tag_items(items)


def test_plain_text_drops_emphasis_break_and_tags():
    assert plain_text("a (red:1.3) ((car)), [blue] sky BREAK night <lora:x:1>") == \
        "a red car, blue sky night"
    assert plain_text(r"a \(literal\) bracket") == "a (literal) bracket"


def test_has_break_finds_the_keyword_only():
    assert has_break("score_9 BREAK a cat") and has_break("a cat\nBREAK\nnight")
    assert not has_break("breakfast, a break, BREAKING news, <lora:BREAK:1> a cat")


def test_split_and_weights_like_a1111():
    assert split_and("a cat :1.2 AND a dog") == [("a cat", 1.2), ("a dog", 1.0)]
    assert split_and("ANDROID robot") == [("ANDROID robot", 1.0)]


# --- infotext --------------------------------------------------------------------------
def test_infotext_fields_and_parse(tmp_path):
    f = tmp_path / "h.safetensors"
    f.write_bytes(b"x" * 100)
    h = infotext.short_hash(f)
    assert len(h) == 12
    fields = infotext.format_fields("h", h, 0.75, cond_only=False)
    assert fields == {"UnHype": f"h [{h}]", "UnHype strength": "0.75", "UnHype cond only": "False"}
    entry = infotext.parse_fields(fields)
    assert (entry.name, entry.hash, entry.strength, entry.cond_only) == ("h", h, 0.75, False)
    assert infotext.parse_fields({"Steps": "20"}) is None
    for bad, why in (("lots", "must be a number"), ("150", "outside"), ("nan", "finite")):
        entry = infotext.parse_fields({"UnHype": "h", "UnHype strength": bad})
        assert entry.name == "h" and entry.strength is None and why in entry.problem
    # a hash alone finds the file; a bare name two files share finds neither
    assert infotext.parse_fields({"UnHype": f"[{h}]"}).hash == h
    assert infotext.find_file({"a/h": str(f), "b/h": str(f)}, "h", None) is None
    renamed = tmp_path / "renamed.safetensors"
    f.rename(renamed)
    assert infotext.find_file({"renamed": str(renamed)}, "h", h) == "renamed"
    assert infotext.find_file({"renamed": str(renamed)}, "h", None) is None
    assert infotext.parse_hashes(infotext.format_hashes([("a", "12"), ("b:c", "34")])) == \
        {"a": "12", "bc": "34"}


def test_loaded_files_follow_the_cache_setting(webui_dirs, tmp_path, monkeypatch):
    """unhype_cache_files: how many files stay loaded (the shared unhype.file_cache)."""
    from modules import shared
    from unhype.file_cache import FileCache
    from unhype_webui import files

    monkeypatch.setattr(files, "_loaded", FileCache(lambda path: object()))
    paths = [tmp_path / f"{name}.safetensors" for name in "abc"]
    for path in paths:
        path.write_bytes(b"x")
    first = [files.load(str(p)) for p in paths]  # the default keeps 2: a goes
    assert files.load(str(paths[2])) is first[2] and files.load(str(paths[1])) is first[1]
    assert files.load(str(paths[0])) is not first[0]
    shared.opts.unhype_cache_files = 3
    kept = [files.load(str(p)) for p in paths]
    assert [files.load(str(p)) for p in paths] == kept


# --- rows by conditioning --------------------------------------------------------------
def test_cond_bank_matches_rows_by_content_despite_padding_and_fp16():
    torch.manual_seed(0)
    a, b, neg = torch.randn(77, 8), torch.randn(154, 8), torch.randn(77, 8)
    bank = CondBank()
    bank.add(a, 0)
    bank.add(b[None], 1)
    padded_a = torch.cat([a, a])  # Forge/ComfyUI repeat shorter rows to the longest
    ctx = torch.stack([padded_a, b, torch.cat([neg, neg])]).half().float()
    assert bank.match(ctx) == [0, 1, -1]
    assert bank.rows(ctx, item_rows=[0, 1], cond_only=False) == [0, 1, 0]
    near = a + 0.05 * a.norm() / a.numel() ** 0.5  # 5% off: another prompt, not a match
    assert bank.match(near[None]) == [-1]
    with pytest.raises(UnHypeError, match="batch, tokens, dim"):
        bank.match(a)


def test_cond_bank_tells_a_prompt_from_a_longer_one_that_begins_with_it():
    # "a dog" is [77] and "a dog BREAK a cat" is [154] whose first chunk is "a dog"'s: the
    # longer prompt's rows also match "a dog" over 77 tokens; each must get its own index,
    # whatever order the texts were registered in
    torch.manual_seed(0)
    dog, cat = torch.randn(77, 8), torch.randn(77, 8)
    dog_cat = torch.cat([dog, cat])
    padded_dog = torch.cat([dog, dog[-1:].repeat(77, 1)])  # A1111's stack_conds padding
    for order in ([(dog, 0), (dog_cat, 1)], [(dog_cat, 1), (dog, 0)]):
        bank = CondBank()
        for cond, index in order:
            bank.add(cond, index)
        assert bank.match(torch.stack([padded_dog, dog_cat])) == [0, 1]
        assert bank.match(torch.stack([dog_cat, padded_dog])) == [1, 0]
        assert bank.match(dog[None]) == [0]  # a call of its own, not padded


# --- family ----------------------------------------------------------------------------
def test_family_detection_from_context_width():
    from torch import nn

    def unet(width):
        m = nn.Module()
        m.add_module("input_blocks", nn.ModuleDict({"attn2": nn.ModuleDict(
            {"to_k": nn.Linear(width, 8, bias=False)})}))
        return m

    assert [detect_family(unet(w)) for w in (768, 1024, 2048, 1280)] == \
        ["sd1", "sd2", "sdxl", "unknown"]
    assert family_problem("sd1", "sd1") is None
    msg = family_problem("sdxl", "sd1", "x.safetensors")
    assert "is for sdxl" in msg and "model is sd1" in msg


def test_checkpoint_family_from_the_safetensors_header_alone(tmp_path):
    """Single-file checkpoints in A1111's layout (ldm UNet under model.diffusion_model, as the
    tiny ldm UNets save), a BFL FLUX file with and without that prefix; anything else is None,
    and a .ckpt is never opened."""
    from safetensors.torch import save_file

    import fake_models
    from unhype.model_check import checkpoint_family

    def checkpoint(name, state, prefix="model.diffusion_model."):
        path = tmp_path / name
        save_file({prefix + k: v.contiguous() for k, v in state.items()}, str(path))
        return path

    ldm = {"sd1": (768, None), "sdxl": (2048, 2816), "unknown": (1280, 2560)}  # last: refiner
    for family, (context, adm) in ldm.items():
        unet = fake_models.tiny_ldm_unet(context_dim=context, adm=adm)
        assert checkpoint_family(checkpoint(f"{family}.safetensors", unet.state_dict())) == family
    sd2 = {"input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": torch.zeros(8, 1024)}
    assert checkpoint_family(checkpoint("sd2.SAFETENSORS", sd2)) == "sd2"
    qkv = {"double_blocks.0.img_attn.qkv.weight": torch.zeros(24, 8),
           "time_in.in_layer.weight": torch.zeros(8, 256)}
    flux = dict(qkv, **{"vector_in.in_layer.weight": torch.zeros(8, 768)})
    assert checkpoint_family(checkpoint("flux.safetensors", flux, prefix="")) == "flux"
    assert checkpoint_family(checkpoint("flux_ldm.safetensors", flux)) == "flux"
    # FLUX's blocks without its pooled CLIP-L input: Chroma, FLUX.2 (refused before the switch)
    chroma = dict(qkv, **{"distilled_guidance_layer.in_proj.weight": torch.zeros(8, 64)})
    flux2 = dict(qkv, **{"double_stream_modulation_img.lin.weight": torch.zeros(48, 8)})
    for name, state in (("chroma", chroma), ("flux2", flux2), ("blocks", qkv)):
        assert checkpoint_family(checkpoint(f"{name}.safetensors", state)) == "unknown", name
    vae = {"first_stage_model.decoder.conv_in.weight": torch.zeros(4, 4, 3, 3)}
    assert checkpoint_family(checkpoint("vae.safetensors", vae, prefix="")) is None
    (tmp_path / "broken.safetensors").write_bytes(b"\xff" * 64)
    assert checkpoint_family(tmp_path / "broken.safetensors") is None
    (tmp_path / "old.ckpt").write_bytes(b"not opened")
    assert checkpoint_family(tmp_path / "old.ckpt") is None
    assert checkpoint_family(tmp_path / "missing.safetensors") is None


# --- probe -----------------------------------------------------------------------------
def test_probe_scores_concept_prompts_and_gram_matches_dense():
    from tests.helpers import hypernet_for, tiny_sd_unet

    net = hypernet_for(tiny_sd_unet(), rank=2, perturb=0.05)
    table = {"cat": torch.randn(768), "kitten": None, "car": torch.randn(768)}
    table["kitten"] = table["cat"] + 0.01 * torch.randn(768)
    embed = lambda texts: torch.stack([table[t] for t in texts])  # noqa: E731
    res = probe(net, embed, ["cat", "kitten", "car"], ["cat"])
    assert res[0].concepts[0].relative == pytest.approx(1.0)
    assert res[0].concepts[0].cosine == pytest.approx(1.0, abs=1e-6)
    assert res[1].fired == ["cat"]
    with torch.no_grad():
        f = net(embed(["cat", "car"]))
    g = gram(f, f)
    dense = sum((b[0] @ a[0].T * (b[1] @ a[1].T)).sum() for a, b in f.values())
    assert float(g[0, 1]) == pytest.approx(float(dense), rel=1e-5)
    with pytest.raises(UnHypeError, match="no prompt"):
        probe(net, embed, [], ["cat"])


def test_probe_reads_long_prompts_through_windows_when_asked():
    """An encoder that sees 75 one-token words at most (as CLIP sees 75 tokens) and a network
    that fires on "cat": the prompt naming the cat at its 81st word fires only through its
    windows."""
    def embed(texts):
        return torch.tensor([[1.0 if "cat" in t.split()[:75] else 0.01, 1.0] for t in texts])

    def net(emb):
        return {"layer": (emb[:, :1, None].expand(-1, 3, 1).clone(), torch.ones(len(emb), 2, 1))}

    long = " ".join(["tree"] * 80 + ["cat", "photo"])
    assert not probe(net, embed, [long], ["cat"])[0].fired
    result = probe(net, embed, [long, "a car"], ["cat"], windows=True)
    assert [r.fired for r in result] == [["cat"], []]
    assert result[0].concepts[0].relative == pytest.approx(1.0)


def test_tab_probe_reads_each_text_generation_embeds(tmp_path, monkeypatch):
    """Prompt editing and AND: the tab probes "a photo of a dog" and "a photo of a cat", and
    each AND part, as generation embeds them (not "a photo of a dog:cat:10" nor one text)."""
    from dataclasses import replace

    from tests.helpers import hypernet_for, tiny_sd_unet
    from unhype.fileformat import load_hypernet, save_hypernet
    from unhype_webui import tab_logic

    path = tmp_path / "erase_cat.safetensors"
    save_hypernet(path, hypernet_for(tiny_sd_unet(), variant="shared", rank=1), "sd1",
                  concepts=[{"target": "cat"}])

    def net(emb):  # an update for texts that name the cat only
        return {"layer": (emb[:, :1, None].expand(-1, 3, 1).clone(), torch.ones(len(emb), 2, 1))}

    embedded = []

    def embed(texts):
        embedded.extend(texts)
        return torch.tensor([[1.0 if "cat" in t.split() else 0.0, 1.0] for t in texts])

    loaded = replace(load_hypernet(path), hypernet=net)
    monkeypatch.setattr(tab_logic.files, "resolve", lambda name: (name, path))
    monkeypatch.setattr(tab_logic.files, "load", lambda p: loaded)
    monkeypatch.setattr(tab_logic, "_embedder", lambda loaded, model: embed)
    table, status = tab_logic.probe_ui("erase_cat", "a photo of a [dog:cat:10]\n"
                                       "a dog AND a cat\na dog", sd_model=object())
    assert [row[0] for row in table] == ["a photo of a dog", "a photo of a cat", "a dog", "a cat"]
    assert [row[2] for row in table] == ["-", "cat", "-", "cat"]
    assert "2 of 4 prompt(s) switch it on" in status
    assert not any(":" in t or "AND" in t for t in embedded)


# --- SD2 (A1111: ldm FrozenOpenCLIPEmbedder.model = open_clip CLIP) --------------------
def test_open_clip_pooled_is_what_the_trainer_reads(tmp_path):
    """A1111's SD2 embedding equals unhype's embedder's on the same weights (the penultimate
    layer's EOS row after ln_final: diffusers' SD2 text encoder drops the last layer); running
    every layer, as it did, gave another vector (cosine ~0.7 on random weights)."""
    open_clip = pytest.importorskip("open_clip")

    import fake_models
    from unhype_webui import host

    model = fake_models.tiny_open_clip(layers=3, width=1024, heads=16)  # SD2's 1024-d embedding
    texts = ["a photo of a cat", "a red car", ""]
    with torch.no_grad():
        want = fake_models.sd2_trained_embedding(model, texts, tmp_path)
        got = host._open_clip_pooled(model, texts)
        every_layer = model.encode_text(open_clip.tokenize(texts))  # projection: identity
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert float((every_layer - want).abs().max()) > 1e-2


@pytest.fixture
def ui_module(monkeypatch):
    """unhype_webui.ui imported afresh against the gradio stand-in (import_module: `from
    unhype_webui import ui` would return a copy another test imported against real gradio)."""
    import importlib

    import gradio_stub
    import unhype_webui

    monkeypatch.setitem(sys.modules, "gradio", gradio_stub.module())
    monkeypatch.delitem(sys.modules, "unhype_webui.ui", raising=False)
    ui = importlib.import_module("unhype_webui.ui")
    monkeypatch.setattr(unhype_webui, "ui", ui)
    return ui


def test_panel_fields_are_named_for_send_to_img2img(ui_module):
    """"Send to img2img" copies the components whose infotext name (a string) is in the
    script's paste_field_names (infotext_utils.py L179-185): every panel component is
    registered under a string name that is listed there, and those are the keys
    runner.infotext_pasted fills when an infotext is pasted."""
    from unhype_webui import runner

    class Script:
        infotext_fields = paste_field_names = None

        def elem_id(self, name):
            return name

    script = Script()
    components = ui_module.panel(script, False)
    names = [name for _, name in script.infotext_fields]
    assert all(isinstance(n, str) for n in names)
    assert names == script.paste_field_names == list(runner.PASTE_FIELDS.values())
    assert [c for c, _ in script.infotext_fields] == components


def test_tab_buttons_run_under_the_hosts_queue_lock(ui_module, monkeypatch):
    """Probe and Bake use the model's text encoder (Forge moves models, sets its engine's
    return_pooled; A1111's hijack fixes): they run under the web UI's queue lock, as a
    generation does (call_queue.wrap_queued_call), never beside one."""
    from modules import call_queue

    from unhype_webui import tab_logic

    held = []

    class Recording:
        def __enter__(self):
            held.append(True)

        def __exit__(self, *exc):
            held.append(False)

    seen = []
    monkeypatch.setattr(call_queue, "queue_lock", Recording())
    monkeypatch.setattr(tab_logic, "probe_ui",
                        lambda *a: seen.append(("probe", held[-1])) or ([], ""))
    monkeypatch.setattr(tab_logic, "bake_ui", lambda *a: seen.append(("bake", held[-1])))
    import gradio_stub

    bound = []
    original = gradio_stub.Component.click

    def click(self, fn=None, inputs=None, outputs=None, **kwargs):
        bound.append((fn, inputs or []))
        original(self, fn, inputs, outputs, **kwargs)

    monkeypatch.setattr(gradio_stub.Component, "click", click)
    ui_module.tab()
    for fn, inputs in bound:
        if len(inputs) >= 2:  # Probe (file, prompts) and Bake (file, prompt, strength, name)
            fn(*["x"] * len(inputs))
    assert sorted(seen) == [("bake", True), ("probe", True)] and held[-1] is False
