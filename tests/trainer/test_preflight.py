"""Models that share a supported family's classes or key names but cannot be trained on are
refused by name before any weight loads: Playground v2.5 (EDM scheduler), SD/SDXL inpainting
UNets, FLUX.2 / Kontext / Fill folders, Chroma / HunyuanVideo / FLUX.2 / SD3 single files and
the SDXL refiner as a single file. The folders hold configs only (no weights): a loader that
got as far as loading would fail with another message."""

import json
import shutil
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import save_file

from tests.trainer.conftest import fast_options
from unhype.errors import UnHypeError
from unhype.trainer.backends import load_backend
from unhype.trainer.backends.tiny import tiny_unet_config
from unhype.trainer.backends.tiny_flux import tiny_flux_config
from unhype.trainer.config import resolve


def load(model, tmp_path, **over):
    return load_backend(resolve(fast_options(model, tmp_path / "out", device="cpu", **over)))


def write_json(path, data):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))


def sd_folder(path, kind="sdxl", scheduler=None, **unet):
    """An SD pipeline folder's configs (model_index, unet, scheduler), no weights."""
    write_json(path / "unet" / "config.json", {"_class_name": "UNet2DConditionModel",
                                               **tiny_unet_config(kind), **unet})
    write_json(path / "scheduler" / "scheduler_config.json", scheduler or {
        "_class_name": "EulerDiscreteScheduler", "beta_schedule": "scaled_linear",
        "beta_start": 0.00085, "beta_end": 0.012, "num_train_timesteps": 1000})
    for sub in ("text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2"):
        (path / sub).mkdir(exist_ok=True)
    write_json(path / "model_index.json", {"_class_name": "StableDiffusionXLPipeline"})
    return path


# Playground v2.5's scheduler_config.json (EDMDPMSolverMultistepScheduler: no betas)
PLAYGROUND_SCHEDULER = {
    "_class_name": "EDMDPMSolverMultistepScheduler", "sigma_min": 0.002, "sigma_max": 80.0,
    "sigma_data": 0.5, "sigma_schedule": "exponential", "num_train_timesteps": 1000,
    "prediction_type": "epsilon", "solver_order": 2, "algorithm_type": "dpmsolver++",
    "final_sigmas_type": "zero"}


def test_playground_folder_is_refused_as_edm(tmp_path):
    sd_folder(tmp_path / "pg", scheduler=PLAYGROUND_SCHEDULER)
    with pytest.raises(UnHypeError, match=r"an EDM model \(Playground v2\.5"):
        load(tmp_path / "pg", tmp_path)
    no_betas = dict(PLAYGROUND_SCHEDULER, _class_name="SomeSigmaScheduler")
    sd_folder(tmp_path / "sigmas", scheduler=no_betas)
    with pytest.raises(UnHypeError, match="SomeSigmaScheduler without beta_schedule"):
        load(tmp_path / "sigmas", tmp_path)


def test_unhype_eval_refuses_a_playground_folder_too(tmp_path):
    """`unhype eval` loads its model through the trainer's backends."""
    from unhype.evaluation.cli import load_model

    sd_folder(tmp_path / "pg", scheduler=PLAYGROUND_SCHEDULER)
    args = SimpleNamespace(toy_weights=None, model_config=None, device="cpu",
                           mixed_precision="no", fp8_base=False, nf4_base=False,
                           cache_text_encoder_outputs=False, v_parameterization=False,
                           zero_terminal_snr=False, steps=2, guidance=5.0)
    with pytest.raises(UnHypeError, match="EDM model"):
        load_model(str(tmp_path / "pg"), args)


@pytest.mark.parametrize("kind", ["sd1", "sdxl"])
def test_inpainting_unet_folder_is_refused(tmp_path, kind):
    sd_folder(tmp_path / "inpaint", kind, in_channels=9)
    with pytest.raises(UnHypeError, match="its UNet takes 9 input channels"):
        load(tmp_path / "inpaint", tmp_path)


def test_a_folder_of_another_pipeline_is_named(tmp_path):
    write_json(tmp_path / "sd3" / "model_index.json", {"_class_name": "StableDiffusion3Pipeline"})
    with pytest.raises(UnHypeError, match="a StableDiffusion3Pipeline folder"):
        load(tmp_path / "sd3", tmp_path)


def flux_folder(path, pipeline="FluxPipeline", transformer="FluxTransformer2DModel",
                **config):
    """A FLUX folder's configs (model_index, transformer), no weights."""
    if pipeline is not None:
        write_json(path / "model_index.json", {"_class_name": pipeline})
    write_json(path / "transformer" / "config.json",
               {"_class_name": transformer, **tiny_flux_config(), **config})
    return path


FLUX2_CONFIG = {"patch_size": 1, "in_channels": 128, "num_layers": 1, "num_single_layers": 1,
                "attention_head_dim": 8, "num_attention_heads": 2, "joint_attention_dim": 32,
                "axes_dims_rope": [2, 2, 2, 2]}


@pytest.mark.parametrize("pipeline", ["Flux2Pipeline", "Flux2KleinPipeline", None])
def test_flux2_folder_is_refused_by_name(tmp_path, pipeline, monkeypatch):
    from unhype.trainer.backends import flux

    monkeypatch.setattr(flux, "_transformer_cls", lambda: pytest.fail("loaded weights"))
    path = flux_folder(tmp_path / "flux2", pipeline, "Flux2Transformer2DModel", **FLUX2_CONFIG)
    with pytest.raises(UnHypeError, match="FLUX.2"):
        load(path, tmp_path)


@pytest.mark.parametrize("pipeline,config,needle", [
    ("FluxFillPipeline", {}, "FluxFillPipeline, an inpainting / control FLUX"),
    ("FluxControlPipeline", {}, "inpainting / control FLUX"),
    ("FluxPipeline", {"in_channels": 96, "out_channels": 16},
     "reads 96 input channels for 16 output ones: an inpainting / control FLUX"),
    ("FluxKontextPipeline", {}, "FLUX.1 Kontext"),
])
def test_fill_control_and_kontext_folders_are_refused(tmp_path, pipeline, config, needle,
                                                      monkeypatch):
    from unhype.trainer.backends import flux

    monkeypatch.setattr(flux, "_transformer_cls", lambda: pytest.fail("loaded weights"))
    path = flux_folder(tmp_path / "fill", pipeline, **config)
    with pytest.raises(UnHypeError, match=needle):
        load(path, tmp_path, resolution=16)


def test_a_fill_config_folder_is_refused_for_a_single_file(tmp_path, monkeypatch):
    from unhype.trainer.backends import flux

    monkeypatch.setattr(flux, "_transformer_cls", lambda: pytest.fail("loaded weights"))
    single = checkpoint(tmp_path / "flux1.safetensors", FLUX1_BFL)
    cfg_dir = flux_folder(tmp_path / "cfg", in_channels=96, out_channels=16)
    with pytest.raises(UnHypeError, match="--model_config .*inpainting / control FLUX"):
        load(single, tmp_path, model_config=str(cfg_dir))


def checkpoint(path, shapes: dict):
    save_file({k: torch.zeros(shape) for k, shape in shapes.items()}, str(path))
    return path


# what tells each apart, as ComfyUI's model_detection reads them (tiny shapes)
FLUX1_BFL = {"double_blocks.0.img_attn.qkv.weight": (24, 8), "vector_in.in_layer.weight": (8, 768),
             "time_in.in_layer.weight": (8, 256), "img_in.weight": (8, 64),
             "final_layer.linear.weight": (64, 8)}
RELATIVES = {
    "Chroma": {"double_blocks.0.img_attn.qkv.weight": (24, 8), "img_in.weight": (8, 64),
               "distilled_guidance_layer.in_proj.weight": (8, 64)},
    "FLUX.2": {"double_blocks.0.img_attn.qkv.weight": (24, 8), "time_in.in_layer.weight": (8, 256),
               "double_stream_modulation_img.lin.weight": (48, 8)},
    # ComfyUI's layout reuses FLUX's blocks and has vector_in (CLIP-L) and time_in
    "HunyuanVideo": {**FLUX1_BFL, "txt_in.individual_token_refiner.blocks.0.norm1.weight": (8,)},
    "SD3": {"joint_blocks.0.x_block.attn.qkv.weight": (24, 8)},
}


@pytest.mark.parametrize("name", sorted(RELATIVES))
@pytest.mark.parametrize("prefix", ["", "model.diffusion_model."])
def test_single_files_of_flux_relatives_are_named(tmp_path, name, prefix):
    path = checkpoint(tmp_path / "model.safetensors",
                      {prefix + k: v for k, v in RELATIVES[name].items()})
    article = "an" if name == "SD3" else "a"
    with pytest.raises(UnHypeError, match=f"{article} {name} transformer; .*not supported"):
        load(path, tmp_path)
    flux_cfg = flux_folder(tmp_path / "cfg")
    with pytest.raises(UnHypeError, match=f"{name} transformer"):
        load(path, tmp_path, model_config=str(flux_cfg))


def test_flux_style_blocks_without_vector_in_are_not_flux1(tmp_path):
    shapes = {k: v for k, v in FLUX1_BFL.items() if not k.startswith("vector_in")}
    path = checkpoint(tmp_path / "model.safetensors", shapes)
    with pytest.raises(UnHypeError, match="no FLUX.1 pooled CLIP-L input"):
        load(path, tmp_path)


def test_a_fill_single_file_is_refused(tmp_path):
    fill = dict(FLUX1_BFL, **{"img_in.weight": (8, 384)})
    path = checkpoint(tmp_path / "flux1-fill.safetensors", fill)
    with pytest.raises(UnHypeError, match="reads 384 input channels for 64 output ones"):
        load(path, tmp_path, model_config=str(flux_folder(tmp_path / "cfg")))


def test_an_sdxl_refiner_single_file_is_named_as_such(tmp_path):
    key = "model.diffusion_model.input_blocks.4.1.transformer_blocks.0.attn2.to_k.weight"
    path = checkpoint(tmp_path / "refiner.safetensors", {key: (8, 1280)})
    with pytest.raises(UnHypeError, match="an SDXL refiner UNet .*trains on the SDXL base"):
        load(path, tmp_path)


def test_a_flux1_folder_still_loads(tiny_flux, tmp_path):
    """The checks pass the tiny FLUX.1 folder (FluxPipeline, in = out channels)."""
    copy = tmp_path / "flux"
    shutil.copytree(tiny_flux, copy)
    assert load(copy, tmp_path, resolution=16).family.name == "flux"


def test_the_refiner_is_told_by_kind_not_by_its_text(tmp_path, monkeypatch):
    """The trainer refuses the refiner with the base-model advice whatever its text says."""
    from unhype import model_check

    key = "model.diffusion_model.input_blocks.4.1.transformer_blocks.0.attn2.to_k.weight"
    path = checkpoint(tmp_path / "refiner.safetensors", {key: (8, 1280)})
    assert model_check.unsupported_checkpoint(path).kind == model_check.REFINER
    monkeypatch.setattr(model_check, "REFINER_TEXT", "a 1280-d UNet")
    with pytest.raises(UnHypeError, match="a 1280-d UNet; UnHype trains on the SDXL base"):
        load(path, tmp_path)
    hunyuan = checkpoint(tmp_path / "hunyuan.safetensors", RELATIVES["HunyuanVideo"])
    assert model_check.unsupported_checkpoint(hunyuan).kind == model_check.TRANSFORMER


def count_opens(monkeypatch):
    """A list that gets one entry per safetensors file opened."""
    import safetensors

    opened, real = [], safetensors.safe_open

    def counting(path, *args, **kwargs):
        opened.append(path)
        return real(path, *args, **kwargs)

    monkeypatch.setattr(safetensors, "safe_open", counting)
    return opened


@pytest.mark.parametrize("name", ["refiner", "Chroma", "flux"])
def test_one_header_read_per_check(tmp_path, monkeypatch, name):
    from unhype.model_check import checkpoint_family, unsupported_checkpoint
    from unhype.trainer.backends.preflight import check_flux_file

    key = "model.diffusion_model.input_blocks.4.1.transformer_blocks.0.attn2.to_k.weight"
    shapes = {"refiner": {key: (8, 1280)}, "flux": FLUX1_BFL}.get(name) or RELATIVES[name]
    path = checkpoint(tmp_path / "model.safetensors", shapes)
    opened = count_opens(monkeypatch)
    for check in (unsupported_checkpoint, checkpoint_family, check_flux_file):
        opened.clear()
        try:
            check(path)
        except UnHypeError:
            pass
        assert len(opened) == 1, check.__name__
