"""Which UnHype family every model config class of this ComfyUI (comfy.supported_models.models)
is, and what Apply says for the classes it refuses."""

from types import SimpleNamespace

import pytest

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
