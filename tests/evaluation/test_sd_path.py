"""`unhype eval` on a tiny random SD1 diffusers folder with a tiny open_clip classifier: the path
real models take (trainer backend generator, open_clip zero-shot from .safetensors, UCE on the
backend's own text encoder)."""

from __future__ import annotations

import json

import torch

from tests.helpers import tiny_open_clip
from unhype.cli import main

def test_eval_on_a_tiny_sd1_folder(tmp_path):
    from trainer.backends.tiny import build_pipeline_folder

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
