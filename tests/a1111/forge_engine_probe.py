"""Run by tests/a1111/test_forge_text_engine.py in a process of its own: builds Forge's real
text engines (``backend.text_processing.classic_engine`` with Forge's own text-encoder configs
and tokenizers from ``FORGE_PATH/backend/huggingface``, a few layers, random weights), reads
prompts' vectors through the extension's ``host.pooled_embeddings`` and through unhype's
embedder (the trainer's vector) on the same weights, and prints their largest difference per
case as JSON. Its own process: Forge's ``backend`` reads ``sys.argv`` and sets torch up on
import, which must not reach the other tests."""

from __future__ import annotations

import json
import os
import sys
import types
from pathlib import Path
from types import SimpleNamespace

ROOT = Path(__file__).resolve().parents[2]
FORGE = Path(os.environ["FORGE_PATH"])

PROMPTS = [
    "a photo of a cat",
    "a (red:1.3) dog on a [mat]",
    "ganyu \\(genshin impact\\), 1girl",
    "a cat BREAK in a garden",
    "a watercolour of " + ", ".join(f"a cat number {i}" for i in range(30)),  # > 75 tokens
]
CASES = {  # family: (Forge's folder, engine kwargs as Forge's diffusion engine passes them)
    "sd1": ("runwayml/stable-diffusion-v1-5", dict(embedding_key="clip_l",
                                                  embedding_expected_shape=768)),
    "sd2": ("stabilityai/stable-diffusion-2-1", dict(embedding_key="clip_h",
                                                     embedding_expected_shape=1024)),
    "flux": ("black-forest-labs/FLUX.1-dev", dict(embedding_key="clip_l",
                                                 embedding_expected_shape=768,
                                                 return_pooled=True)),
}


def _forge_imports():
    sys.argv = [sys.argv[0], "--always-cpu"]  # backend.args parses the command line on import
    sys.path.insert(0, str(FORGE))
    shared = types.ModuleType("modules.shared")
    # the options Forge's engine reads, at the web UI's defaults
    shared.opts = SimpleNamespace(emphasis="Original", CLIP_stop_at_last_layers=1,
                                  comma_padding_backtrack=20,
                                  textual_inversion_add_hashes_to_infotext=False)
    modules = types.ModuleType("modules")
    modules.shared = shared
    sys.modules.update({"modules": modules, "modules.shared": shared})
    from backend.nn.clip import IntegratedCLIP
    from backend.patcher.clip import CLIP
    from backend.text_processing.classic_engine import ClassicTextProcessingEngine

    return IntegratedCLIP, CLIP, ClassicTextProcessingEngine


def main():
    import torch
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    tiny = CLIPTextConfig(hidden_size=8, intermediate_size=8, num_hidden_layers=1,
                          num_attention_heads=1, vocab_size=10, max_position_embeddings=8)
    if not hasattr(CLIPTextModel(tiny), "text_model"):  # Forge's engine reads .text_model
        import transformers

        print(f"SKIP Forge's text engine needs a transformers whose CLIPTextModel has "
              f".text_model (before 5.6; this is {transformers.__version__})")
        return
    sys.path[:0] = [str(ROOT / "a1111_extension"), str(ROOT)]
    IntegratedCLIP, CLIP, Engine = _forge_imports()
    from unhype_webui import host

    from unhype.embedding import PromptEmbedder, builtin_tokenizer
    from unhype.families import get_family
    from unhype.prompt_tags import plain_text

    torch.set_num_threads(1)
    out = {}
    for family, (folder, kwargs) in CASES.items():
        hf = FORGE / "backend" / "huggingface" / folder
        config = CLIPTextConfig.from_pretrained(hf / "text_encoder")
        config.num_hidden_layers = 2  # Forge's config otherwise (widths, ids, activation)
        torch.manual_seed(0)
        encoder = IntegratedCLIP(CLIPTextModel, config).eval()
        tokenizer = CLIPTokenizer.from_pretrained(hf / "tokenizer")
        key = kwargs["embedding_key"]
        clip = CLIP(model_dict={key: encoder}, tokenizer_dict={key: tokenizer})
        engine = Engine(text_encoder=getattr(clip.cond_stage_model, key),
                        tokenizer=getattr(clip.tokenizer, key), embedding_dir=None,
                        emphasis_name="Original", text_projection=False,
                        minimal_clip_skip=1, clip_skip=1, final_layer_norm=True,
                        **{"return_pooled": False, **kwargs})
        sd_model = SimpleNamespace(forge_objects=SimpleNamespace(clip=clip))
        setattr(sd_model, "text_processing_engine_l" if family == "flux"
                else "text_processing_engine", engine)
        texts = [plain_text(p) for p in PROMPTS]
        fam = get_family(family)
        trained = PromptEmbedder(fam, CLIPTokenizer.from_pretrained(builtin_tokenizer(fam)),
                                 encoder.transformer)(texts)
        got = host.pooled_embeddings(sd_model, family, texts)
        engine.clip_skip = 2  # CLIP skip changes the conditioning, not the pooled vector
        skipped = host.pooled_embeddings(sd_model, family, texts)
        out[family] = {
            "per_prompt": (got - trained).abs().amax(1).tolist(),
            "clip_skip_2": float((skipped - trained).abs().max()),
            "emphasis_as_words": float((got[1] - PromptEmbedder(
                fam, tokenizer, encoder.transformer)([PROMPTS[1]])[0]).abs().max()),
            "scale": float(trained.abs().max()),
        }
        if family == "flux":  # the sampling path: the vector of Forge's own conditioning
            with torch.inference_mode():
                _, pooled = engine(PROMPTS[:3])  # flux.py get_learned_conditioning's pooled_l
            cond = {"vector": torch.cat([pooled, torch.zeros(3, 16)], 1)}
            out[family]["cond_vector"] = float((host.pooled_embeddings(
                sd_model, family, PROMPTS[:3], cond) - trained[:3]).abs().max())
    out["sdxl"] = _sdxl(IntegratedCLIP, CLIP, Engine)
    print("RESULT " + json.dumps(out))


def _sdxl(IntegratedCLIP, CLIP, Engine):
    """SDXL: the vector of Forge's own SDXL conditioning (``StableDiffusionXL.
    get_learned_conditioning``, run on a stand-in ``self`` that carries Forge's two engines as
    its constructor builds them) against CLIPTextModelWithProjection's text_embeds."""
    import torch
    from transformers import (CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection,
                              CLIPTokenizer)

    sys.modules["huggingface_guess"] = types.SimpleNamespace(  # only its model list is read
        model_list=types.SimpleNamespace(SDXL=None, SDXLRefiner=None))
    sys.modules["modules.shared"].opts.__dict__.update(sdxl_crop_left=0, sdxl_crop_top=0)
    from backend.diffusion_engine.sdxl import StableDiffusionXL
    from backend.nn.unet import Timestep
    from unhype_webui import host

    from unhype.embedding import PromptEmbedder, builtin_tokenizer
    from unhype.families import get_family
    from unhype.prompt_tags import plain_text

    hf = FORGE / "backend" / "huggingface" / "stabilityai" / "stable-diffusion-xl-base-1.0"
    models, tokenizers = {}, {}
    for key, sub, projected in (("clip_l", "", False), ("clip_g", "_2", True)):
        config = CLIPTextConfig.from_pretrained(hf / f"text_encoder{sub}")
        config.num_hidden_layers = 2
        torch.manual_seed(1)
        models[key] = IntegratedCLIP(CLIPTextModel, config, add_text_projection=projected)
        models[key].eval()
        tokenizers[key] = CLIPTokenizer.from_pretrained(hf / f"tokenizer{sub}")
    clip = CLIP(model_dict=models, tokenizer_dict=tokenizers)
    engines = {key: Engine(text_encoder=getattr(clip.cond_stage_model, key),
                           tokenizer=getattr(clip.tokenizer, key), embedding_dir=None,
                           embedding_key=key, embedding_expected_shape=config.hidden_size,
                           emphasis_name="Original", text_projection=key == "clip_g",
                           minimal_clip_skip=2, clip_skip=2, return_pooled=key == "clip_g",
                           final_layer_norm=False)  # as sdxl.py's constructor
               for key, config in (("clip_l", models["clip_l"].transformer.config),
                                   ("clip_g", models["clip_g"].transformer.config))}
    sd_model = types.SimpleNamespace(
        forge_objects=types.SimpleNamespace(clip=clip), embedder=Timestep(256),
        text_processing_engine_l=engines["clip_l"], text_processing_engine_g=engines["clip_g"])
    with torch.inference_mode():
        cond = StableDiffusionXL.get_learned_conditioning(sd_model, PROMPTS[:4])
    got = host.pooled_embeddings(sd_model, "sdxl", PROMPTS[:4], cond)

    g = models["clip_g"].transformer
    trainer_side = CLIPTextModelWithProjection(CLIPTextConfig(
        **{**g.config.to_dict(), "projection_dim": g.config.hidden_size})).eval()
    state = {k.replace(".wrapped.", "."): v for k, v in g.state_dict().items()  # TI wrapper
             if k.startswith("text_model.")}
    state["text_projection.weight"] = g.text_projection.weight
    trainer_side.load_state_dict(state)
    fam = get_family("sdxl")
    trained = PromptEmbedder(fam, CLIPTokenizer.from_pretrained(builtin_tokenizer(fam)),
                             trainer_side)([plain_text(p) for p in PROMPTS[:4]])
    return {"per_prompt": (got - trained).abs().amax(1).tolist(),
            "scale": float(trained.abs().max())}


if __name__ == "__main__":
    main()
