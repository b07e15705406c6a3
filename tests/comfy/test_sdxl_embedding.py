"""SDXL in ComfyUI: the pooled_output UnHype Apply reads is the embedding the trainer computes.

The trainer reads CLIPTextModelWithProjection.text_embeds of SDXL's OpenCLIP bigG (all layers,
final layer norm, EOS row, text projection); ComfyUI's SDXL pooled_output is clip_g's EOS row
of the last layer after the final layer norm, projected, whatever layer the cross-attention
is read at. Tiny SDXL text encoders in the single-file (SGM) layout are loaded into ComfyUI's
own SDXL CLIP (sdxl_clip.SDXLClipModel, its configs made tiny) and into unhype's embedder.
"""

from __future__ import annotations

import json
import os
import types
from pathlib import Path

import pytest
import torch

from tests.helpers import sdxl_trained_embedding, tiny_sdxl_text_checkpoint

TOL = dict(atol=5e-3, rtol=5e-3)  # ComfyUI keeps CPU text encoder weights in float16
PROMPTS = ["a photo of a cat", "an oil painting of a dog in the snow"]


def _os_with_configs(configs: dict[str, Path]):
    """`os` for a ComfyUI module, whose path.join answers `configs[name]` for those file
    names: ComfyUI's CLIP classes read their config from a fixed file beside the module."""
    path = types.SimpleNamespace(**{k: getattr(os.path, k) for k in dir(os.path)
                                    if not k.startswith("__")})
    path.join = lambda *a: str(configs[a[-1]]) if a[-1] in configs else os.path.join(*a)
    return types.SimpleNamespace(**{k: getattr(os, k) for k in dir(os)
                                    if not k.startswith("__") and k != "path"}, path=path)


@pytest.fixture(scope="module")
def sdxl(pack, tmp_path_factory):
    """(ComfyUI CLIP, the SGM checkpoint it holds, the trained embedding of texts)."""
    import comfy.sd
    import comfy.sd1_clip as sd1_clip
    import comfy.sdxl_clip as sdxl_clip
    import comfy.supported_models
    from comfy.supported_models_base import ClipTarget

    tmp = tmp_path_factory.mktemp("sdxl")
    comfy_dir = Path(sdxl_clip.__file__).parent
    sizes = {"clip_config_bigg.json": dict(num_hidden_layers=3, intermediate_size=64),
             "sd1_clip_config.json": dict(num_hidden_layers=3, intermediate_size=64,
                                          hidden_size=64, num_attention_heads=1)}
    configs = {}
    for name, size in sizes.items():
        configs[name] = tmp / name
        configs[name].write_text(json.dumps({**json.loads((comfy_dir / name).read_text()),
                                             **size}))
    real = sd1_clip.os, sdxl_clip.os
    sd1_clip.os = sdxl_clip.os = _os_with_configs(configs)
    try:
        with torch.no_grad():  # ComfyUI builds it so (its init writes into parameters)
            clip = comfy.sd.CLIP(target=ClipTarget(sdxl_clip.SDXLTokenizer,
                                                   sdxl_clip.SDXLClipModel))
    finally:
        sd1_clip.os, sdxl_clip.os = real
    checkpoint = tiny_sdxl_text_checkpoint(layers=3)
    state = comfy.supported_models.SDXL.process_clip_state_dict(None, dict(checkpoint))
    missing, _ = clip.load_sd(state, full_model=True)
    # an SDXL checkpoint has no CLIP-L projection; ComfyUI drops CLIP-L's pooled output
    assert not [k for k in missing if "position_ids" not in k and "logit_scale" not in k
                and k != "clip_l.transformer.text_projection.weight"], missing
    return clip, checkpoint, lambda texts: sdxl_trained_embedding(checkpoint, texts, tmp)


def _pooled(conditioning) -> torch.Tensor:
    return conditioning[0][1]["pooled_output"].float().reshape(-1)


def _cos(a, b) -> float:
    return float(torch.cosine_similarity(a.reshape(-1), b.reshape(-1), dim=0))


def test_clip_text_encode_pooled_is_the_trained_embedding(sdxl):
    import nodes

    from unhype.comfy_apply import pooled_rows
    from unhype.families import get_family

    clip, _, trained = sdxl
    want = trained(PROMPTS + ["cat"])
    spec = get_family("sdxl").embedding
    assert want.shape == (3, spec.dim)
    with torch.no_grad():
        got = [nodes.CLIPTextEncode().encode(clip, p)[0] for p in PROMPTS + ["(cat:1.4)"]]
    for i, conditioning in enumerate(got):
        torch.testing.assert_close(_pooled(conditioning), want[i], **TOL)
        # what Apply reads from it
        rows = pooled_rows(conditioning, spec.dim, spec.source)
        torch.testing.assert_close(rows[0][0], want[i], **TOL)
    assert _cos(want[0], want[1]) < 0.99  # the prompts embed apart: the match means something


def test_the_vector_is_projected_and_from_the_last_layer(sdxl):
    """The parity above is not a coincidence of the tiny model: the unprojected EOS row, and
    the penultimate layer's, are other vectors."""
    clip, _, trained = sdxl
    want = trained(PROMPTS[:1])[0]
    tokens = clip.tokenize(PROMPTS[0])
    with torch.no_grad():
        _, unprojected = clip.encode_from_tokens(tokens, return_pooled="unprojected")
        cond, pooled = clip.encode_from_tokens(tokens, return_pooled=True)
    torch.testing.assert_close(pooled.float().reshape(-1), want, **TOL)
    assert _cos(unprojected, want) < 0.5
    # cond's bigG half is the penultimate layer's output (no final layer norm) at the EOS row
    ids = [t[0] for t in tokens["g"][0]]
    penultimate_eos = cond[0, ids.index(49407), 64:]
    assert _cos(penultimate_eos, unprojected) < 0.99


def test_clip_text_encode_sdxl_pools_text_g(sdxl):
    """CLIP Text Encode (SDXL): the pooled output is text_g's alone, by design (so UnHype
    Also Read Text exists for text_l)."""
    clip, _, trained = sdxl
    want = trained(PROMPTS)
    # the node's own token assembly (comfy_extras/nodes_clip_sdxl.py), then its encode call
    tokens = clip.tokenize(PROMPTS[0])
    tokens["l"] = clip.tokenize(PROMPTS[1])["l"]
    with torch.no_grad():
        cond, pooled = clip.encode_from_tokens(tokens, return_pooled=True)
        cond_l, _ = clip.encode_from_tokens(clip.tokenize(PROMPTS[1]), return_pooled=True)
    torch.testing.assert_close(pooled.float().reshape(-1), want[0], **TOL)
    assert _cos(pooled, want[1]) < 0.99
    torch.testing.assert_close(cond[..., :64], cond_l[..., :64])  # text_l did reach CLIP-L


@pytest.mark.parametrize("last_layer", [-1, -2, -3])
def test_clip_set_last_layer_leaves_the_pooled_output(sdxl, last_layer):
    import nodes

    clip, _, trained = sdxl
    want = trained(PROMPTS[:1])[0]
    stopped = nodes.CLIPSetLastLayer().set_last_layer(clip, last_layer)[0]
    with torch.no_grad():
        default = nodes.CLIPTextEncode().encode(clip, PROMPTS[0])[0]
        got = nodes.CLIPTextEncode().encode(stopped, PROMPTS[0])[0]
    torch.testing.assert_close(_pooled(got), want, **TOL)
    # the setting took: SDXL's default is -2, the cross-attention text moves with the layer
    assert torch.equal(got[0][0], default[0][0]) == (last_layer == -2)


def test_unhype_text_encode_windows_are_trained_embeddings(pack, sdxl):
    """A long prompt's word windows, as UnHype Text Encode stores them for SDXL."""
    from unhype.comfy_apply import EMBEDDING_KEY, WINDOWS_KEY
    from unhype.prompt_windows import prompt_windows

    clip, _, trained = sdxl
    text = "a red car on a road, " * 12 + "a cat"
    windows = prompt_windows(text)
    assert windows
    with torch.no_grad():
        conditioning = pack.nodes.definitions.UnHypeTextEncode().encode(clip, text)[0]
    extra = conditioning[0][1]
    assert EMBEDDING_KEY not in extra  # SDXL's pooled_output is read as it is
    torch.testing.assert_close(extra[WINDOWS_KEY], trained(windows), **TOL)
