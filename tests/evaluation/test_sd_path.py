"""`unhype eval` on a tiny random SD1 diffusers folder with a tiny open_clip classifier: the path
real models take (trainer backend generator, open_clip zero-shot from .safetensors, UCE on the
backend's own text encoder)."""

from __future__ import annotations

import json

import torch

from unhype.cli import main

TINY_CLIP = {"embed_dim": 16,
             "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16,
                            "patch_size": 16},
             "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 4,
                          "layers": 1}}


def test_eval_on_a_tiny_sd1_folder(tmp_path):
    import open_clip
    from safetensors.torch import save_file

    from trainer.backends.tiny import build_pipeline_folder

    torch.set_num_threads(1)
    model = build_pipeline_folder("sd1", tmp_path / "sd1")
    cfg = tmp_path / "tiny-clip-sd.json"
    cfg.write_text(json.dumps(TINY_CLIP))
    open_clip.add_model_config(cfg)
    clip = open_clip.create_model("tiny-clip-sd")
    weights = tmp_path / "clip.safetensors"
    save_file({k: v.contiguous() for k, v in clip.state_dict().items()}, str(weights))
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
