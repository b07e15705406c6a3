"""A BFL-layout single-file FLUX transformer through the trainer backend, at full width.

Real FLUX files (flux1-dev.safetensors, ComfyUI checkpoints) use BFL's names and fused layers
(`double_blocks.N.img_attn.qkv`, `single_blocks.N.linear1` = q|k|v|mlp, ...). diffusers'
converter hard-wires the full width (inner dim 3072, mlp ratio 4), so this test builds a
full-width but shallow FLUX (1 double + 1 single block, ~0.55 B parameters, bf16): zeros
everywhere except a few row-coded fused layers, whose rows must land where `unhype.naming`'s
BFL map says they live.
"""

import gc

import pytest
import torch
from safetensors.torch import save_file

from unhype.trainer.backends import load_backend
from unhype.trainer.backends.tiny import tiny_text_encoder, tiny_tokenizer
from unhype.trainer.backends.tiny_flux import flux_scheduler, tiny_t5_tokenizer
from unhype.trainer.config import resolve
from unhype.families import get_family
from unhype.naming import flux_inner_dim, host_path

H, HEAD, MLP = 3072, 128, 4 * 3072  # what the converter assumes (24 heads x 128, mlp ratio 4)
IN, TXT, VEC, TIME = 64, 4096, 768, 256

CONFIG = {"patch_size": 1, "in_channels": IN, "num_layers": 1, "num_single_layers": 1,
          "attention_head_dim": HEAD, "num_attention_heads": H // HEAD,
          "joint_attention_dim": TXT, "pooled_projection_dim": VEC, "guidance_embeds": True,
          "axes_dims_rope": [16, 56, 56]}

# fused BFL layers filled with codes: (tag, row // 128, row % 128) in the first three columns,
# all exact in bf16 (integers up to 256)
CODED = {"double_blocks.0.img_attn.qkv": 1, "double_blocks.0.txt_attn.qkv": 2,
         "double_blocks.0.img_attn.proj": 3, "double_blocks.0.txt_attn.proj": 4,
         "single_blocks.0.linear1": 5, "final_layer.adaLN_modulation.1": 6}

# the velocity of a model whose proj_out weight is zero is proj_out's bias
OUT_BIAS = ((torch.arange(IN) - 32) / 8).to(torch.bfloat16)


def bfl_shapes() -> dict[str, tuple]:
    """Every tensor of BFL's FLUX.1 transformer with one double and one single block."""
    shapes = {"img_in": (H, IN), "txt_in": (H, TXT), "final_layer.linear": (IN, H),
              "final_layer.adaLN_modulation.1": (2 * H, H)}
    for name, width in (("time_in", TIME), ("vector_in", VEC), ("guidance_in", TIME)):
        shapes[f"{name}.in_layer"] = (H, width)
        shapes[f"{name}.out_layer"] = (H, H)
    for s in ("img", "txt"):
        p = f"double_blocks.0.{s}_"
        shapes.update({p + "mod.lin": (6 * H, H), p + "attn.qkv": (3 * H, H),
                       p + "attn.proj": (H, H), p + "mlp.0": (MLP, H), p + "mlp.2": (H, MLP)})
    shapes.update({"single_blocks.0.linear1": (3 * H + MLP, H),
                   "single_blocks.0.linear2": (H, H + MLP),
                   "single_blocks.0.modulation.lin": (3 * H, H)})
    out = {}
    for name, shape in shapes.items():
        out[name + ".weight"], out[name + ".bias"] = shape, shape[:1]
    for p in ("double_blocks.0.img_attn.norm", "double_blocks.0.txt_attn.norm",
              "single_blocks.0.norm"):
        out[p + ".query_norm.scale"] = out[p + ".key_norm.scale"] = (HEAD,)
    return out


def write_bfl_file(path, prefix: str = "") -> None:
    tensors = {}
    for name, shape in bfl_shapes().items():
        t = torch.zeros(shape, dtype=torch.bfloat16)
        layer = name.rsplit(".", 1)[0]
        if name.endswith(".weight") and layer in CODED:
            rows = torch.arange(shape[0])
            t[:, 0], t[:, 1], t[:, 2] = CODED[layer], rows // 128, rows % 128
        tensors[prefix + name] = t
    tensors[prefix + "final_layer.linear.bias"] = OUT_BIAS.clone()
    save_file(tensors, str(path))
    del tensors
    gc.collect()


def decode(weight: torch.Tensor) -> tuple[set, torch.Tensor]:
    """(source tags, row indices in the source BFL tensor) of a loaded row-coded weight."""
    w = weight[:, :3].float()
    return set(w[:, 0].long().tolist()), (w[:, 1] * 128 + w[:, 2]).long()


def write_config_folder(path):
    """transformer/config.json of the shallow model + tiny text encoders (T5 at 4096 wide)."""
    from diffusers import FluxTransformer2DModel
    from transformers import T5Config, T5EncoderModel

    with torch.device("meta"):
        FluxTransformer2DModel(**CONFIG).save_config(path / "transformer")
    flux_scheduler().save_pretrained(path / "scheduler")
    tiny_tokenizer().save_pretrained(path / "tokenizer")
    tiny_text_encoder(VEC).save_pretrained(path / "text_encoder")
    tokenizer_2 = tiny_t5_tokenizer()
    tokenizer_2.save_pretrained(path / "tokenizer_2")
    torch.manual_seed(0)
    T5EncoderModel(T5Config(vocab_size=len(tokenizer_2), d_model=TXT, d_kv=8, d_ff=16,
                            num_layers=1, num_heads=2, decoder_start_token_id=0,
                            pad_token_id=0, eos_token_id=1)).save_pretrained(
        path / "text_encoder_2")
    return path


@pytest.fixture(scope="module")
def config_folder(tmp_path_factory):
    return write_config_folder(tmp_path_factory.mktemp("flux_bfl_config"))


def load(path, config_folder):
    return load_backend(resolve({"pretrained_model_name_or_path": str(path),
                                 "model_config": str(config_folder), "mixed_precision": "bf16",
                                 "resolution": 16, "device": "cpu"}))


def check_loaded(backend):
    family = get_family("flux")
    assert backend.family.name == "flux" and "single-file" in backend.description
    assert backend.distilled and backend.embedded_guidance == 3.5
    transformer = backend.unet
    params = dict(transformer.named_parameters())
    # diffusers does not report missing keys: every parameter must have come from the file
    assert all(p.device.type == "cpu" and p.dtype == torch.bfloat16 for p in params.values())
    assert sum(p.numel() for p in params.values()) == sum(
        torch.Size(s).numel() for s in bfl_shapes().values())

    # every q/k/v projection is the row slice of its fused BFL layer that naming.py names
    sliced = [f"transformer_blocks.0.attn.{op}" for op in (
        "to_q", "to_k", "to_v", "add_q_proj", "add_k_proj", "add_v_proj", "to_out.0",
        "to_add_out")] + [f"single_transformer_blocks.0.attn.{op}" for op in (
            "to_q", "to_k", "to_v")]
    for path in sliced:
        weight = transformer.get_submodule(path).weight
        hp = host_path(family, path, "ldm", weight.shape[0])
        assert hp == host_path(family, path, "ldm")  # the reference width is this width
        tags, rows = decode(weight)
        start, stop = hp.out_slice or (0, H)
        assert tags == {CODED[hp.path]}, path
        assert torch.equal(rows, torch.arange(start, stop)), path
    # single block: linear1 = q | k | v | mlp, the mlp part into proj_mlp
    tags, rows = decode(transformer.single_transformer_blocks[0].proj_mlp.weight)
    assert tags == {CODED["single_blocks.0.linear1"]}
    assert torch.equal(rows, torch.arange(3 * H, 3 * H + MLP))
    # the final modulation swaps BFL's (shift, scale) into diffusers' (scale, shift)
    _, rows = decode(transformer.norm_out.linear.weight)
    assert torch.equal(rows, torch.cat([torch.arange(H, 2 * H), torch.arange(H)]))

    # the paper preset resolves in the loaded transformer, full-width shapes
    targets = family.targets("paper", model=transformer)
    assert sorted(t.path for t in targets) == [
        "single_transformer_blocks.0.attn.to_v", "transformer_blocks.0.attn.add_v_proj",
        "transformer_blocks.0.attn.to_out.0", "transformer_blocks.0.attn.to_v"]
    for t in targets:
        assert (t.in_dim, t.out_dim) == (H, H)
        assert transformer.get_submodule(t.path).weight.shape == (t.out_dim, t.in_dim)
    assert flux_inner_dim(family) == H

    # the full-width model runs through the backend: T5 (4096-d) + CLIP-L text, packed latent
    cond = backend.encode(["a photo of a cat"])
    z = backend.initial_noise(1, torch.Generator().manual_seed(0))
    velocity = backend.predict(z, torch.tensor([500.0]), cond)
    assert velocity.shape == (1, 1, IN)  # 16 px / 8 -> 2x2 latent -> one 64-value token
    assert torch.equal(velocity[0, 0], OUT_BIAS.float())


@pytest.mark.parametrize("prefix", ["", "model.diffusion_model."])
def test_bfl_single_file_full_width_shallow(prefix, config_folder, tmp_path):
    single = tmp_path / "flux1-shallow.safetensors"
    write_bfl_file(single, prefix)
    backend = load(single, config_folder)
    try:
        check_loaded(backend)
    finally:
        del backend
        single.unlink()
        gc.collect()
