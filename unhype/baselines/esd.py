"""ESD-x, ESD-u and the SPM-style adapter: static LoRAs trained with the ESD loss.

The data pipeline and the loss are the trainer's (`unhype.trainer.loop.prepare / build_cache /
draw_batch`, `unhype.trainer.losses.esd_loss_per_prompt`): the same concepts, templates, z_t and
ESD-with-anchor targets UnHype trains on; only the trained object differs: one LoRA shared by
every prompt instead of a hypernetwork. SPM adds its latent-anchoring loss (retained prompts'
predictions kept equal to the base model's on the same z_t) and, at inference, scales its
adapter per prompt by similarity to the erased concepts (`SimilarityGate`).
"""

from __future__ import annotations

import sys
import tempfile
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from unhype.baselines.layers import linear_layers
from unhype.dynamic_lora import DynamicLoRA
from unhype.errors import UnHypeError
from unhype.evaluation.methods import FactorBank, LoraMethod


@dataclass
class StaticSettings:
    steps: int = 300
    rank: int = 4
    lr: float = 1e-3
    batch: int = 8
    eta: float = 1.0
    seed: int = 0
    ddim_steps: int = 20
    anchor_weight: float = 0.0  # SPM's latent anchoring on retained prompts
    anchor_batch: int = 8


def trainer_run(backend, concepts: list[str], seed: int = 0, ddim_steps: int = 20,
                batch: int = 8, template_set: str | None = None, output_dir: str | None = None,
                extra: dict | None = None):
    """A `unhype.trainer.loop.Run` (concept prompts, anchors, retained prompts, cond) for `concepts`."""
    from unhype.trainer.config import resolve
    from unhype.trainer.loop import prepare

    toy = backend.family.name == "toy"
    values = {"pretrained_model_name_or_path": "toy" if toy else "given",
              "concepts": ",".join(concepts), "template_set": template_set or
              ("toy" if toy else "objects"), "train_batch_size": batch, "seed": seed,
              "ddim_steps": ddim_steps, "latent_cache": 1, **(extra or {})}
    if toy:
        values["retain_prompts"] = "toy"
    if output_dir is not None:
        return prepare(resolve({**values, "output_dir": output_dir}), quiet=True, backend=backend)
    # a baseline saves nothing through the trainer: its folder only has to pass prepare's checks
    with tempfile.TemporaryDirectory(prefix="unhype-baseline-") as scratch:
        return prepare(resolve({**values, "output_dir": scratch}), quiet=True, backend=backend)


_CACHES: dict = {}


def latent_cache(run) -> dict:
    """The trainer's latent cache for a run's prompts, shared by every method with the same ones
    (keyed by all that `build_cache` reads: a shared cache holds what a fresh one would)."""
    from unhype.trainer.loop import build_cache

    key = (id(run.backend), tuple(p for _, p, _ in run.items), tuple(a for _, _, a in run.items),
           run.cfg.seed, run.cfg.ddim_steps, run.guidance, run.cfg.latent_cache)
    if key not in _CACHES:
        _CACHES[key] = build_cache(run)
    return _CACHES[key]


def train_static_lora(backend, concepts: list[str], dims: dict[str, tuple[int, int]],
                      s: StaticSettings, progress: bool = False, run=None) -> tuple[FactorBank, dict]:
    """One LoRA on the layers `dims` (module paths of backend.unet) minimising the ESD loss."""
    from unhype.trainer import losses
    from unhype.trainer.loop import draw_batch, index_cache

    if s.steps < 1 or s.rank < 1:
        raise UnHypeError(f"static LoRA: steps and rank must be >= 1 ({s.steps}, {s.rank})")
    run = run or trainer_run(backend, concepts, s.seed, s.ddim_steps, s.batch)
    run.lora.remove()  # the trainer's hypernet hooks: not used here
    run.cache = latent_cache(run)
    index_cache(run)
    bank = FactorBank(dims, s.rank, s.seed)
    opt = torch.optim.Adam(bank.parameters(), lr=s.lr)
    gen = torch.Generator().manual_seed(s.seed)
    retain_cond = None
    if s.anchor_weight > 0:
        retain_cond = backend.encode(run.retain_prompts)
    lora = DynamicLoRA.attach(backend.unet, {k: k for k in dims}, dims)
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=s.steps, desc="static LoRA (ESD)", file=sys.stderr, leave=False)
    log = []
    try:
        for step in range(s.steps):
            items, z, t, e_p, e_a = draw_batch(run, gen)
            n = len(items)
            lora.set(bank.expand(n), torch.arange(n))
            loss = losses.esd_loss_per_prompt(backend.predict(z, t, run.cond_t.index(items)),
                                              e_p, e_a, s.eta).mean()
            if retain_cond is not None:
                pick = torch.randint(0, len(run.retain_prompts), (min(n, s.anchor_batch),),
                                     generator=gen)
                zr, tr = z[: len(pick)], t[: len(pick)]
                cond_r = retain_cond.index(pick)
                with torch.no_grad():
                    lora.clear()
                    base = backend.predict(zr, tr, cond_r)
                lora.set(bank.expand(len(pick)), torch.arange(len(pick)))
                loss = loss + s.anchor_weight * F.mse_loss(backend.predict(zr, tr, cond_r), base)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            lora.clear()
            if step % 25 == 0 or step == s.steps - 1:
                log.append({"step": step + 1, "loss": float(loss.detach())})
            if bar is not None:
                bar.update(1)
    finally:
        lora.remove()
        if bar is not None:
            bar.close()
    bank.requires_grad_(False)
    return bank, {"settings": asdict(s), "log": log, "layers": len(dims)}


class StaticLoraMethod(LoraMethod):
    """The same LoRA for every prompt (ESD-x / ESD-u as LoRAs: LECO, Concept Sliders)."""

    def __init__(self, name: str, bank: FactorBank, dims: dict, info: dict | None = None):
        super().__init__({k: k for k in dims}, dims)
        self.name, self.bank, self.info = name, bank, info or {}

    def factors(self, hidden, pooled):
        return self.bank.expand(len(pooled))

    def settings(self):
        return self.info.get("settings", {})


class SimilarityGate:
    """SPM-style "facilitated transport": a per-prompt scale in [0, 1] from the cosine similarity
    of the prompt's pooled embedding to the erased concepts' training prompts.

    gate = sigmoid((max_j cos(e, e_j) - tau) / temp), with tau halfway between the 10th
    percentile of the training prompts' own scores (leave-one-out) and the 90th percentile of
    the retained prompts' scores, temp an eighth of that gap."""

    def __init__(self, concept_emb: Tensor, retain_emb: Tensor):
        self.ref = F.normalize(concept_emb.float(), dim=-1)
        own = self.ref @ self.ref.T
        own.fill_diagonal_(-1)
        hi = torch.quantile(own.max(1).values, 0.1)
        lo = torch.quantile(self.similarity(retain_emb), 0.9)
        self.tau = float((hi + lo) / 2)
        self.temp = float(max((hi - lo).abs() / 8, 1e-3))

    @classmethod
    def restore(cls, ref: Tensor, tau: float, temp: float) -> "SimilarityGate":
        """The gate as it was computed (`ref`: the normalised concept embeddings)."""
        gate = cls.__new__(cls)
        gate.ref, gate.tau, gate.temp = ref.float(), float(tau), float(temp)
        return gate

    def similarity(self, emb: Tensor) -> Tensor:
        return (F.normalize(emb.float(), dim=-1) @ self.ref.T).max(1).values

    def __call__(self, emb: Tensor) -> Tensor:
        return torch.sigmoid((self.similarity(emb) - self.tau) / self.temp)


class SPMMethod(StaticLoraMethod):
    def __init__(self, bank: FactorBank, dims: dict, gate: SimilarityGate, info=None,
                 name: str = "SPM (gated rank-1)"):
        super().__init__(name, bank, dims, info)
        self.gate = gate

    def factors(self, hidden, pooled):
        return self.bank.expand(len(pooled), self.gate(pooled))

    def settings(self):
        return {**super().settings(), "tau": round(self.gate.tau, 4),
                "temp": round(self.gate.temp, 4)}


def esd(backend, concepts: list[str], kind: str = "x", settings: StaticSettings | None = None,
        progress: bool = False) -> StaticLoraMethod:
    """ESD-x (kind "x": cross-attention) or ESD-u (kind "u": non-cross-attention) as a LoRA."""
    layer_kind = {"x": "xattn", "u": "non_xattn"}.get(kind)
    if layer_kind is None:
        raise UnHypeError(f"ESD kind {kind!r}: 'x' or 'u'")
    dims = linear_layers(backend.unet, layer_kind)
    bank, info = train_static_lora(backend, concepts, dims, settings or StaticSettings(), progress)
    return StaticLoraMethod(f"ESD-{kind} (LoRA r{bank.b[0].shape[1]})", bank, dims, info)


def spm(backend, concepts: list[str], settings: StaticSettings | None = None,
        progress: bool = False) -> SPMMethod:
    """A rank-1 adapter on every attention/FF linear, ESD loss + latent anchoring, gated."""
    s = settings or StaticSettings(rank=1, anchor_weight=1.0)
    dims = linear_layers(backend.unet, "all")
    run = trainer_run(backend, concepts, s.seed, s.ddim_steps, s.batch)
    bank, info = train_static_lora(backend, concepts, dims, s, progress, run=run)
    concept_emb = run.item_emb.detach().cpu()
    retain_emb = run.retain_emb.detach().cpu()
    return SPMMethod(bank, dims, SimilarityGate(concept_emb, retain_emb), info)
