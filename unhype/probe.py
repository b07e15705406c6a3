"""Probe a hypernetwork: how strongly does a prompt switch it on, and for which concept?

For each prompt the generated update of every layer is dW = B A^T. Its size and its direction
are compared with the updates generated for the file's own concept targets (the texts it was
trained to erase), using factor algebra only (no [out, in] matrix is formed):

    <B1 A1^T, B2 A2^T>_F = sum((A1^T A2) * (B1^T B2))

* ``magnitude``: ||dW(prompt)||, summed over layers in quadrature;
* per concept, ``relative`` = ||dW(prompt)|| / ||dW(concept)|| (1.0: as strong as the concept
  itself, ~0: the switch is off) and ``cosine`` = direction agreement of the two updates.
A concept "fires" when relative >= threshold (default 0.5) and cosine > 0.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from unhype.errors import UnHypeError
from unhype.hypernet import LoraFactors


@dataclass
class ConceptScore:
    concept: str
    relative: float
    cosine: float
    fires: bool


@dataclass
class ProbeResult:
    prompt: str
    magnitude: float
    concepts: list[ConceptScore] = field(default_factory=list)

    @property
    def fired(self) -> list[str]:
        return [c.concept for c in self.concepts if c.fires]

    def as_row(self) -> list:
        top = max(self.concepts, key=lambda c: c.relative, default=None)
        return [self.prompt, round(self.magnitude, 6), ", ".join(self.fired) or "-",
                top.concept if top else "-", round(top.relative, 4) if top else 0.0,
                round(top.cosine, 4) if top else 0.0]


ROW_HEADERS = ["prompt", "LoRA magnitude", "fires", "nearest concept", "relative", "cosine"]


def gram(f1: LoraFactors, f2: LoraFactors) -> torch.Tensor:
    """[N1, N2] Frobenius inner products of the updates of two factor sets, over all layers."""
    total = None
    for name, (a1, b1) in f1.items():
        a2, b2 = f2[name]
        aa = torch.einsum("nir,mis->nmrs", a1.double(), a2.double())
        bb = torch.einsum("nor,mos->nmrs", b1.double(), b2.double())
        g = (aa * bb).sum(dim=(2, 3))
        total = g if total is None else total + g
    if total is None:
        raise UnHypeError("probe: the hypernetwork generated no layers")
    return total


def concept_texts(meta) -> list[str]:
    """The concept targets a file was trained to erase (from its metadata)."""
    texts = []
    for c in getattr(meta, "concepts", []) or []:
        target = c.get("target") if isinstance(c, dict) else None
        if target and target not in texts:
            texts.append(str(target))
    return texts


@torch.no_grad()
def probe(hypernet, embed, prompts: list[str], concepts: list[str],
          threshold: float = 0.5, windows: bool = False) -> list[ProbeResult]:
    """Score `prompts` against `concepts` (texts) with `embed`: list[str] -> [N, D].
    `windows`: read long prompts also through word windows and score each prompt's strongest
    update, as the A1111 extension applies them (unhype.prompt_windows)."""
    from unhype.prompt_windows import prompt_windows, strongest

    prompts = [p for p in prompts if p is not None]
    if not prompts:
        raise UnHypeError("probe: no prompt given")
    texts, owner = [], []
    for i, prompt in enumerate(prompts):
        for text in [prompt] + (prompt_windows(prompt) if windows else []):
            texts.append(text)
            owner.append(i)
    factors = hypernet(embed(texts + list(concepts)).float())
    k = len(texts)
    if k > len(prompts):
        chosen = strongest({n: (a[:k], b[:k]) for n, (a, b) in factors.items()}, owner,
                           len(prompts))
        factors = {n: (torch.cat([chosen[n][0], a[k:]]), torch.cat([chosen[n][1], b[k:]]))
                   for n, (a, b) in factors.items()}
    g = gram(factors, factors)
    n = len(prompts)
    norms = g.diagonal().clamp_min(0).sqrt()
    results = []
    for i, prompt in enumerate(prompts):
        scores = []
        for j, concept in enumerate(concepts):
            ref = float(norms[n + j])
            rel = float(norms[i]) / ref if ref > 0 else 0.0
            denom = float(norms[i]) * ref
            cos = float(g[i, n + j]) / denom if denom > 0 else 0.0
            scores.append(ConceptScore(concept, rel, cos, rel >= threshold and cos > 0))
        results.append(ProbeResult(prompt, float(norms[i]), scores))
    return results
