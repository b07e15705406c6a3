"""Which linear layers of a diffusers UNet a static adapter touches, by kind.

xattn: cross-attention projections (attn2: to_q, to_k, to_v, to_out.0), as ESD-x trains;
xattn_kv: attn2 to_k / to_v only (UCE); non_xattn: the other transformer linears (attn1 and the
feed-forward), as ESD-u trains; all: both.
"""

from __future__ import annotations

from torch import nn

from unhype.errors import UnHypeError

KINDS = ("xattn", "xattn_kv", "non_xattn", "all")


def linear_layers(unet: nn.Module, kind: str) -> dict[str, tuple[int, int]]:
    """{module path: (in_dim, out_dim)} of the transformer blocks' nn.Linear layers of `kind`."""
    if kind not in KINDS:
        raise UnHypeError(f"layer kind {kind!r}: one of {KINDS}")
    out = {}
    for name, m in unet.named_modules():
        if not isinstance(m, nn.Linear) or ".transformer_blocks." not in name:
            continue
        cross = ".attn2." in name
        if kind == "xattn_kv" and not (cross and name.endswith((".to_k", ".to_v"))):
            continue
        if kind == "xattn" and not cross:
            continue
        if kind == "non_xattn" and cross:
            continue
        out[name] = (m.in_features, m.out_features)
    if not out:
        raise UnHypeError(f"this UNet has no transformer linear layers of kind {kind}")
    return out
