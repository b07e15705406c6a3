"""What a single-file checkpoint predicts (unhype.checkpoint_prediction), read from files that
carry only the keys the rule looks at, and the built-in config each file then loads with."""

import json

import pytest
import torch

from unhype.trainer.backends.diffusers_sd import single_file_config
from unhype.checkpoint_prediction import SD2_PROBE_KEY, checkpoint_prediction
from unhype.errors import UnHypeError
from unhype.fileformat import atomic_save_safetensors

CONTEXT = {"sd1": 768, "sd2": 1024, "sdxl": 2048}


def checkpoint(tmp_path, family, *markers, probe_std=None, name="model"):
    """A header-sized checkpoint of `family`: the keys the family, input-channel and
    prediction checks read, and the marker keys (empty tensors, as ComfyUI writes them)."""
    torch.manual_seed(0)
    tensors = {
        "model.diffusion_model.input_blocks.0.0.weight": torch.zeros(1, 4, 1, 1),
        "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight":
            torch.zeros(1, CONTEXT[family]),
    }
    tensors.update({m: torch.tensor([]) for m in markers if m not in ("edm_vpred.sigma_max",)})
    if "edm_vpred.sigma_max" in markers:
        tensors["edm_vpred.sigma_max"] = torch.tensor(120.0)
    if probe_std is not None:
        bias = torch.randn(1280)
        tensors[SD2_PROBE_KEY] = bias / bias.std(unbiased=False) * probe_std
    path = tmp_path / f"{name}.safetensors"
    atomic_save_safetensors(tensors, path, {})
    return path


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("UNHYPE_CACHE", str(tmp_path / "cache"))


def scheduler_prediction(folder):
    return json.loads((folder / "scheduler" / "scheduler_config.json").read_text())[
        "prediction_type"]


@pytest.mark.parametrize("markers, kind, zero_snr", [
    ((), "epsilon", False),
    (("v_pred",), "v_prediction", False),
    (("v_pred", "ztsnr"), "v_prediction", True),
])
def test_sdxl_markers_pick_the_config(tmp_path, markers, kind, zero_snr):
    path = checkpoint(tmp_path, "sdxl", *markers)
    prediction = checkpoint_prediction(path, "sdxl")
    assert (prediction.kind, prediction.zero_snr) == (kind, zero_snr)
    assert prediction.stated == bool(markers)
    folder, returned = single_file_config(path, None, None)
    assert folder.name.startswith("sdxl-v-" if kind == "v_prediction" else "sdxl-base-")
    assert scheduler_prediction(folder) == kind and returned == prediction


@pytest.mark.parametrize("std, name", [(0.15, "sd2-v"), (0.1, "sd2-v"), (0.08, "sd2-base"),
                                       (0.02, "sd2-base")])
def test_sd2_is_told_by_comfyuis_weight_rule(tmp_path, std, name):
    path = checkpoint(tmp_path, "sd2", probe_std=std)
    prediction = checkpoint_prediction(path, "sd2")
    assert prediction.kind == ("v_prediction" if name == "sd2-v" else "epsilon")
    assert not prediction.stated and f"{std:.3f}" in prediction.reason
    folder, _ = single_file_config(path, None, None)
    assert folder.name.startswith(f"{name}-")
    # the user's name wins over the guess
    other = "sd2-base" if name == "sd2-v" else "sd2-v"
    folder, returned = single_file_config(path, None, other)
    assert folder.name.startswith(f"{other}-")
    assert returned.kind == scheduler_prediction(folder)


def test_a_named_config_wins_over_the_marker_but_keeps_zero_snr(tmp_path, capsys):
    path = checkpoint(tmp_path, "sdxl", "v_pred", "ztsnr")
    folder, returned = single_file_config(path, None, "sdxl-base")
    assert folder.name.startswith("sdxl-base-")
    assert (returned.kind, returned.zero_snr) == ("epsilon", True)
    assert "following --model_config" in capsys.readouterr().err


def test_a_folder_is_overridden_only_by_what_the_file_states(tmp_path, tiny_folder):
    stated = checkpoint(tmp_path, "sd2", "v_pred", name="stated")
    _, returned = single_file_config(stated, None, str(tiny_folder))
    assert returned.kind == "v_prediction"
    guessed = checkpoint(tmp_path, "sd2", probe_std=0.2, name="guessed")
    assert single_file_config(guessed, None, str(tiny_folder))[1] is None


@pytest.fixture
def tiny_folder(tmp_path):
    folder = tmp_path / "folder"
    folder.mkdir()
    (folder / "model_index.json").write_text("{}")
    return folder


@pytest.mark.parametrize("markers, what", [(("edm_mean", "edm_std"), "Playground v2.5"),
                                           (("edm_vpred.sigma_max",), "CosXL")])
def test_edm_files_are_refused(tmp_path, markers, what):
    path = checkpoint(tmp_path, "sdxl", *markers)
    with pytest.raises(UnHypeError, match=f"an EDM model \\({what}"):
        single_file_config(path, None, None)
    assert not (tmp_path / "cache").exists()  # refused before anything was written


def test_unreadable_file_is_a_clear_error(tmp_path):
    path = tmp_path / "broken.safetensors"
    path.write_bytes(b"\xff" * 64)
    with pytest.raises(UnHypeError, match="not a readable .safetensors checkpoint"):
        checkpoint_prediction(path, "sdxl")
