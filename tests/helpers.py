"""Small builders shared by the core tests: tiny diffusers UNets, hypernetworks, open_clip."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from unhype.families import get_family
from unhype.hypernet import HyperNetConfig, build_hypernet


def tiny_sd_unet_config(cross_attention_dim: int = 768, **extra) -> dict:
    return {
        "sample_size": 8, "in_channels": 4, "out_channels": 4, "layers_per_block": 1,
        "block_out_channels": [32, 64], "attention_head_dim": 8, "norm_num_groups": 8,
        "cross_attention_dim": cross_attention_dim,
        "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
        "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"], **extra,
    }


def tiny_sd_unet(seed: int = 0, **cfg):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return UNet2DConditionModel(**tiny_sd_unet_config(**cfg)).eval()


def hypernet_for(model, family="sd1", variant="per_layer", rank=2, hidden=16, seed=0,
                 perturb: float = 0.05, embed_dim: int | None = None, preset: str | None = None):
    """A hypernetwork on `model`'s targets whose B heads are non-zero (as after training)."""
    fam = get_family(family)
    targets = [t.as_dict() for t in fam.targets(preset, model=model)]
    cfg = HyperNetConfig(variant=variant, targets=targets,
                         embed_dim=embed_dim or fam.embedding.dim, rank=rank, hidden=hidden,
                         head_hidden=8, seed=seed)
    net = build_hypernet(cfg)
    if perturb:
        gen = torch.Generator().manual_seed(seed + 1)
        with torch.no_grad():
            for p in net.parameters():
                if p.requires_grad:
                    p.add_(perturb * torch.randn(p.shape, generator=gen))
    return net.eval()


# the smallest open_clip model the evaluation tests use as a classifier / FID feature tower
TINY_OPEN_CLIP = {"embed_dim": 16,
                  "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16,
                                 "patch_size": 16},
                  "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32,
                               "heads": 4, "layers": 1}}


def tiny_open_clip(folder: Path, name: str, weights_name: str,
                   seed: int | None = None) -> tuple[Path, Path]:
    """(`folder/<name>.json`, `folder/<weights_name>`): a tiny random open_clip model's config,
    registered with open_clip as `name`, and its weights as .safetensors."""
    import open_clip
    from safetensors.torch import save_file

    config = Path(folder) / f"{name}.json"
    config.write_text(json.dumps(TINY_OPEN_CLIP))
    if seed is not None:
        torch.manual_seed(seed)
    open_clip.add_model_config(config)
    weights = Path(folder) / weights_name
    save_file({k: v.contiguous() for k, v in open_clip.create_model(name).state_dict().items()},
              str(weights))
    return config, weights


class ConceptGate(torch.nn.Module):
    """A concept-selective stand-in of a trained hypernetwork: a file's own network with its A
    factors scaled by a steep sigmoid of the embedding's cosine similarity to the concept
    prompt's (`at`: where the gate is half open), so the update is strong for texts that touch
    the concept and about zero otherwise, as training makes it (a random test network alone
    prefers no text in particular)."""

    def __init__(self, net, concept: torch.Tensor, sharpness=50.0, at=0.42):
        super().__init__()
        self.net, self.concept, self.sharpness, self.at = net, concept, sharpness, at

    def num_parameters(self, *args, **kwargs):
        return self.net.num_parameters(*args, **kwargs)

    def forward(self, emb, *args, **kwargs):
        gate = torch.sigmoid(self.sharpness * (torch.nn.functional.cosine_similarity(
            emb, self.concept.to(emb)[None], dim=1) - self.at))
        return {k: (a * gate[:, None, None], b) for k, (a, b) in
                self.net(emb, *args, **kwargs).items()}


def gate_between(loaded, pooled, strong: str, weak: str, concept: str):
    """Give `loaded` a ConceptGate on `concept`'s embedding, half open between the texts
    `strong` (which names the concept) and `weak`, as `pooled(texts)` embeds them; checks that
    `strong` then gets over 10 times `weak`'s update. Returns both embeddings. The gate is
    steep enough to open 4 logits either side however close the two texts embed (a 75-token
    window that ends on the concept is only a little closer to it than the whole prompt)."""
    from unhype.hypernet import delta_weight

    pair = pooled([strong, weak])
    target = pooled([concept])[0]
    cos = torch.nn.functional.cosine_similarity(pair, target[None])
    gap = float(cos[0] - cos[1])
    assert gap > 0, f"{strong!r} is not closer to {concept!r} than {weak!r}"
    loaded.hypernet = ConceptGate(loaded.hypernet, target, at=float(cos.mean()),
                                  sharpness=max(50.0, 8.0 / gap))
    with torch.no_grad():
        f = loaded.generate(pair)
    norms = [sum(float(delta_weight(a[n], b[n]).pow(2).sum()) for a, b in f.values())
             for n in range(2)]
    assert norms[0] > 10 * norms[1], norms
    return pair[0], pair[1]


def tiny_open_clip_model(layers: int = 2, width: int = 64, heads: int = 4):
    """A tiny open_clip CLIP (SD2's text encoder class) whose text projection is the
    identity."""
    from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg

    torch.manual_seed(0)
    model = CLIP(embed_dim=width, vision_cfg=CLIPVisionCfg(width=64, layers=1, patch_size=16,
                                                           image_size=32),
                 text_cfg=CLIPTextCfg(width=width, heads=heads, layers=layers,
                                      mlp_ratio=64 / width)).eval()
    with torch.no_grad():
        if isinstance(model.text_projection, torch.nn.Linear):
            model.text_projection.weight.copy_(torch.eye(width))
        else:
            model.text_projection.copy_(torch.eye(width))
    return model


def sd2_trained_embedding(model, texts, tmp_dir):
    """What the trainer and `unhype bake` read for SD 2.x, from an open_clip model's weights:
    unhype's own embedder on the weights converted as a single-file SD2 checkpoint is (diffusers'
    SD2 text encoder keeps all layers but the last)."""
    import shutil

    from transformers import CLIPTokenizer

    from unhype.embedding import PromptEmbedder, _checkpoint_text_encoder, builtin_tokenizer
    from unhype.families import get_family
    from unhype.model_configs import config_folder

    family, folder = get_family("sd2"), Path(tmp_dir) / "sd2_tiny_config"
    shutil.copytree(config_folder("sd2-v"), folder, dirs_exist_ok=True)
    text = model.transformer
    width, blocks = text.width, len(text.resblocks)
    heads = text.resblocks[0].attn.num_heads
    config_path = folder / "text_encoder" / "config.json"
    config = json.loads(config_path.read_text())
    config.update(hidden_size=width, num_attention_heads=heads,
                  intermediate_size=text.resblocks[0].mlp.c_fc.out_features,
                  num_hidden_layers=blocks - 1, projection_dim=width)
    config_path.write_text(json.dumps(config))
    tensors = {"cond_stage_model.model." + k.replace("token_embedding.wrapped.",  # TI hijack
                                                     "token_embedding."): v.detach().clone()
               for k, v in model.state_dict().items() if not k.startswith("visual.")}
    encoder = _checkpoint_text_encoder(family, folder, "text_encoder", tensors,
                                       Path("tiny.safetensors")).eval()
    tokenizer = CLIPTokenizer.from_pretrained(builtin_tokenizer(family))
    return PromptEmbedder(family, tokenizer, encoder)(list(texts))


def tiny_sdxl_text_checkpoint(layers: int = 3) -> dict:
    """The text encoders of a tiny SDXL single-file checkpoint, in its (SGM) layout: CLIP-L as
    ``conditioner.embedders.0.transformer.*`` (width 64, one 64-wide head) and OpenCLIP bigG as
    ``conditioner.embedders.1.model.*`` with a random text projection. bigG keeps its width
    (1280: the pooled vector's size, and ComfyUI's text projection is square) and head size
    (20 heads of 64); both have `layers` blocks with a 64-wide MLP."""
    from transformers import CLIPTextConfig, CLIPTextModel

    bigg = tiny_open_clip_model(layers=layers, width=1280, heads=20)
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in bigg.parameters():  # away from open_clip's small init: layers that matter
            p.add_(0.02 * torch.randn(p.shape, generator=gen))
        projection = torch.randn(1280, 1280, generator=gen) / 1280 ** 0.5  # [width, embed]
        if isinstance(bigg.text_projection, torch.nn.Linear):
            bigg.text_projection.weight.copy_(projection.T)
        else:
            bigg.text_projection.copy_(projection)
    torch.manual_seed(1)
    clip_l = CLIPTextModel(CLIPTextConfig(
        vocab_size=49408, max_position_embeddings=77, hidden_size=64, intermediate_size=64,
        num_attention_heads=1, num_hidden_layers=layers, hidden_act="quick_gelu")).eval()
    checkpoint = {}
    for k, v in clip_l.state_dict().items():
        k = k if k.startswith("text_model.") else "text_model." + k  # transformers >= 5.6
        if "position_ids" not in k:
            checkpoint["conditioner.embedders.0.transformer." + k] = v.detach().clone()
    for k, v in bigg.state_dict().items():
        if not k.startswith("visual."):
            checkpoint["conditioner.embedders.1.model." + k] = v.detach().clone()
    return checkpoint


def sdxl_trained_embedding(checkpoint: dict, texts, tmp_dir):
    """What the trainer and `unhype bake` read for SDXL from a single-file checkpoint's text
    encoders (`checkpoint`: SGM keys): unhype's own embedder on its bigG tensors, with the
    built-in sdxl-base config made as small as the tensors (CLIPTextModelWithProjection's
    text_embeds)."""
    import re
    import shutil

    from transformers import CLIPTokenizer

    from unhype.embedding import (CHECKPOINT_TEXT, PromptEmbedder, _checkpoint_text_encoder,
                                  builtin_tokenizer)
    from unhype.model_configs import config_folder

    family = get_family("sdxl")
    prefix, sub, name = CHECKPOINT_TEXT["sdxl"]
    folder = Path(tmp_dir) / "sdxl_tiny_config"
    shutil.copytree(config_folder(name), folder, dirs_exist_ok=True)
    tensors = {k: v for k, v in checkpoint.items() if k.startswith(prefix)}
    fc1 = tensors[prefix + "transformer.resblocks.0.mlp.c_fc.weight"]
    config_path = folder / sub / "config.json"
    config = json.loads(config_path.read_text())
    config.update(hidden_size=fc1.shape[1], intermediate_size=fc1.shape[0],
                  num_attention_heads=fc1.shape[1] // 64,
                  num_hidden_layers=len({re.search(r"resblocks\.(\d+)\.", k)[1]
                                         for k in tensors if ".resblocks." in k}),
                  projection_dim=tensors[prefix + "text_projection"].shape[-1])
    config_path.write_text(json.dumps(config))
    encoder = _checkpoint_text_encoder(family, folder, sub, tensors,
                                       Path("tiny.safetensors")).eval()
    tokenizer = CLIPTokenizer.from_pretrained(builtin_tokenizer(family))
    return PromptEmbedder(family, tokenizer, encoder)(list(texts))


class ReadingGate(torch.nn.Module):
    """A stand-in of a network trained to erase a concept, for texts whose meaning a tiny random
    CLIP cannot tell: a file's own network with its A factors zeroed except for the embeddings
    of the texts that name the concept (`keys`, matched at cosine > 0.9999)."""

    def __init__(self, net, keys: torch.Tensor):
        super().__init__()
        self.net, self.keys = net, keys

    def num_parameters(self, *args, **kwargs):
        return self.net.num_parameters(*args, **kwargs)

    def forward(self, emb, *args, **kwargs):
        cos = torch.nn.functional.cosine_similarity(emb[:, None], self.keys.to(emb)[None], dim=2)
        gate = (cos.max(dim=1).values > 0.9999).to(emb)
        return {k: (a * gate[:, None, None], b) for k, (a, b) in
                self.net(emb, *args, **kwargs).items()}


class TwoConcepts(torch.nn.Module):
    """A two-concept stand-in of a trained file: two gated networks with unrelated weights side
    by side along the rank, so each concept's update points its own way (as training makes
    the updates of different concepts: cosine 0.04-0.6 on the toy)."""

    def __init__(self, first, second):
        super().__init__()
        self.first, self.second = first, second

    def num_parameters(self, *args, **kwargs):
        return self.first.num_parameters(*args, **kwargs)

    def forward(self, emb, *args, **kwargs):
        f, s = self.first(emb, *args, **kwargs), self.second(emb, *args, **kwargs)
        return {k: (torch.cat([f[k][0], s[k][0]], -1), torch.cat([f[k][1], s[k][1]], -1))
                for k in f}


def two_concepts(loaded, embed, texts, concepts: dict[str, str], holds=None, seed: int = 5):
    """Give `loaded` a TwoConcepts network whose concept {target: phrase} is switched on by
    exactly the texts that hold its phrase (`holds`: what each text's embedding reads, if not
    the text itself: a long prompt's embedding reads its first 75 tokens), and the signatures
    a trainer would store (training["concept_embeddings"]: here the embedding of a text that
    names the concept). Returns the embeddings of `texts`."""
    import dataclasses

    emb = embed(list(texts)).float()
    gates, signatures = [], {}
    for i, (target, phrase) in enumerate(concepts.items()):
        named = [n for n, t in enumerate(holds or texts) if phrase in t]
        assert named and len(named) < len(texts), f"{phrase!r} must be named by some texts only"
        net = loaded.hypernet
        if i:  # another initialisation, its B heads made non-zero as hypernet_for does
            net = build_hypernet(dataclasses.replace(loaded.meta.config, seed=seed))
            gen = torch.Generator().manual_seed(seed + 1)
            with torch.no_grad():
                for p in net.parameters():
                    p.add_(0.05 * torch.randn(p.shape, generator=gen))
            net.eval()
        gates.append(ReadingGate(net, emb[named]))
        signatures[target] = emb[named[0]].tolist()
    loaded.hypernet = TwoConcepts(*gates)
    loaded.meta.training["concept_embeddings"] = signatures
    loaded.meta.concepts = [{"target": target} for target in concepts]
    return emb
