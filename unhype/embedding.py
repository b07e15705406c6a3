"""The prompt embedding each family's hypernetwork reads, computed with transformers' CLIP.

SD1/SD2/FLUX: ``CLIPTextModel.pooler_output`` (EOS token after the final layer norm,
unprojected). SDXL: ``CLIPTextModelWithProjection.text_embeds`` of the second (bigG) encoder.
Toy: the toy CLIP's pooled output. SD2's is the penultimate OpenCLIP-H layer's (diffusers'
SD2 text encoder drops the last layer). Hosts that already hold this vector (ComfyUI's
``pooled_output``, except SD2's: the last layer, projected) pass it straight to the
hypernetwork.
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


# family -> (key prefix of its embedding's text encoder in an A1111 / ComfyUI checkpoint,
# subfolder of the built-in config, built-in config); SD2's two configs share the encoder
CHECKPOINT_TEXT = {"sd1": ("cond_stage_model.transformer.", "text_encoder", "sd15"),
                   "sd2": ("cond_stage_model.model.", "text_encoder", "sd2-v"),
                   "sdxl": ("conditioner.embedders.1.model.", "text_encoder_2", "sdxl-base")}
CLIP_L_FILE_KEY = "text_model.embeddings.token_embedding.weight"  # a standalone CLIP-L file
# ComfyUI's all-in-one FLUX checkpoints (CheckpointSave, Comfy-Org's fp8 files): the Flux model
# config's text_encoder_key_prefix "text_encoders." + FluxClipModel's clip_l (an SDClipModel,
# whose HF-named CLIP is .transformer)
COMFY_FLUX_CLIP_L = "text_encoders.clip_l.transformer."


def load_embedder(family, path: str | None = None, device="cpu") -> PromptEmbedder:
    """Text encoder for `family` from a diffusers pipeline folder, a text-encoder folder, or a
    single `.safetensors` file: an A1111 / ComfyUI checkpoint (SD1, SD2, SDXL; FLUX when ComfyUI
    saved it with its text encoders), or a standalone CLIP-L text encoder (ComfyUI's
    ``clip_l.safetensors``: SD1, FLUX)."""
    if family.name in ("toy", "toy_flux"):
        from unhype.toy.model import load_toy

        return PromptEmbedder(family, None, load_toy(device=device))
    if not path:
        raise UnHypeError(f"family {family.name} needs --text_encoder: a diffusers pipeline "
                          "folder (or its text encoder folder) for the embedding "
                          f"{family.embedding.source}")
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    root = Path(path)
    if root.is_file():
        return _single_file_embedder(family, root, device)
    enc_dir, tok_dir = root, root
    sub = "text_encoder_2" if family.name == "sdxl" else "text_encoder"
    tok_sub = "tokenizer_2" if family.name == "sdxl" else "tokenizer"
    if (root / sub).is_dir():
        enc_dir, tok_dir = root / sub, root / tok_sub
    if not (enc_dir / "config.json").is_file():
        raise UnHypeError(f"{enc_dir} holds no transformers text encoder (config.json missing)")
    if not has_tokenizer(tok_dir):  # a text encoder folder alone: its pipeline's tokenizer
        tok_dir = enc_dir.parent / tok_sub
    if not has_tokenizer(tok_dir):
        # transformers would build an empty-vocabulary tokenizer and read every prompt as the
        # same few ids; CLIP's own BPE (the built-in configs') is what every SD CLIP uses
        tok_dir = builtin_tokenizer(family)
        import sys

        print(f"unhype: no tokenizer beside {enc_dir}; using CLIP's BPE tokenizer "
              f"({tok_dir})", file=sys.stderr)
    cls = CLIPTextModelWithProjection if family.name == "sdxl" else CLIPTextModel
    encoder = cls.from_pretrained(enc_dir, use_safetensors=True).to(device).eval()
    tokenizer = CLIPTokenizer.from_pretrained(tok_dir)
    if len(tokenizer) > encoder.config.vocab_size:
        raise UnHypeError(f"the tokenizer in {tok_dir} has {len(tokenizer)} tokens, the text "
                          f"encoder in {enc_dir} {encoder.config.vocab_size}: they do not "
                          "belong together")
    return PromptEmbedder(family, tokenizer, encoder)


def has_tokenizer(folder: Path) -> bool:
    """A CLIP tokenizer's files are in `folder` (slow: vocab + merges; fast: tokenizer.json)."""
    return ((folder / "vocab.json").is_file() and (folder / "merges.txt").is_file()) or \
        (folder / "tokenizer.json").is_file()


def builtin_tokenizer(family) -> Path:
    """The built-in config's tokenizer folder for `family`'s embedding encoder (OpenAI's CLIP
    vocabulary; the pad token as the family's reference repository sets it)."""
    from unhype.model_configs import config_folder

    name = CHECKPOINT_TEXT.get(family.name, ("", "text_encoder", "sd15"))[2]
    sub = "tokenizer_2" if family.name == "sdxl" else "tokenizer"
    return config_folder(name) / sub


def _single_file_embedder(family, path: Path, device) -> PromptEmbedder:
    """The embedding's text encoder read from one .safetensors file, with the built-in configs
    (unhype.model_configs) for its architecture; only that encoder's tensors are read."""
    from safetensors import safe_open
    from transformers import CLIPTokenizer

    from unhype.model_check import checkpoint_family, header_of
    from unhype.model_configs import config_folder

    if path.suffix.lower() != ".safetensors":
        raise UnHypeError(f"{path}: only .safetensors files are read (no .ckpt/.pt pickles)")
    try:
        with safe_open(str(path), framework="pt") as f:
            header = header_of(f)
            keys = header.keys
            clip_l = _clip_l_prefix(header, family.name, path)
            if clip_l is not None:
                folder = config_folder("sd15")
                tensors = {k.removeprefix(clip_l): f.get_tensor(k) for k in keys
                           if k.startswith(clip_l + "text_model.")}
                encoder = _clip_l_from_tensors(folder, tensors, path)
                tok_sub = "tokenizer"
            else:
                found = checkpoint_family(path, header)
                if family.name not in CHECKPOINT_TEXT or found != family.name:
                    raise UnHypeError(wrong_checkpoint(path, family.name, found, header))
                prefix, sub, name = CHECKPOINT_TEXT[family.name]
                folder = config_folder(name)
                tensors = {k: f.get_tensor(k) for k in keys if k.startswith(prefix)}
                encoder = _checkpoint_text_encoder(family, folder, sub, tensors, path)
                tok_sub = sub.replace("text_encoder", "tokenizer")
    except UnHypeError:
        raise
    except Exception as exc:  # a corrupt or truncated file
        raise UnHypeError(f"{path}: not a readable .safetensors file ({exc})") from None
    if any(p.is_meta for p in encoder.parameters()):
        raise UnHypeError(f"{path}: its text encoder is incomplete (tensors missing)")
    tokenizer = CLIPTokenizer.from_pretrained(folder / tok_sub)
    return PromptEmbedder(family, tokenizer, encoder.to(device).eval())


def _clip_l_prefix(header, family: str, path: Path) -> str | None:
    """Where a file's CLIP-L text encoder sits (`header`: model_check's of `path`): '' in a
    standalone CLIP-L file (SD1, FLUX), COMFY_FLUX_CLIP_L in ComfyUI's all-in-one FLUX
    checkpoint; None: neither."""
    from unhype.model_check import checkpoint_family

    keys = header.shapes
    if CLIP_L_FILE_KEY in keys and family in ("sd1", "flux"):
        return ""
    if family == "flux" and COMFY_FLUX_CLIP_L + CLIP_L_FILE_KEY in keys and \
            checkpoint_family(path, header) == "flux":
        return COMFY_FLUX_CLIP_L
    return None


def wrong_checkpoint(path: Path, family: str, found: str | None, header) -> str:
    """Why checkpoint `path` (of family `found`, as model_check reads it from `header`) gives
    no embedding for a hypernetwork of `family`."""
    from unhype.model_check import article, unsupported_checkpoint

    if family == "flux" and found == "flux":
        return (f"{path} is a FLUX transformer file: it holds no CLIP-L text encoder; pass "
                "FLUX's clip_l.safetensors (ComfyUI models/clip or models/text_encoders) or "
                "the FLUX.1 diffusers folder")
    unsupported = unsupported_checkpoint(path, header)
    if unsupported:
        what = f"{unsupported.text}, which UnHype does not support;"
    elif found in (None, "unknown"):
        what = "not an SD or FLUX.1 checkpoint;"
    else:
        what = f"{article(found)} {found} checkpoint, but"
    if family == "flux":
        give = "FLUX's clip_l.safetensors or the FLUX.1 diffusers folder"
    else:
        give = f"the {family} model's checkpoint or diffusers folder"
    return f"{path} is {what} this hypernetwork is for {family}: give {give}"


def _checkpoint_text_encoder(family, folder: Path, sub: str, tensors: dict, path: Path):
    from diffusers.loaders.single_file_utils import create_diffusers_clip_model_from_ldm
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    cls = CLIPTextModelWithProjection if family.name == "sdxl" else CLIPTextModel
    try:
        return create_diffusers_clip_model_from_ldm(cls, tensors, subfolder=sub,
                                                    config=str(folder),
                                                    torch_dtype=torch.float32,
                                                    local_files_only=True)
    except Exception as exc:
        raise UnHypeError(f"{path}: its {family.name} text encoder could not be read "
                          f"({type(exc).__name__}: {exc})") from None


def _clip_l_from_tensors(folder: Path, tensors: dict, path: Path):
    from transformers import CLIPTextConfig, CLIPTextModel

    encoder = CLIPTextModel(CLIPTextConfig.from_pretrained(folder / "text_encoder"))
    if not hasattr(encoder, "text_model"):  # transformers >= 5.6: no text_model level
        tensors = {k.removeprefix("text_model."): v for k, v in tensors.items()}
    own = encoder.state_dict()
    missing = sorted(set(own) - set(tensors) - {"text_model.embeddings.position_ids",
                                                 "embeddings.position_ids"})
    wrong = [k for k in own if k in tensors and tensors[k].shape != own[k].shape]
    if missing or wrong:
        raise UnHypeError(f"{path}: not a CLIP-L text encoder ("
                          + (f"missing {missing[:3]}" if missing else f"shapes of {wrong[:3]}")
                          + ")")
    encoder.load_state_dict({k: v.float() for k, v in tensors.items() if k in own},
                            strict=False)
    return encoder
