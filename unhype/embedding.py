"""The prompt embedding each family's hypernetwork reads, computed with transformers' CLIP.

SD1/SD2/FLUX: ``CLIPTextModel.pooler_output`` (EOS token after the final layer norm,
unprojected). SDXL: ``CLIPTextModelWithProjection.text_embeds`` of the second (bigG) encoder.
Toy: the toy CLIP's pooled output. Hosts that already hold this vector (ComfyUI's
``pooled_output``) pass it straight to the hypernetwork.
"""

from __future__ import annotations

from pathlib import Path

import torch

from unhype.errors import UnHypeError


class PromptEmbedder:
    def __init__(self, family, tokenizer, text_encoder):
        self.family, self.tokenizer, self.text_encoder = family, tokenizer, text_encoder

    @torch.no_grad()
    def __call__(self, prompts: list[str]) -> torch.Tensor:
        if self.family.name in ("toy", "toy_flux"):  # the toy CLIP, shared by both toys
            return self.text_encoder.encode_prompts(list(prompts))[1].float()
        max_length = min(self.tokenizer.model_max_length,
                         self.text_encoder.config.max_position_embeddings)
        tokens = self.tokenizer(list(prompts), padding="max_length", truncation=True,
                                max_length=max_length, return_tensors="pt")
        out = self.text_encoder(tokens.input_ids.to(self.text_encoder.device))
        vec = out.text_embeds if self.family.name == "sdxl" else out.pooler_output
        if vec.shape[-1] != self.family.embedding.dim:
            raise UnHypeError(f"text encoder gives {vec.shape[-1]}-d vectors; family "
                              f"{self.family.name} reads {self.family.embedding.source} "
                              f"({self.family.embedding.dim})")
        return vec.float()


def load_embedder(family, path: str | None = None, device="cpu") -> PromptEmbedder:
    """Text encoder for `family` from a diffusers pipeline folder or a text-encoder folder."""
    if family.name in ("toy", "toy_flux"):
        from unhype.toy.model import load_toy

        return PromptEmbedder(family, None, load_toy(device=device))
    if not path:
        raise UnHypeError(f"family {family.name} needs --text_encoder: a diffusers pipeline "
                          "folder (or its text encoder folder) for the embedding "
                          f"{family.embedding.source}")
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    root = Path(path)
    enc_dir, tok_dir = root, root
    sub = "text_encoder_2" if family.name == "sdxl" else "text_encoder"
    tok_sub = "tokenizer_2" if family.name == "sdxl" else "tokenizer"
    if (root / sub).is_dir():
        enc_dir, tok_dir = root / sub, root / tok_sub
    if not (enc_dir / "config.json").is_file():
        raise UnHypeError(f"{enc_dir} holds no transformers text encoder (config.json missing)")
    cls = CLIPTextModelWithProjection if family.name == "sdxl" else CLIPTextModel
    encoder = cls.from_pretrained(enc_dir, use_safetensors=True).to(device).eval()
    tokenizer = CLIPTokenizer.from_pretrained(tok_dir)
    return PromptEmbedder(family, tokenizer, encoder)
