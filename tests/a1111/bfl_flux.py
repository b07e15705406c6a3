"""A tiny FLUX transformer in BFL's module layout, called as Forge calls its FLUX model.

Forge runs FLUX with ``backend/nn/flux.py`` ``IntegratedFluxTransformer2DModel``: BFL's
checkpoint names (``double_blocks.N.img_attn.qkv``, ``single_blocks.N.linear1`` = q|k|v|mlp,
...) and ``forward(x, timestep, context, y, guidance=None, **kwargs)`` on the unpacked latent
[B, C, H, W], timestep = sigma in [0, 1]. Forge cannot be installed here (and its file is
licensed for use inside Forge only), so this module is written from BFL's reference code
(github.com/black-forest-labs/flux, Apache-2.0) with the same names and call.

`from_diffusers` fills it from a tiny diffusers ``FluxTransformer2DModel`` (q/k/v fused, the
final norm's scale/shift halves swapped, as diffusers' own converter undoes), so the stand-in
is checked against diffusers: same inputs, same velocity (test_a1111_flux).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def rope(pos: torch.Tensor, dim: int, theta: int) -> torch.Tensor:
    scale = torch.arange(0, dim, 2, dtype=torch.float64, device=pos.device) / dim
    omega = 1.0 / (theta ** scale)
    out = pos.double().unsqueeze(-1) * omega
    out = torch.stack([out.cos(), -out.sin(), out.sin(), out.cos()], dim=-1)
    return out.view(*out.shape[:-1], 2, 2).float()


def apply_rope(xq, xk, freqs):
    def rotate(x):
        x_ = x.float().reshape(*x.shape[:-1], -1, 1, 2)
        return (freqs[..., 0] * x_[..., 0] + freqs[..., 1] * x_[..., 1]).reshape(x.shape).type_as(x)
    return rotate(xq), rotate(xk)


def attention(q, k, v, pe):
    q, k = apply_rope(q, k, pe)
    x = F.scaled_dot_product_attention(q, k, v)
    return x.permute(0, 2, 1, 3).flatten(2)  # B H L D -> B L (H D)


def timestep_embedding(t, dim, max_period=10000, time_factor=1000.0):
    t = time_factor * t
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32,
                                                             device=t.device) / half)
    args = t[:, None].float() * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class EmbedND(nn.Module):
    def __init__(self, theta, axes_dim):
        super().__init__()
        self.theta, self.axes_dim = theta, axes_dim

    def forward(self, ids):
        emb = torch.cat([rope(ids[..., i], self.axes_dim[i], self.theta)
                         for i in range(ids.shape[-1])], dim=-3)
        return emb.unsqueeze(1)


class MLPEmbedder(nn.Module):
    def __init__(self, in_dim, hidden_dim):
        super().__init__()
        self.in_layer = nn.Linear(in_dim, hidden_dim)
        self.silu = nn.SiLU()
        self.out_layer = nn.Linear(hidden_dim, hidden_dim)

    def forward(self, x):
        return self.out_layer(self.silu(self.in_layer(x)))


class RMSNorm(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        x_dtype = x.dtype
        x = x.float()
        rrms = torch.rsqrt(torch.mean(x ** 2, dim=-1, keepdim=True) + 1e-6)
        return (x * rrms).to(x_dtype) * self.scale


class QKNorm(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.query_norm, self.key_norm = RMSNorm(dim), RMSNorm(dim)

    def forward(self, q, k, v):
        return self.query_norm(q).to(v), self.key_norm(k).to(v)


class SelfAttention(nn.Module):
    def __init__(self, dim, num_heads, qkv_bias=True):
        super().__init__()
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.norm = QKNorm(dim // num_heads)
        self.proj = nn.Linear(dim, dim)


class Modulation(nn.Module):
    def __init__(self, dim, double):
        super().__init__()
        self.multiplier = 6 if double else 3
        self.lin = nn.Linear(dim, self.multiplier * dim)

    def forward(self, vec):
        return self.lin(F.silu(vec))[:, None, :].chunk(self.multiplier, dim=-1)


def _split_heads(qkv, heads):
    b, n, _ = qkv.shape
    return qkv.view(b, n, 3, heads, -1).permute(2, 0, 3, 1, 4)  # -> 3, B, H, L, D


def _mlp(hidden, ratio):
    return nn.Sequential(nn.Linear(hidden, int(hidden * ratio)), nn.GELU(approximate="tanh"),
                         nn.Linear(int(hidden * ratio), hidden))


class DoubleStreamBlock(nn.Module):
    def __init__(self, hidden, heads, mlp_ratio):
        super().__init__()
        self.heads = heads
        for s in ("img", "txt"):
            setattr(self, f"{s}_mod", Modulation(hidden, double=True))
            setattr(self, f"{s}_norm1", nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6))
            setattr(self, f"{s}_attn", SelfAttention(hidden, heads))
            setattr(self, f"{s}_norm2", nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6))
            setattr(self, f"{s}_mlp", _mlp(hidden, mlp_ratio))

    def forward(self, img, txt, vec, pe):
        img_mod, txt_mod = self.img_mod(vec), self.txt_mod(vec)
        img_q, img_k, img_v = _split_heads(
            self.img_attn.qkv((1 + img_mod[1]) * self.img_norm1(img) + img_mod[0]), self.heads)
        img_q, img_k = self.img_attn.norm(img_q, img_k, img_v)
        txt_q, txt_k, txt_v = _split_heads(
            self.txt_attn.qkv((1 + txt_mod[1]) * self.txt_norm1(txt) + txt_mod[0]), self.heads)
        txt_q, txt_k = self.txt_attn.norm(txt_q, txt_k, txt_v)
        attn = attention(torch.cat((txt_q, img_q), 2), torch.cat((txt_k, img_k), 2),
                         torch.cat((txt_v, img_v), 2), pe)
        txt_attn, img_attn = attn[:, :txt.shape[1]], attn[:, txt.shape[1]:]
        img = img + img_mod[2] * self.img_attn.proj(img_attn)
        img = img + img_mod[5] * self.img_mlp((1 + img_mod[4]) * self.img_norm2(img) + img_mod[3])
        txt = txt + txt_mod[2] * self.txt_attn.proj(txt_attn)
        txt = txt + txt_mod[5] * self.txt_mlp((1 + txt_mod[4]) * self.txt_norm2(txt) + txt_mod[3])
        return img, txt


class SingleStreamBlock(nn.Module):
    def __init__(self, hidden, heads, mlp_ratio):
        super().__init__()
        self.hidden, self.heads, self.mlp_hidden = hidden, heads, int(hidden * mlp_ratio)
        self.linear1 = nn.Linear(hidden, hidden * 3 + self.mlp_hidden)
        self.linear2 = nn.Linear(hidden + self.mlp_hidden, hidden)
        self.norm = QKNorm(hidden // heads)
        self.pre_norm = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        self.mlp_act = nn.GELU(approximate="tanh")
        self.modulation = Modulation(hidden, double=False)

    def forward(self, x, vec, pe):
        shift, scale, gate = self.modulation(vec)
        qkv, mlp = torch.split(self.linear1((1 + scale) * self.pre_norm(x) + shift),
                               [3 * self.hidden, self.mlp_hidden], dim=-1)
        q, k, v = _split_heads(qkv, self.heads)
        q, k = self.norm(q, k, v)
        out = self.linear2(torch.cat((attention(q, k, v, pe), self.mlp_act(mlp)), 2))
        return x + gate * out


class LastLayer(nn.Module):
    def __init__(self, hidden, out_channels):
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden, out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden, 2 * hidden))

    def forward(self, x, vec):
        shift, scale = self.adaLN_modulation(vec).chunk(2, dim=1)
        return self.linear((1 + scale[:, None, :]) * self.norm_final(x) + shift[:, None, :])


class BFLFlux(nn.Module):
    """BFL's FLUX.1 transformer; constructor arguments as Forge's (vec_in_dim, context_in_dim,
    hidden_size, ..., guidance_embed), `in_channels` of the latent (patchified x4)."""

    def __init__(self, in_channels=4, vec_in_dim=768, context_in_dim=32, hidden_size=32,
                 mlp_ratio=4.0, num_heads=2, depth=1, depth_single_blocks=1,
                 axes_dim=(4, 6, 6), theta=10000, guidance_embed=True):
        super().__init__()
        self.in_channels = in_channels * 4
        self.guidance_embed = guidance_embed
        self.pe_embedder = EmbedND(theta, list(axes_dim))
        self.img_in = nn.Linear(self.in_channels, hidden_size)
        self.time_in = MLPEmbedder(256, hidden_size)
        self.vector_in = MLPEmbedder(vec_in_dim, hidden_size)
        self.guidance_in = MLPEmbedder(256, hidden_size) if guidance_embed else nn.Identity()
        self.txt_in = nn.Linear(context_in_dim, hidden_size)
        self.double_blocks = nn.ModuleList(DoubleStreamBlock(hidden_size, num_heads, mlp_ratio)
                                           for _ in range(depth))
        self.single_blocks = nn.ModuleList(SingleStreamBlock(hidden_size, num_heads, mlp_ratio)
                                           for _ in range(depth_single_blocks))
        self.final_layer = LastLayer(hidden_size, self.in_channels)

    def inner_forward(self, img, img_ids, txt, txt_ids, timesteps, y, guidance=None):
        img = self.img_in(img)
        vec = self.time_in(timestep_embedding(timesteps, 256).to(img.dtype))
        if self.guidance_embed:
            if guidance is None:
                raise ValueError("Didn't get guidance strength for guidance distilled model.")
            vec = vec + self.guidance_in(timestep_embedding(guidance, 256).to(img.dtype))
        vec = vec + self.vector_in(y)
        txt = self.txt_in(txt)
        pe = self.pe_embedder(torch.cat((txt_ids, img_ids), dim=1))
        for block in self.double_blocks:
            img, txt = block(img=img, txt=txt, vec=vec, pe=pe)
        img = torch.cat((txt, img), 1)
        for block in self.single_blocks:
            img = block(img, vec=vec, pe=pe)
        return self.final_layer(img[:, txt.shape[1]:], vec)

    def forward(self, x, timestep, context, y, guidance=None, **kwargs):
        b, c, h, w = x.shape  # even h, w here (Forge pads odd sizes)
        img = x.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(
            b, h * w // 4, c * 4)
        img_ids = image_ids(h // 2, w // 2, x).expand(b, -1, -1)
        txt_ids = torch.zeros(b, context.shape[1], 3, dtype=x.dtype, device=x.device)
        out = self.inner_forward(img, img_ids, context, txt_ids, timestep, y, guidance)
        return out.view(b, h // 2, w // 2, c, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, c, h, w)


def image_ids(h_len: int, w_len: int, like: torch.Tensor) -> torch.Tensor:
    ids = torch.zeros(h_len, w_len, 3, dtype=like.dtype, device=like.device)
    ids[..., 1] += torch.arange(h_len, dtype=like.dtype)[:, None]
    ids[..., 2] += torch.arange(w_len, dtype=like.dtype)[None, :]
    return ids.reshape(1, h_len * w_len, 3)


def tiny_diffusers_flux(seed=0, in_channels=4, context=32, hidden=32, heads=2):
    """A tiny diffusers FLUX with random weights (the reference and the source of the stand-in)."""
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(seed)
    model = FluxTransformer2DModel(
        patch_size=1, in_channels=in_channels * 4, num_layers=1, num_single_layers=1,
        attention_head_dim=hidden // heads, num_attention_heads=heads,
        joint_attention_dim=context, pooled_projection_dim=768, guidance_embeds=True,
        axes_dims_rope=(4, 6, 6))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name and p.dim() == 1:
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=gen))
            else:
                p.copy_(0.08 * torch.randn(p.shape, generator=gen))
    return model.eval().requires_grad_(False)


def _pair(out, dst, src, weight=None):
    out[dst + ".weight"] = src.weight if weight is None else weight
    out[dst + ".bias"] = src.bias


def bfl_state_dict(dm) -> dict[str, torch.Tensor]:
    """BFL checkpoint tensors of a diffusers FluxTransformer2DModel."""
    out = {}
    _pair(out, "img_in", dm.x_embedder)
    _pair(out, "txt_in", dm.context_embedder)
    emb = dm.time_text_embed
    for bfl, module in (("time_in", emb.timestep_embedder), ("guidance_in", emb.guidance_embedder),
                        ("vector_in", emb.text_embedder)):
        _pair(out, f"{bfl}.in_layer", module.linear_1)
        _pair(out, f"{bfl}.out_layer", module.linear_2)
    for i, blk in enumerate(dm.transformer_blocks):
        p, a = f"double_blocks.{i}.", blk.attn
        _pair(out, p + "img_mod.lin", blk.norm1.linear)
        _pair(out, p + "txt_mod.lin", blk.norm1_context.linear)
        for s, (q, k, v), proj, nq, nk, ff in (
                ("img", (a.to_q, a.to_k, a.to_v), a.to_out[0], a.norm_q, a.norm_k, blk.ff),
                ("txt", (a.add_q_proj, a.add_k_proj, a.add_v_proj), a.to_add_out,
                 a.norm_added_q, a.norm_added_k, blk.ff_context)):
            out[p + f"{s}_attn.qkv.weight"] = torch.cat([q.weight, k.weight, v.weight])
            out[p + f"{s}_attn.qkv.bias"] = torch.cat([q.bias, k.bias, v.bias])
            _pair(out, p + f"{s}_attn.proj", proj)
            out[p + f"{s}_attn.norm.query_norm.scale"] = nq.weight
            out[p + f"{s}_attn.norm.key_norm.scale"] = nk.weight
            _pair(out, p + f"{s}_mlp.0", ff.net[0].proj)
            _pair(out, p + f"{s}_mlp.2", ff.net[2])
    for i, blk in enumerate(dm.single_transformer_blocks):
        p, a = f"single_blocks.{i}.", blk.attn
        out[p + "linear1.weight"] = torch.cat([a.to_q.weight, a.to_k.weight, a.to_v.weight,
                                               blk.proj_mlp.weight])
        out[p + "linear1.bias"] = torch.cat([a.to_q.bias, a.to_k.bias, a.to_v.bias,
                                             blk.proj_mlp.bias])
        _pair(out, p + "linear2", blk.proj_out)
        out[p + "norm.query_norm.scale"] = a.norm_q.weight
        out[p + "norm.key_norm.scale"] = a.norm_k.weight
        _pair(out, p + "modulation.lin", blk.norm.linear)
    _pair(out, "final_layer.linear", dm.proj_out)
    scale, shift = dm.norm_out.linear.weight.chunk(2)  # diffusers: (scale, shift); BFL: (shift, scale)
    out["final_layer.adaLN_modulation.1.weight"] = torch.cat([shift, scale])
    b_scale, b_shift = dm.norm_out.linear.bias.chunk(2)
    out["final_layer.adaLN_modulation.1.bias"] = torch.cat([b_shift, b_scale])
    return {k: v.detach().clone() for k, v in out.items()}


def from_diffusers(dm) -> BFLFlux:
    cfg = dm.config
    hidden = cfg.num_attention_heads * cfg.attention_head_dim
    model = BFLFlux(in_channels=cfg.in_channels // 4, vec_in_dim=cfg.pooled_projection_dim,
                    context_in_dim=cfg.joint_attention_dim, hidden_size=hidden,
                    num_heads=cfg.num_attention_heads, depth=cfg.num_layers,
                    depth_single_blocks=cfg.num_single_layers, axes_dim=cfg.axes_dims_rope,
                    guidance_embed=cfg.guidance_embeds)
    model.load_state_dict(bfl_state_dict(dm), strict=True)
    return model.eval().requires_grad_(False)


def diffusers_call(dm, x, timestep, context, y, guidance):
    """The diffusers model on the same inputs as BFLFlux.forward, velocity unpacked alike."""
    b, c, h, w = x.shape
    packed = x.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(
        b, h * w // 4, c * 4)
    out = dm(hidden_states=packed, encoder_hidden_states=context, pooled_projections=y,
             timestep=timestep, guidance=guidance, img_ids=image_ids(h // 2, w // 2, x)[0],
             txt_ids=torch.zeros(context.shape[1], 3), return_dict=False)[0]
    return out.view(b, h // 2, w // 2, c, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, c, h, w)
