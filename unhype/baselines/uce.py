"""UCE (Gandikota et al. 2024): the closed-form edit of every cross-attention to_k / to_v.

For each projection W, with erase contexts c_e (the concept prompt's token embeddings from its
last word on, as UCE's reference code slices them) mapped to W c_a (the anchor prompt's tokens,
aligned the same way; anchor "" as ESD) and preserved contexts c_p mapped to W c_p:

    W' = (lam W + sum_e W c_a c_e^T + s_p sum_p W c_p c_p^T) (lam I + sum_e c_e c_e^T + s_p sum_p c_p c_p^T)^-1

`UCEMethod` adds W' - W to the weights on `attach` and restores the saved originals on `detach`.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from unhype.baselines.layers import linear_layers
from unhype.evaluation.methods import Method


def _tail_tokens(hidden: Tensor, mask: Tensor) -> list[Tensor]:
    """Per prompt: the token embeddings from the last word token to the end ([k, D])."""
    out = []
    for h, m in zip(hidden, mask):
        last_word = int(m.sum()) - 2  # attention mask covers BOS ... EOS
        out.append(h[max(last_word, 0):])
    return out


def contexts(encode, prompts: list[str], anchors: list[str]) -> tuple[Tensor, Tensor]:
    """(c_e [M, D], c_a [M, D]) aligned token rows for (prompt, anchor) pairs.

    `encode(prompts) -> (hidden [N, L, D], attention mask [N, L])`."""
    h_p, m_p = encode(prompts)
    h_a, m_a = encode(anchors)
    ce, ca = [], []
    for tp, ta in zip(_tail_tokens(h_p, m_p), _tail_tokens(h_a, m_a)):
        k = min(len(tp), len(ta))
        ce.append(tp[:k]), ca.append(ta[:k])
    return torch.cat(ce).float(), torch.cat(ca).float()


@torch.no_grad()
def uce_deltas(unet: nn.Module, encode, erase: list[str], anchors: list[str],
               preserve: list[str], lam: float = 0.1, erase_scale: float = 1.0,
               preserve_scale: float | None = None) -> dict[str, Tensor]:
    """{module path: W' - W} for every attn2 to_k / to_v."""
    c_e, c_a = contexts(encode, erase, anchors)
    c_p = contexts(encode, preserve, preserve)[0] if preserve else None
    if preserve_scale is None:
        preserve_scale = max(0.1, 1.0 / max(len(preserve), 1))
    named = dict(unet.named_modules())
    deltas = {}
    for path in linear_layers(unet, "xattn_kv"):
        w = named[path].weight.detach().float()
        d = w.shape[1]
        mat1 = lam * w + erase_scale * (w @ c_a.T) @ c_e
        mat2 = lam * torch.eye(d) + erase_scale * c_e.T @ c_e
        if c_p is not None:
            mat1 = mat1 + preserve_scale * (w @ c_p.T) @ c_p
            mat2 = mat2 + preserve_scale * c_p.T @ c_p
        deltas[path] = torch.linalg.solve(mat2.T, mat1.T).T - w  # mat1 @ mat2^-1
    return deltas


class UCEMethod(Method):
    def __init__(self, deltas: dict[str, Tensor], info: dict | None = None, name: str = "UCE"):
        self.deltas, self.info, self.name = deltas, info or {}, name
        self._saved: dict[str, tuple[nn.Module, Tensor]] = {}

    def attach(self, unet):
        named = dict(unet.named_modules())
        try:
            for path, delta in self.deltas.items():
                weight = named[path].weight
                self._saved[path] = (named[path], weight.detach().clone())
                with torch.no_grad():
                    weight.add_(delta.to(weight))
        except BaseException:
            self.detach()
            raise
        return self

    def detach(self):
        with torch.no_grad():
            for module, original in self._saved.values():
                module.weight.copy_(original)
        self._saved = {}

    def settings(self):
        return self.info


def uce(generator, concepts: list[str], preserve: list[str], templates=("{}",),
        anchor: str = "", lam: float = 0.1, preserve_scale: float | None = None) -> UCEMethod:
    """UCE on a harness generator (its tokenizer + text encoder give the contexts)."""
    erase = [t.replace("{}", c) for c in concepts for t in templates]
    anchors = [t.replace("{}", anchor) if anchor else "" for c in concepts for t in templates]
    keep = [t.replace("{}", p) for p in preserve for t in templates]
    deltas = uce_deltas(generator.unet, token_encoder(generator), erase, anchors, keep, lam,
                        preserve_scale=preserve_scale)
    return UCEMethod(deltas, {"erase_prompts": len(erase), "preserve_prompts": len(keep),
                              "lam": lam, "preserve_scale": preserve_scale,
                              "layers": len(deltas)})


def token_encoder(generator):
    """encode(prompts) -> (last_hidden_state, attention mask) for a harness generator."""
    if generator.family == "toy":
        toy = generator.toy
        tok, enc = toy.tokenizer, toy.text_encoder
    else:
        tok, enc = generator.backend.tokenizers[0], generator.backend.text_encoders[0]

    @torch.no_grad()
    def encode(prompts):
        t = tok(list(prompts), padding="max_length", truncation=True, return_tensors="pt")
        dev = next(enc.parameters()).device
        hidden = enc(input_ids=t.input_ids.to(dev)).last_hidden_state
        return hidden.float().cpu(), t.attention_mask
    return encode
