"""Which UnHype family every model config class of this ComfyUI (comfy.supported_models.models)
is, and what Apply says for the classes it refuses; Bake LoRA and Inspect name themselves and
the wrong CLIP in their errors."""

from types import SimpleNamespace

import pytest
import torch

# the exact text-to-image classes of the supported families; every other class is None
FAMILIES = {"SD15": "sd1", "SD15_instructpix2pix": "sd1", "SD20": "sd2", "SD21UnclipL": "sd2",
            "SD21UnclipH": "sd2", "SDXL": "sdxl", "SDXL_instructpix2pix": "sdxl",
            "Flux": "flux", "FluxSchnell": "flux", "FluxInpaint": "flux"}


def patcher(cls):
    """What check_model reads of a ModelPatcher: model.model_config, the real config object."""
    return SimpleNamespace(model=SimpleNamespace(model_config=cls(dict(cls.unet_config))))


def hyper(family):
    return SimpleNamespace(path=SimpleNamespace(name=f"{family}_file.safetensors"),
                           meta=SimpleNamespace(family=family))


def test_every_model_class_of_this_comfyui_gets_its_family_or_none(pack):
    import comfy.supported_models as sm

    glue = pack.nodes.glue
    names = {cls.__name__ for cls in sm.models}
    assert {"SD15", "SD20", "SDXL"} <= names  # both ComfyUIs (2024-03 and current)
    for cls in sm.models:
        assert glue.model_family(patcher(cls)) == FAMILIES.get(cls.__name__), cls.__name__


@pytest.mark.parametrize("name,family,needle", [
    ("SVD_img2vid", "sd2", "this model is ComfyUI's SVD_img2vid, which UnHype does not support"),
    ("SV3D_u", "sd2", "ComfyUI's SV3D_u, which UnHype does not support"),
    ("SD_X4Upscaler", "sd2", "ComfyUI's SD_X4Upscaler, which UnHype does not support"),
    ("Stable_Zero123", "sd1", "ComfyUI's Stable_Zero123"),
    ("Stable_Cascade_C", "sdxl", "ComfyUI's Stable_Cascade_C"),
    ("LotusD", "sd2", "ComfyUI's LotusD"),
    ("SD3", "sd1", "ComfyUI's SD3, which UnHype does not support .UnHype supports SD 1.x, "
                   "SD 2.x, SDXL and FLUX.1"),
    ("Chroma", "flux", "ComfyUI's Chroma"),
    ("SDXLRefiner", "sdxl", "the SDXL refiner .*apply sdxl_file.safetensors to the base model"),
    ("SSD1B", "sdxl", "a pruned / distilled SDXL .ComfyUI's SSD1B"),
    ("Segmind_Vega", "sdxl", "pruned / distilled SDXL"),
    ("KOALA_700M", "sdxl", "pruned / distilled SDXL"),
    ("SD15", "sdxl", "sdxl_file.safetensors was trained for sdxl but the model is sd1"),
])
def test_apply_refuses_other_models_by_name(pack, name, family, needle):
    import comfy.supported_models as sm

    from unhype.errors import UnHypeError

    cls = getattr(sm, name, None)
    if cls is None:
        pytest.skip(f"this ComfyUI has no {name}")
    with pytest.raises(UnHypeError, match=needle):
        pack.nodes.glue.check_model(patcher(cls), hyper(family))


def test_bake_lora_names_itself_in_conditioning_errors(pack, loaded):
    from unhype.errors import UnHypeError

    bake = pack.nodes.definitions.UnHypeBakeLoRA().bake
    no_pooled = [[torch.zeros(1, 77, 768), {}]]
    with pytest.raises(UnHypeError, match="^UnHype Bake LoRA: conditioning entry 0 has no "
                                          "'pooled_output'"):
        bake(loaded, no_pooled, "x", 1.0, True)
    wide = [[torch.zeros(1, 77, 4096), {"pooled_output": torch.zeros(1, 2048)}]]
    with pytest.raises(UnHypeError, match="^UnHype Bake LoRA: conditioning entry 0 has a "
                                          "2048-d pooled_output"):
        bake(loaded, wide, "x", 1.0, True)


def sdxl_file(tmp_path):
    """An sdxl file (the full SDXL targets at rank 1, tiny heads: small on disk)."""
    from unhype.families import get_family
    from unhype.fileformat import load_hypernet, save_hypernet
    from unhype.hypernet import HyperNetConfig, build_hypernet

    fam = get_family("sdxl")
    net = build_hypernet(HyperNetConfig(variant="shared", embed_dim=fam.embedding.dim, rank=1,
                                        targets=[t.as_dict() for t in fam.targets()], hidden=8,
                                        head_hidden=4))
    return load_hypernet(save_hypernet(tmp_path / "xl.safetensors", net.eval(), "sdxl", concepts=[
        {"target": "a photo of a cat", "anchor": "a photo", "synonyms": []}]))


def test_inspect_and_bake_say_the_clip_is_another_familys(pack, tiny_parts, tmp_path):
    """The tiny SD1 CLIP (768-d pooled) with an sdxl file (1280-d), and a CLIP without a pooled
    output (T5 only, as Chroma's, AuraFlow's, Wan's)."""
    from unhype.errors import UnHypeError

    defs = pack.nodes.definitions
    xl = sdxl_file(tmp_path)
    needle = ("UnHype Inspect: this CLIP gives 768-d pooled vectors, but xl.safetensors reads "
              "clip_g_pooled_projected .1280-d.: it is another model family's CLIP")
    with pytest.raises(UnHypeError, match=needle):
        defs.UnHypeInspect().inspect(xl, tiny_parts["clip"], "a photo of a cat")
    cond = [[torch.zeros(1, 77, 2048), {"pooled_output": torch.zeros(1, 1280)}]]
    with pytest.raises(UnHypeError, match="UnHype Bake LoRA: this CLIP gives 768-d"):
        defs.UnHypeBakeLoRA().bake(xl, cond, "x", 1.0, True, "a photo of a cat",
                                   clip=tiny_parts["clip"])

    class T5Only:  # ComfyUI's CLIP answers for a T5-only text encoder: no pooled output
        def tokenize(self, text):
            return {"t5xxl": [[(1, 1.0)] * 3]}

        def encode_from_tokens(self, tokens, return_pooled=False):
            return torch.zeros(1, 3, 4096), None

    with pytest.raises(UnHypeError, match="UnHype Inspect: this CLIP gives no pooled output, "
                                          "but xl.safetensors reads"):
        defs.UnHypeInspect().inspect(xl, T5Only(), "a photo of a cat")
