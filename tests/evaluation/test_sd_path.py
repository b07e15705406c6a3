"""`unhype eval` on a tiny random SD1 diffusers folder with a tiny open_clip classifier: the path
real models take (trainer backend generator, open_clip zero-shot from .safetensors, UCE on the
backend's own text encoder)."""

from __future__ import annotations

import json

import pytest

import torch

from tests.helpers import tiny_open_clip
from unhype.cli import main

def test_eval_on_a_tiny_sd1_folder(tmp_path):
    from unhype.trainer.backends.tiny import build_pipeline_folder

    torch.set_num_threads(1)
    model = build_pipeline_folder("sd1", tmp_path / "sd1")
    cfg, weights = tiny_open_clip(tmp_path, "tiny-clip-sd", "clip.safetensors")
    out = tmp_path / "eval"
    code = main(["eval", "--model", str(model), "--erase", "ship", "--prompt_set", "cifar10",
                 "--classifier", str(cfg), "--clip_weights", str(weights), "--per_class", "1",
                 "--steps", "2", "--baselines", "negative_prompt,uce", "--out", str(out)])
    assert code == 0
    data = json.loads((out / "results.json").read_text())
    assert list(data["methods"]) == ["base model", "negative prompt", "UCE"]
    row = data["methods"]["UCE"]
    assert 0 <= row["acc_s"] <= 1 and row["clip_score"] >= 0 and row["h_o"] is not None
    assert data["erased"] == ["ship"] and len(data["sets"]["others"]) == 9


@pytest.mark.parametrize("storage", ["fp8", "nf4"])
def test_eval_on_a_tiny_flux_folder_in_bf16_with_low_bit_weights(tmp_path, storage):
    """FLUX through `unhype eval` (a trained hypernetwork, the negative-prompt baseline), with the
    trainer's memory options: bf16 compute, linear weights stored in fp8 or 4-bit NF4, text
    encoders on the CPU between encodings."""
    if storage == "nf4":
        pytest.importorskip("bitsandbytes")
    from unhype.trainer import loop
    from unhype.trainer.backends.tiny_flux import build_flux_folder
    from unhype.trainer.config import resolve

    torch.set_num_threads(1)
    model = build_flux_folder(tmp_path / "flux")
    cfg = resolve({"pretrained_model_name_or_path": str(model), "output_dir": str(tmp_path / "h"),
                   "output_name": "erase_dog", "concepts": "dog", "template_set": "objects",
                   "resolution": 16, "max_train_steps": 1, "ddim_steps": 2, "hyper_steps": 4,
                   "network_hidden": 8, "retain_prompts": "captions", "retain_batch_size": 4,
                   "mode": "direct", "device": "cpu"})
    assert loop.train(loop.prepare(cfg, quiet=True), progress=False) == 0
    clip_cfg, weights = tiny_open_clip(tmp_path, "tiny-clip-flux", "clip.safetensors")
    out = tmp_path / "eval"
    args = ["eval", "--hypernet", str(tmp_path / "h" / "erase_dog.safetensors"), "--model",
            str(model), "--prompt_set", "cifar10", "--classifier", str(clip_cfg),
            "--clip_weights", str(weights), "--per_class", "1", "--steps", "2", "--out",
            str(out), "--mixed_precision", "bf16", f"--{storage}_base",
            "--cache_text_encoder_outputs"]
    assert main(args + ["--baselines", "negative_prompt"]) == 0
    data = json.loads((out / "results.json").read_text())
    assert data["erased"] == ["dog"] and len(data["methods"]) == 3
    assert all(row["h_o"] is not None for row in data["methods"].values())
    assert any(n.startswith(f"{storage} base: ") and "computed in bfloat16" in n
               and "text encoders" in n for n in data["notes"])
    # UCE writes into the weights that fp8 storage would round: refused before any work
    assert main(args + ["--baselines", "uce", "--out", str(tmp_path / "uce")]) == 2
    assert not (tmp_path / "uce").exists()


def test_eval_reads_a_v_prediction_zero_snr_model_as_the_trainer_does(tmp_path, capsys):
    """`unhype eval --v_parameterization --zero_terminal_snr` loads the model on the schedule it
    was trained on; zero terminal SNR alone on an epsilon model is refused before any work."""
    from unhype.trainer.backends.tiny import build_pipeline_folder
    from unhype.cli import build_parser
    from unhype.evaluation.cli import load_model

    torch.set_num_threads(1)
    model = build_pipeline_folder("sd1", tmp_path / "sd1")
    out = tmp_path / "eval"
    assert main(["eval", "--model", str(model), "--erase", "ship", "--prompt_set", "cifar10",
                 "--zero_terminal_snr", "--allow_random_classifier", "--out", str(out)]) == 2
    assert "zero terminal SNR needs a v-prediction model" in capsys.readouterr().err
    assert not out.exists()
    args = build_parser().parse_args(["eval", "--model", str(model), "--v_parameterization",
                                      "--zero_terminal_snr"])
    backend, _, _ = load_model(str(model), args)
    assert backend.prediction_type == "v_prediction" and backend.zero_terminal_snr


def test_eval_on_an_sd_model_needs_real_classifier_weights_and_a_fitting_file(tmp_path, capsys):
    """Without --clip_weights the open_clip classifier would have random weights and every
    accuracy be noise: refused before the model loads. A hypernetwork for another model of the
    family is refused once the model is loaded, before any image is made."""
    from tests.helpers import hypernet_for, tiny_sd_unet
    from unhype.trainer.backends.tiny import build_pipeline_folder
    from unhype.fileformat import save_hypernet

    torch.set_num_threads(1)
    model = build_pipeline_folder("sd1", tmp_path / "sd1")
    out = tmp_path / "eval"
    assert main(["eval", "--model", str(model), "--erase", "ship", "--out", str(out)]) == 2
    assert "--clip_weights is needed" in capsys.readouterr().err
    wide = tiny_sd_unet(block_out_channels=(64, 64))
    other = save_hypernet(tmp_path / "other.safetensors", hypernet_for(wide, rank=1), "sd1",
                          concepts=[{"target": "ship"}])
    cfg, weights = tiny_open_clip(tmp_path, "tiny-clip-sd", "clip.safetensors")
    assert main(["eval", "--hypernet", str(other), "--model", str(model), "--classifier",
                 str(cfg), "--clip_weights", str(weights), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "have other shapes" in err or "do not exist in this model" in err, err
    assert not (out / "results.json").exists()

