"""Tiny stand-ins of the checkpoint objects A1111 / Forge hand to scripts as ``p.sd_model``.

* The UNet is ComfyUI's vendored copy of ldm's ``openaimodel.UNetModel`` (the class A1111's
  ldm/sgm and Forge's backend/nn/unet.py mirror), SD1 block layout (layers_per_block 2) with 2
  levels of 32/64 channels, so module paths are the real ones
  (``input_blocks.1.1.transformer_blocks.0.attn2.to_k``). The SDXL-like variant has context 2048
  and a pooled ``y`` input (adm 2816) as SGM's UNet.
* The text model mirrors transformers' ``CLIPTextModel`` call (``input_ids=`` ->
  ``last_hidden_state`` [N, 77, W], ``pooler_output`` = EOS row) with a causal running mean
  instead of attention, and the real CLIP tokenizer (ComfyUI's sd1_tokenizer files).
* ``A1111SD1``: ``model.diffusion_model``, ``cond_stage_model.wrapped.{tokenizer,transformer}``
  (sd_hijack_clip.FrozenCLIPEmbedderWithCustomWords around ldm's FrozenCLIPEmbedder, with
  textual-inversion embeddings: ``custom_words``),
  ``get_learned_conditioning(texts)`` -> [N, 77, 768].
* ``ForgeSD1``: ``forge_objects.unet.model.diffusion_model``, ``text_processing_engine``
  returning (z, pooled) when ``return_pooled`` (backend/text_processing/classic_engine.py
  L141-147, L292-293; backend/diffusion_engine/sd15.py L40-64).
* ``A1111SDXL``: ``get_learned_conditioning`` -> {"crossattn": [N, 77, 2048],
  "vector": [N, 2816]} whose first 1280 values are the clip_g pooled projection
  (sgm GeneralConditioner order; Forge sdxl.py L100-131).
* ``ForgeFlux``: Forge's FLUX engine (backend/diffusion_engine/flux.py): the BFL-layout
  transformer of ``bfl_flux`` at ``forge_objects.unet.model.diffusion_model``, and
  ``get_learned_conditioning`` -> {"crossattn": T5 states, "vector": CLIP-L pooled (768),
  "guidance": the distilled CFG scale per row}. ``reference`` is the diffusers twin holding the
  same weights.
"""

from __future__ import annotations

import functools
import re
from types import SimpleNamespace

import torch
from torch import nn

from tests.comfy_path import comfyui_root, import_comfy

import custom_words


def _randomize(module, seed, std=0.05):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if "norm" in name and name.endswith("weight"):
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=gen))
            else:
                p.copy_(std * torch.randn(p.shape, generator=gen))


def tiny_ldm_unet(context_dim=768, adm=None, seed=0, weight_dtype=None):
    """`weight_dtype` (float8_e4m3fn): weights stored in it and cast to the input's dtype per
    layer at run time (ComfyUI's manual-cast ops, which Forge's backend/operations.py adapts:
    how Forge runs an fp8 UNet)."""
    import_comfy()
    import comfy.ops
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel

    unet = UNetModel(image_size=4, in_channels=4, model_channels=32, out_channels=4,
                     num_res_blocks=[2, 2], channel_mult=[1, 2], num_head_channels=32,
                     use_spatial_transformer=True, legacy=False,
                     transformer_depth=[1, 1, 1, 1], transformer_depth_middle=1,
                     transformer_depth_output=[1] * 6, context_dim=context_dim,
                     use_linear_in_transformer=adm is not None,
                     num_classes="sequential" if adm else None, adm_in_channels=adm,
                     operations=comfy.ops.manual_cast if weight_dtype else
                     comfy.ops.disable_weight_init, dtype=weight_dtype or torch.float32)
    _randomize(unet, seed)
    return unet.eval().requires_grad_(False)


def a1111_fp8_unet(seed=0):
    """A1111's "FP8 weight" option (sd_models.load_model_weights): every Linear / Conv2d of the
    UNet stored in float8_e4m3fn, norms as they were. Returns (that UNet, its fp32 twin holding
    the same fp8-valued weights)."""
    unet = tiny_ldm_unet(seed=seed)
    for module in unet.modules():
        if isinstance(module, (nn.Linear, nn.Conv2d)):
            module.to(torch.float8_e4m3fn)
    upcast = tiny_ldm_unet(seed=seed)
    upcast.load_state_dict({k: v.float() for k, v in unet.state_dict().items()})
    return unet, upcast


def tiny_diffusers_twin(cross_attention_dim=768):
    """The same block structure in diffusers, for Family.targets (kohya names, dims)."""
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=2,
        block_out_channels=[32, 64], attention_head_dim=8, norm_num_groups=32,
        cross_attention_dim=cross_attention_dim,
        down_block_types=["CrossAttnDownBlock2D"] * 2,
        up_block_types=["CrossAttnUpBlock2D"] * 2).eval()


@functools.lru_cache(maxsize=None)
def clip_tokenizer():
    from transformers import CLIPTokenizer

    return CLIPTokenizer.from_pretrained(str(comfyui_root() / "comfy" / "sd1_tokenizer"))


class TinyTextModel(nn.Module):
    def __init__(self, width=768, seed=1):
        super().__init__()
        self.emb = nn.Embedding(49408, 16)
        self.proj = nn.Linear(16, width)
        _randomize(self, seed, std=0.5)
        self.requires_grad_(False)

    def forward(self, input_ids=None, **kwargs):
        h = self.emb(input_ids)
        h = h.cumsum(1) / torch.arange(1, h.shape[1] + 1)[None, :, None]
        z = torch.tanh(self.proj(torch.tanh(h)))
        pooled = z[torch.arange(z.shape[0]), input_ids.argmax(dim=-1)]
        return SimpleNamespace(last_hidden_state=z, pooler_output=pooled)


def emphasis_original(z, texts):
    """A1111's "Original" emphasis (sd_emphasis.EmphasisOriginal.after_transformers): weighted
    rows, then rescaled to the mean of the whole call's batch, so a text's conditioning
    depends on the other texts encoded with it. Here: rows of texts with "(" weigh 1.2."""
    mult = torch.tensor([1.2 if "(" in t else 1.0 for t in texts])[:, None, None]
    original_mean = z.mean()
    z = z * mult
    return z * (original_mean / z.mean())


def tokens(tokenizer, texts):
    return tokenizer(list(texts), truncation=True, max_length=77, padding="max_length",
                     return_tensors="pt")["input_ids"]


def first_chunk_text(text: str) -> str:
    """What A1111's hijacked encoder (sd_hijack_clip: ``zs[0].pooled``) and Forge's engine
    (classic_engine.py L292-293) pool: the first chunk, which a BREAK ends, tokenized with the
    emphasis syntax parsed out."""
    from unhype.prompt_tags import plain_text

    return plain_text(re.split(r"\s*\bBREAK\b\s*", text)[0])


def hijack_sd1(wrapped) -> custom_words.CustomWords:
    """A1111's sd_hijack of ldm's FrozenCLIPEmbedder: the custom-words wrapper around it and
    EmbeddingsWithFixes in place of the text model's token embedding (one hijack per text
    model, as A1111 has one model_hijack)."""
    text, tokenizer = wrapped.transformer, wrapped.tokenizer
    if not isinstance(text.emb, custom_words.EmbeddingsWithFixes):
        text.emb = custom_words.EmbeddingsWithFixes(text.emb, custom_words.Hijack())
    return custom_words.CustomWords(
        wrapped, text.emb.embeddings,
        tokenize=lambda texts: tokenizer(list(texts), truncation=False,
                                         add_special_tokens=False)["input_ids"],
        encode=lambda ids: text(input_ids=ids).last_hidden_state,
        id_start=tokenizer.bos_token_id, id_end=tokenizer.eos_token_id,
        id_pad=tokenizer.eos_token_id)


class A1111SD1:
    is_sd1, is_sd2, is_sdxl = True, False, False

    def __init__(self, unet=None, text=None, tokenizer=None, hijacked=True):
        self.model = SimpleNamespace(diffusion_model=unet or tiny_ldm_unet())
        wrapped = SimpleNamespace(tokenizer=tokenizer or clip_tokenizer(),
                                  transformer=text or TinyTextModel())
        self.cond_stage_model = hijack_sd1(wrapped) if hijacked else \
            SimpleNamespace(wrapped=wrapped)

    def get_learned_conditioning(self, texts):
        ccm = self.cond_stage_model
        if isinstance(ccm, custom_words.CustomWords):
            z = ccm(list(texts))
        else:
            z = ccm.wrapped.transformer(input_ids=tokens(ccm.wrapped.tokenizer, texts))
            z = z.last_hidden_state
        return emphasis_original(z, texts)

    def unet_for_sampling(self):
        return self.model.diffusion_model

    def pooled(self, texts):  # the reference the hypernetwork must read
        w = self.cond_stage_model.wrapped
        return w.transformer(input_ids=tokens(w.tokenizer, texts)).pooler_output


class FakeEngine:
    def __init__(self, tokenizer, text):
        self.tokenizer, self.text, self.return_pooled = tokenizer, text, False

    def __call__(self, texts):
        out = self.text(input_ids=tokens(self.tokenizer, texts))
        z = out.last_hidden_state
        return (z, out.pooler_output) if self.return_pooled else z


class ForgeSD1:
    is_sd1 = True

    def __init__(self, unet=None, text=None, tokenizer=None):
        unet = unet or tiny_ldm_unet()
        self.forge_objects = SimpleNamespace(
            unet=SimpleNamespace(model=SimpleNamespace(diffusion_model=unet)),
            clip=SimpleNamespace(patcher=None))
        self.text_processing_engine = FakeEngine(tokenizer or clip_tokenizer(),
                                                 text or TinyTextModel())

    def get_learned_conditioning(self, texts):
        return self.text_processing_engine(texts)

    def unet_for_sampling(self):
        return self.forge_objects.unet.model.diffusion_model

    def pooled(self, texts):
        e = self.text_processing_engine
        return e.text(input_ids=tokens(e.tokenizer, texts)).pooler_output


class A1111SDXL:
    """refiner=True: the SDXL refiner (clip_g alone: context 1280, vector 2560)."""

    is_sdxl = True

    def __init__(self, tokenizer=None, refiner=False):
        self.refiner = refiner
        self.model = SimpleNamespace(diffusion_model=tiny_ldm_unet(
            context_dim=1280, adm=2560) if refiner else tiny_ldm_unet(context_dim=2048, adm=2816))
        self.tokenizer = tokenizer or clip_tokenizer()
        self.text_l, self.text_g = TinyTextModel(768, seed=2), TinyTextModel(1280, seed=3)
        self.size = torch.linspace(-1, 1, 1280 if refiner else 1536)

    def get_learned_conditioning(self, texts):
        ids = tokens(self.tokenizer, texts)
        out_l, out_g = self.text_l(input_ids=ids), self.text_g(input_ids=ids)
        cross = out_g.last_hidden_state if self.refiner else \
            torch.cat([out_l.last_hidden_state, out_g.last_hidden_state], dim=2)
        pooled = self.pooled([first_chunk_text(t) for t in texts])
        vector = torch.cat([pooled, self.size.expand(len(texts), -1)], dim=1)
        return {"crossattn": cross, "vector": vector}

    def unet_for_sampling(self):
        return self.model.diffusion_model

    def pooled(self, texts):
        return self.text_g(input_ids=tokens(self.tokenizer, texts)).pooler_output


class ForgeFlux:
    is_flux = True  # read by the processing stand-in only (timestep = sigma)

    def __init__(self, transformer=None, tokenizer=None, distilled_cfg_scale=3.5):
        import bfl_flux

        self.reference = bfl_flux.tiny_diffusers_flux()
        transformer = transformer or bfl_flux.from_diffusers(self.reference)
        self.forge_objects = SimpleNamespace(
            unet=SimpleNamespace(model=SimpleNamespace(diffusion_model=transformer)),
            clip=SimpleNamespace(patcher=None))
        tokenizer = tokenizer or clip_tokenizer()
        self.text_processing_engine_l = FakeEngine(tokenizer, TinyTextModel(768, seed=4))
        self.text_processing_engine_l.return_pooled = True
        self.text_processing_engine_t5 = FakeEngine(
            tokenizer, TinyTextModel(self.reference.config.joint_attention_dim, seed=5))
        self.distilled_cfg_scale = distilled_cfg_scale

    def get_learned_conditioning(self, texts):
        # Forge's engines tokenize the text with the emphasis syntax parsed out: "(car)" pools
        # as "car" (the weights only scale the hidden states); the pooled output is the first
        # chunk's, which a BREAK ends
        _, pooled_l = self.text_processing_engine_l([first_chunk_text(t) for t in texts])
        cond_t5 = self.text_processing_engine_t5(texts)
        return {"crossattn": cond_t5, "vector": pooled_l,
                "guidance": torch.full((len(texts),), float(self.distilled_cfg_scale))}

    def unet_for_sampling(self):
        return self.forge_objects.unet.model.diffusion_model

    def pooled(self, texts):
        return self.text_processing_engine_l(texts)[1]


def tiny_open_clip(layers: int = 2, width: int = 64, heads: int = 4):
    """A tiny open_clip CLIP (SD2's text encoder class), text projection the identity."""
    from tests.helpers import tiny_open_clip_model

    return tiny_open_clip_model(layers, width, heads)


def sd2_trained_embedding(model, texts, tmp_dir):
    from tests.helpers import sd2_trained_embedding as reference

    return reference(model, texts, tmp_dir)
