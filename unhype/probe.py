"""Probe a hypernetwork: how strongly does a prompt switch it on, and for which concept?

For each prompt the generated update of every layer is dW = B A^T. Its size and its direction
are compared with a reference size and with the updates generated for the file's own concept
targets (the texts it was trained to erase), using factor algebra only (no [out, in] matrix is
formed):

    <B1 A1^T, B2 A2^T>_F = sum((A1^T A2) * (B1^T B2))

* ``magnitude``: ||dW(prompt)|| as the hosts apply it (after the gate floor and saturation,
  unhype.gate_floor), summed over layers in quadrature; ``raw``: the same before the floor;
* per concept, ``relative`` = magnitude / that concept's reference: its own entry of the
  file's ``concept_references`` ({target: the median ||dW|| over that concept's training
  prompts}) where the file stores one, else the file's ``gate_reference`` (the median over all
  the concepts' training prompts: the scale the floor and saturation use); a file without
  either (trained before they existed, no floor) is measured against each concept text's own
  update, as before;
* per concept, ``cosine`` = direction agreement of the two (unfloored) updates; a concept's
  update is that of its stored signature (the mean embedding of its training prompts,
  unhype.concept_signatures: what the hosts name concepts by) where the file has one, else
  that of the concept text. The nearest
  concept is the one of largest cosine. A prompt naming several concepts ("a circle and a
  square") points between them, so every concept whose cosine is the largest, or within
  COSINE_MARGIN (0.05) of it and above MIN_COSINE (0.5), is a candidate; a candidate fires when
  its relative >= threshold (default 0.5). The top one needs only a positive cosine.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from unhype.errors import UnHypeError
from unhype.hypernet import LoraFactors, update_gram

DEFAULT_THRESHOLD = 0.5
COSINE_MARGIN = 0.05  # a concept this close to the top cosine is named by the prompt as well
MIN_COSINE = 0.5      # ... when it points at least this much the same way


@dataclass
class ConceptScore:
    concept: str
    relative: float
    cosine: float
    fires: bool
    reference: float | None = None  # what relative divides by (None: the concept text's update)


@dataclass
class ProbeResult:
    prompt: str
    magnitude: float
    concepts: list[ConceptScore] = field(default_factory=list)
    raw: float | None = None           # before the gate floor (None: as magnitude)
    reference: float | None = None     # the file's gate_reference (None: per-concept)
    layers: dict[str, float] | None = None
    threshold: float = DEFAULT_THRESHOLD

    @property
    def relative(self) -> float | None:
        """The nearest concept's relative (its own reference), else the share of the file's
        gate_reference; None: neither exists."""
        top = self.nearest
        return top.relative if top is not None else self.share

    @property
    def nearest(self) -> ConceptScore | None:
        """The concept whose update points most the same way (ties: the first listed); None
        when none points the same way at all (cosine <= 0, e.g. no update)."""
        top = max(self.concepts, key=lambda c: c.cosine, default=None)
        return top if top is not None and top.cosine > 0 else None

    @property
    def fired(self) -> list[str]:
        return [c.concept for c in self.concepts if c.fires]

    @property
    def share(self) -> float | None:
        """Applied ||dW|| / the file's gate_reference (None: the file has none)."""
        return self.magnitude / self.reference if self.reference else None

    @property
    def gate_scale(self) -> float:
        """What the gate floor and saturation did: applied / raw (0: zeroed, 1: untouched)."""
        raw = self.magnitude if self.raw is None else self.raw
        return self.magnitude / raw if raw > 0 else 1.0

    @property
    def zeroed(self) -> bool:
        """Whether the gate floor turns an update the network generates into none."""
        return self.magnitude == 0 and (self.raw or 0.0) > 0

    def gate_text(self) -> str:
        if self.reference is None:
            return "no floor"
        if self.zeroed:
            return f"zeroed (raw {self.raw / self.reference:.1%} of the reference: under the floor)"
        scale = self.gate_scale
        if scale < 1:
            return f"faded x{scale:.3g} (near the floor)"
        if scale > 1:
            return f"raised x{scale:.3g} (saturated)"
        return "-"

    def as_row(self) -> list:
        top = self.nearest
        relative = self.relative or 0.0
        return [self.prompt, round(self.magnitude, 6), ", ".join(self.fired) or "-",
                top.concept if top else "-", round(relative, 4),
                round(top.cosine, 4) if top else 0.0, self.gate_text()]

    def as_dict(self) -> dict:
        top = self.nearest
        return {"prompt": self.prompt, "applied_norm": self.magnitude,
                "raw_norm": self.magnitude if self.raw is None else self.raw,
                "gate_reference": self.reference, "share_of_reference": self.share,
                "gate_scale": self.gate_scale, "zeroed_by_floor": self.zeroed,
                "fires": self.fired, "threshold": self.threshold,
                "nearest": None if top is None else {"concept": top.concept,
                                                     "relative": top.relative,
                                                     "cosine": top.cosine,
                                                     "reference": top.reference},
                "concepts": [{"concept": c.concept, "relative": c.relative,
                              "cosine": c.cosine, "fires": c.fires,
                              "reference": c.reference} for c in self.concepts],
                **({"layers": self.layers} if self.layers is not None else {})}


ROW_HEADERS = ["prompt", "applied ||dW||", "fires", "nearest concept (direction)",
               "share of reference", "cosine", "gate floor"]

ROW_NOTE = ("applied ||dW||: the update's norm after the gate floor, as generation applies it. "
            "share of reference: that / the nearest concept's reference (its own median ||dW|| "
            "where the file stores concept_references, else the file's gate_reference: the "
            "median ||dW|| of the concepts' training prompts, the floor's scale; a file without "
            "either: / the concept text's own ||dW||). nearest concept: largest cosine between "
            "the updates. fires: every concept at the largest cosine (> 0), or within "
            f"{COSINE_MARGIN:g} of it and above {MIN_COSINE:g} (a prompt naming several), whose "
            f"share of its own reference is >= {DEFAULT_THRESHOLD:g}.")


def gram(f1: LoraFactors, f2: LoraFactors) -> torch.Tensor:
    """[N1, N2] Frobenius inner products of the updates of two factor sets, over all layers."""
    try:
        return update_gram(f1, f2)
    except ValueError:
        raise UnHypeError("probe: the hypernetwork generated no layers") from None


def layer_norms(factors: LoraFactors) -> dict[str, torch.Tensor]:
    """{layer: [N] ||B A^T||_F} of each prompt's update, layer by layer."""
    out = {}
    for name, (a, b) in factors.items():
        a, b = a.double(), b.double()
        sq = ((a.transpose(1, 2) @ a) * (b.transpose(1, 2) @ b)).flatten(1).sum(1)
        out[name] = sq.clamp_min(0).sqrt()
    return out


def concept_texts(meta) -> list[str]:
    """The concept targets a file was trained to erase (from its metadata)."""
    texts = []
    for c in getattr(meta, "concepts", []) or []:
        target = c.get("target") if isinstance(c, dict) else None
        if target and target not in texts:
            texts.append(str(target))
    return texts


def concept_references(meta) -> dict[str, float]:
    """{target: reference ||dW||} of the file's training["concept_references"] (the median
    update norm over each concept's own training prompts); entries that are not a positive
    finite number are left out (that concept falls back to gate_reference)."""
    refs = (getattr(meta, "training", None) or {}).get("concept_references")
    if not isinstance(refs, dict):
        return {}
    out = {}
    for target, value in refs.items():
        if isinstance(value, (int, float)) and not isinstance(value, bool) and \
                math.isfinite(value) and value > 0:
            out[str(target)] = float(value)
    return out


def _networks(source):
    """(applied, raw, gate_reference, concept_references) of a LoadedHypernet (`generate`: with
    its gate floor and saturation, `hypernet`: without) or of a bare network (no floor, no
    references)."""
    if hasattr(source, "generate") and hasattr(source, "hypernet"):
        return source.generate, source.hypernet, source.gate_reference, \
            concept_references(getattr(source, "meta", None))
    return source, None, None, {}


def mark_firing(result: ProbeResult, threshold: float) -> None:
    """Set each concept's `fires`: the top-cosine concept and every concept pointing nearly as
    much its way (COSINE_MARGIN, MIN_COSINE) whose relative reaches `threshold`."""
    top = result.nearest
    for c in result.concepts:
        near = top is not None and (c is top or (c.cosine > MIN_COSINE and
                                                 c.cosine >= top.cosine - COSINE_MARGIN))
        c.fires = near and c.relative >= threshold


@torch.no_grad()
def probe(source, embed, prompts: list[str], concepts: list[str],
          threshold: float = DEFAULT_THRESHOLD, windows: bool = False,
          per_layer: bool = False) -> list[ProbeResult]:
    """Score `prompts` against `concepts` (texts) with `embed`: list[str] -> [N, D].
    `source`: a LoadedHypernet (what the hosts apply: its gate floor and saturation, measured
    against its gate_reference) or a bare network (embeddings -> factors).
    `windows`: read long prompts also through word windows and score the update each prompt
    gets from its readings, as the hosts apply them (unhype.prompt_windows.combined_rows).
    `per_layer`: also each layer's applied ||dW||."""
    from unhype.prompt_windows import prompt_windows

    prompts = [p for p in prompts if p is not None]
    if not prompts:
        raise UnHypeError("probe: no prompt given")
    texts, owner = [], []
    for i, prompt in enumerate(prompts):
        for text in [prompt] + (prompt_windows(prompt) if windows else []):
            texts.append(text)
            owner.append(i)
    emb = embed(texts).float()
    return probe_readings(source, emb, owner, prompts,
                          concept_embeddings(source, embed, concepts, emb), concepts,
                          threshold, per_layer)


def concept_embeddings(source, embed, concepts: list[str], like: torch.Tensor) -> torch.Tensor:
    """[C, D] embeddings of `concepts`: the file's stored signature where it has one (the
    concepts as the hosts name them), else `embed` of the concept text; on `like`'s device."""
    stored = stored_signatures(source)
    fresh = [c for c in concepts if c not in stored]
    made = iter(embed(fresh).float().to(like.device) if fresh else [])
    if not concepts:
        return like.new_zeros(0, like.shape[-1])
    return torch.stack([stored[c].to(like) if c in stored else next(made) for c in concepts])


def stored_signatures(source) -> dict:
    """{target: embedding} of a file's concept signatures (unhype.concept_signatures: the mean
    embedding of the concept's training prompts, what the hosts name concepts by); {} for a
    bare network or a file without them."""
    from unhype.concept_signatures import read_embeddings

    meta = getattr(source, "meta", None)
    if meta is None or getattr(source, "signatures", None) is None:
        return {}
    return read_embeddings(meta.training, meta.config.embed_dim)


@torch.no_grad()
def probe_readings(source, readings: torch.Tensor, owner: list[int], prompts: list[str],
                   concept_embeddings: torch.Tensor, concepts: list[str],
                   threshold: float = DEFAULT_THRESHOLD, per_layer: bool = False
                   ) -> list[ProbeResult]:
    """`probe` of embeddings already made: `readings` [K, D], each a reading of prompt
    `owner[k]` (the prompt itself, its windows); `concept_embeddings` [C, D] of `concepts`."""
    from unhype.prompt_windows import combined_rows, stack_rows

    generate, hypernet, reference, per_concept = _networks(source)
    emb = torch.cat([readings.float(), concept_embeddings.float().to(readings.device)])
    applied = generate(emb)
    raw = hypernet(emb) if hypernet is not None else applied
    n, k = len(prompts), len(readings)
    if k > n:  # the readings each prompt gets, as the hosts pick them
        picks = source.pick_readings(readings.float(), owner, n)[1] \
            if hasattr(source, "pick_readings") else \
            combined_rows({name: (a[:k], b[:k]) for name, (a, b) in applied.items()}, owner, n)
    else:
        picks = [[i] for i in range(n)]
    picks += [[k + j] for j in range(len(concepts))]
    applied, raw = stack_rows(applied, picks), stack_rows(raw, picks)
    g = gram(raw, raw)  # directions: the floor scales a prompt's update, never turns it
    raw_norms = g.diagonal().clamp_min(0).sqrt()
    norms = gram(applied, applied).diagonal().clamp_min(0).sqrt()
    layers = layer_norms(applied) if per_layer else None
    results = []
    for i, prompt in enumerate(prompts):
        scores = []
        for j, concept in enumerate(concepts):
            own = per_concept.get(concept) or reference
            ref = own if own else float(norms[n + j])
            rel = float(norms[i]) / ref if ref > 0 else 0.0
            denom = float(raw_norms[i]) * float(raw_norms[n + j])
            scores.append(ConceptScore(concept, rel, float(g[i, n + j]) / denom if denom > 0
                                       else 0.0, False, own))
        result = ProbeResult(prompt, float(norms[i]), scores, float(raw_norms[i]), reference,
                             None if layers is None else
                             {name: float(v[i]) for name, v in layers.items()}, threshold)
        mark_firing(result, threshold)
        results.append(result)
    return results
