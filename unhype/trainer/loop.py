"""The training loop, top to bottom: `prepare` checks and loads everything, `train` runs it.

One step (METHOD.md): draw B (concept, template) pairs; get z_t of the target prompt from the
frozen base model (DDIM + CFG stopped at a random step, fresh or from the latent cache); the
base model's predictions for target (e_p) and anchor (e_a) prompts; then
  fields: s ~ U{0..T-1}; g = dL_esd/d(A, B) at H(e, s) (factors as leaves, LoRA on the UNet);
          L_remove = ||H(e, s+1) - H(e, s) + lambda g||^2
  direct: L_remove = L_esd with the LoRA H(e, T)
and the removal Adam steps; then L_retain = ||H(e_r, s) - H(e_r, 0)||^2 on a batch of cached
retained embeddings and the retention Adam steps. Every `prepare` check runs before step one.

Under `accelerate launch` (unhype/trainer/distributed.py) every process draws the same global batch and
works on its share of the rows; gradients are averaged before each optimiser step; the latent
cache and the retain embeddings are computed by the main process and broadcast; only the main
process writes checkpoints, samples, logs and the result.
"""

from __future__ import annotations

import contextlib
import json
import math
import signal
import sys
import threading
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch

from unhype.trainer import checkpoint as ckpt
from unhype.trainer import distributed as tdist
from unhype.trainer import losses, memory
from unhype.trainer.adversary import adversarial_batch
from unhype.trainer.backends.base import Backend, Cond
from unhype.trainer.concepts import (Concept, composite_items, composite_note, concept_table,
                                     exposure_note, resolve_concepts, resolve_retain,
                                     warn_anchor_conflicts)
from unhype.trainer.config import TrainConfig, check_output_dir, pick_device
from unhype.atomic import atomic_write_text
from unhype.distributed import Dist, split
from unhype.dynamic_lora import DynamicLoRA
from unhype.errors import UnHypeError
from unhype.fileformat import save_hypernet
from unhype.model_hash import base_model_hashes
from unhype.hypernet import (HyperNetConfig, TargetSpec, build_hypernet, default_hidden,
                             delta_norm)

EXIT_NAN = 3
EXIT_INTERRUPTED = 130
_DEFAULT_THREADS: int | None = None  # torch's thread count before any run set its own


class StopAtStepEnd(Exception):
    """Ctrl-C was pressed during a step: stop once it is complete."""


class DeferredInterrupt:
    """Ctrl-C during a step stops the run once the step is complete, so the checkpoint it
    saves is what a run of that many steps holds (weights, both Adam states, the RNGs), and
    resuming continues exactly; a second Ctrl-C stops at once, without a checkpoint of the
    half-done step. Only in the main thread.

    With several processes (`dist`), every one must stop after the same step: `check` takes the
    maximum of the requests over the processes at each step's end. torchrun (accelerate launch)
    starts its workers in sessions of their own and forwards the terminal's Ctrl-C to them,
    then kills them after its shutdown timeout (30 s); where workers share the terminal's
    process group they get it twice, so a second SIGINT within `echo_s` of the first is taken
    for that echo, not for a second Ctrl-C."""

    echo_s = 2.0

    def __init__(self, say, dist: Dist | None = None):
        self.say, self.dist, self.requested, self._previous = say, dist, False, None
        self._first_at = None

    @property
    def active(self) -> bool:
        return self._previous is not None

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
        return False

    def _handle(self, signum, frame):
        now = time.monotonic()
        if self.requested:
            if self._first_at is not None and now - self._first_at < self.echo_s and \
                    self.dist is not None and self.dist.world > 1:
                return  # the launcher's copy of the same Ctrl-C
            raise KeyboardInterrupt
        self.requested, self._first_at = True, now
        self.say("\nunhype train: stopping after this step (Ctrl-C again to stop at once, "
                 "without saving it)")

    def check(self):
        requested = self.requested
        if self.dist is not None and self.dist.world > 1:  # the same answer in every process
            flag = torch.tensor([1.0 if requested else 0.0])
            requested = bool(self.dist.max(flag).item() > 0)
        if requested:
            raise StopAtStepEnd


class NaNLoss(RuntimeError):
    pass


@dataclass
class Run:
    cfg: TrainConfig
    backend: Backend
    concepts: list[Concept]
    hypernet: torch.nn.Module
    lora: DynamicLoRA
    # (concept index, target prompt, anchor prompt): the concepts' own prompts, then the
    # composites (concepts.composite_items) from index `own_items` on
    items: list[tuple[int, str, str]]
    item_emb: torch.Tensor  # [I, D]
    cond_t: Cond
    cond_a: Cond
    uncond: Cond
    retain_prompts: list[str]
    retain_emb: torch.Tensor  # [R, D]
    out_dir: Path
    fingerprint: dict  # what a checkpoint must match to resume (checkpoint.fingerprint)
    guidance: float
    start_step: int = 0
    resume_from: Path | None = None
    cache: dict | None = None
    cache_index: dict | None = None
    result_path: Path | None = None
    log: list = field(default_factory=list)
    accelerator: object = None  # accelerate.Accelerator; None until train() (or given)
    rank: int = 0  # this process's share of every global batch: split(n, rank, world)
    world: int = 1
    noise_gen: torch.Generator | None = None  # per-process generator of fresh z_t noise
    optimisers: dict = field(default_factory=dict)
    schedulers: dict = field(default_factory=dict)  # learning-rate schedules, one per optimiser
    concept_refs: dict | None = None  # per-concept update medians of the last saved result
    own_items: int | None = None  # None: every item is a concept's own prompt

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def dist(self) -> Dist:
        return Dist(self.accelerator)


def say(*args):
    print(*args, file=sys.stderr, flush=True)


def prepare(cfg: TrainConfig, quiet: bool = False, backend: Backend | None = None,
            accelerator=None) -> Run:
    """Everything that can fail on bad input fails here, before training starts.

    `backend` replaces loading the model from `pretrained_model_name_or_path` (benchmarks).
    `accelerator` (trainer.distributed.make_accelerator): the process group of `accelerate
    launch`; the retain embeddings are then computed by the main process and broadcast."""
    dist = Dist(accelerator)
    if accelerator is not None:
        tdist.check_batch(cfg, dist.world)
    concepts = resolve_concepts(cfg)  # before loading any model: cheap errors first
    out_dir = check_output_dir(cfg)
    resume_path = ckpt.find_checkpoint(cfg.resume, out_dir / "checkpoints") if cfg.resume else None
    if resume_path is not None:
        ckpt.check_not_finished(resume_path, cfg.max_train_steps)
    if cfg.sample_prompts and not Path(cfg.sample_prompts).is_file():
        raise UnHypeError(f"--sample_prompts {cfg.sample_prompts}: no such file")
    if dist.world > 1:  # each process its own device (cuda:<local rank>, or the CPU)
        device = accelerator.device
        cfg.values["device"] = "cpu" if device.type == "cpu" else str(device)
    cfg.values["device"] = pick_device(cfg.device)
    global _DEFAULT_THREADS
    if _DEFAULT_THREADS is None:
        _DEFAULT_THREADS = torch.get_num_threads()
    # 0: torch's default, not what an earlier run in this process set
    torch.set_num_threads(cfg.cpu_threads or _DEFAULT_THREADS)
    if backend is None:
        from unhype.trainer.backends import load_backend

        backend = load_backend(cfg)
    family = backend.family
    if cfg.model_family not in ("auto", family.name):
        raise UnHypeError(f"--model_family {cfg.model_family} but the model is {family.name}")
    if cfg.eval and family.name != "toy":
        raise UnHypeError("--eval measures erasure with the toy judge, so it needs the toy model "
                          f"(this is {family.name})")
    if cfg.eval:  # its concepts must be toy shapes: refused now, not after training
        from unhype.trainer.evaluate import erased_shapes

        erased_shapes(concepts)
    memory.shrink(cfg, backend)  # NF4 replaces the linear layers: before they are hooked
    targets = family.targets(cfg.target_preset, model=backend.unet)
    _attention(cfg, backend)
    warned = anchor_conflicts_named(concepts)
    for c in concepts:  # e.g. the toy knows its shapes' synonyms (evaluation only)
        if not c.synonyms:
            c.synonyms = backend.default_synonyms(c.target)
    if dist.is_main:  # an anchor naming a synonym the backend just supplied
        warn_anchor_conflicts(concepts, "concepts", skip=warned)
    retain = resolve_retain(cfg.retain_prompts, concepts, backend)
    specs = [TargetSpec(t.name, t.module_type, t.in_dim, t.out_dim, t.path) for t in targets]
    embed_dim = backend.embed([""]).shape[1]
    net_cfg = HyperNetConfig(
        variant=cfg.variant, targets=specs, embed_dim=embed_dim, rank=cfg.network_dim,
        hidden=cfg.network_hidden or default_hidden(cfg.variant),
        head_hidden=cfg.network_head_hidden, hyper_steps=cfg.hyper_steps,
        alpha_base=cfg.network_alpha / cfg.network_dim, seed=cfg.seed)
    hypernet = build_hypernet(net_cfg).to(backend.device)
    earlier = getattr(backend, "training_lora", None)
    if earlier is not None:  # a backend reused by a later run: one set of hooks, not two
        earlier.remove()
    lora = backend.training_lora = DynamicLoRA.attach(
        backend.unet, {t.name: t.path for t in targets},
        {t.name: (t.in_dim, t.out_dim) for t in targets})
    if cfg.gradient_checkpointing:  # recomputed blocks must see their forward's LoRA
        backend.unet.enable_gradient_checkpointing(lora.checkpointing_function())
    elif getattr(backend.unet, "is_gradient_checkpointing", False):  # an earlier run's
        backend.unet.disable_gradient_checkpointing()
    items = [(i, p, a) for i, c in enumerate(concepts) for p, a in c.prompts()]
    composites = composite_items(concepts, retain, cfg.composite_prompts, cfg.seed)
    items += composites
    # not the batch size: it changes only how many prompts each later step draws (kohya too
    # lets a resumed run change it)
    fp = {"net": net_cfg.to_dict(), "family": family.name,
          "model": ckpt.model_identity(cfg.pretrained_model_name_or_path),
          "concepts": [c.metadata() for c in concepts], "mode": cfg.mode, "seed": cfg.seed,
          "latent_cache": cfg.latent_cache}
    if composites:  # absent otherwise: checkpoints written before the option still resume
        fp["composite_prompts"] = cfg.composite_prompts
    start_step = 0
    if resume_path is not None:  # check before any work; restored in train()
        start_step, _, _ = ckpt.load_checkpoint(resume_path, fp, hypernet)
    guidance = cfg.guidance_scale if cfg.guidance_scale is not None else backend.default_guidance
    run = Run(cfg=cfg, backend=backend, concepts=concepts, hypernet=hypernet, lora=lora,
              items=items, item_emb=backend.embed([p for _, p, _ in items]).to(backend.device),
              cond_t=backend.encode([p for _, p, _ in items]),
              cond_a=backend.encode([a for _, _, a in items]), uncond=backend.encode([""]),
              retain_prompts=retain, retain_emb=_shared_retain_emb(dist, backend, retain),
              out_dir=out_dir, fingerprint=fp, guidance=guidance, start_step=start_step,
              resume_from=resume_path, accelerator=accelerator,
              own_items=len(items) - len(composites))
    memory_note = memory.apply(cfg, backend)  # after every prompt above is encoded
    if not quiet and dist.is_main:
        if memory_note:
            say(f"unhype train: {memory_note}")
        say(f"unhype train: {backend.info()}; {len(targets)} target layers "
            f"({cfg.target_preset or family.default_preset}); hypernet {cfg.variant}, "
            f"{hypernet.num_parameters():,} parameters, rank {cfg.network_dim}, T "
            f"{cfg.hyper_steps}; mode {cfg.mode}; {len(concepts)} concept(s), {len(items)} "
            f"prompts" + (f" ({len(composites)} beside a retained prompt)" if composites else "")
            + f"; {len(retain)} retained prompts")
        note = exposure_note(len(concepts), cfg.max_train_steps, cfg.train_batch_size,
                             cfg.gradient_accumulation_steps)
        if note:
            say(f"unhype train: note: {note}")
        note = composite_note(len(concepts), cfg.mode, cfg.gate_saturate, len(composites))
        if note:
            say(f"unhype train: note: {note}")
    return run


def anchor_conflicts_named(concepts) -> list:
    """The (concept, other) target pairs `resolve_concepts` already warned about."""
    from unhype.trainer.concepts import anchor_conflicts

    return [(c.target, o.target) for c, o, _ in anchor_conflicts(concepts)]


def _embed_chunks(backend, prompts, chunk=256):
    return torch.cat([backend.embed(prompts[i:i + chunk])
                      for i in range(0, len(prompts), chunk)]).to(backend.device)


def _shared_retain_emb(dist: Dist, backend, prompts):
    """The retain embeddings, computed once (main process) and broadcast to the others."""
    if dist.world == 1:
        return _embed_chunks(backend, prompts)
    emb = {"emb": _embed_chunks(backend, prompts).cpu()} if dist.is_main else None
    return dist.broadcast(emb, ["emb"])["emb"].to(backend.device)


def _attention(cfg, backend):
    if cfg.xformers:
        try:
            import xformers  # noqa: F401
            backend.unet.enable_xformers_memory_efficient_attention()
        except ImportError:
            say("unhype train: --xformers: xformers is not installed; using PyTorch SDPA "
                "attention instead (pip install xformers to use it)")
        except (RuntimeError, ValueError) as exc:  # installed, but built for another torch/CUDA
            say(f"unhype train: --xformers: xformers does not run here ({exc}); using PyTorch "
                "SDPA attention instead")


# --- z_t and the frozen model's predictions -----------------------------------------------------
@torch.no_grad()
def build_cache(run: Run, progress: bool = False) -> dict:
    """`latent_cache` full trajectories per prompt; every DDIM step kept as (z_t, t, e_p, e_a)."""
    from tqdm import tqdm

    cfg, b = run.cfg, run.backend
    gen = torch.Generator().manual_seed(cfg.seed + 1)
    zs, ts, eps, eas, owners = [], [], [], [], []
    n_items = len(run.items)
    bar = tqdm(total=cfg.latent_cache * n_items, desc="unhype train: latent cache", unit="traj",
               dynamic_ncols=True, file=sys.stderr, disable=not progress)
    for rep in range(cfg.latent_cache):
        for start in range(0, n_items, 64):
            idx = torch.arange(start, min(start + 64, n_items))
            cond_t, cond_a = run.cond_t.index(idx), run.cond_a.index(idx)
            uncond = run.uncond.index(torch.zeros(len(idx), dtype=torch.long))

            empty_anchor = all(run.items[i][2] == "" for i in idx.tolist())

            def record(z, t, out_c, out_u, idx=idx, cond_a=cond_a, empty=empty_anchor):
                zs.append(z.cpu()), ts.append(t.cpu()), eps.append(out_c.cpu())
                # anchor "" is the unconditional prompt: its prediction was just computed
                eas.append(out_u.cpu() if empty else b.predict(z, t, cond_a).cpu())
                owners.append(idx)
            b.sample(cond_t, uncond, gen, cfg.ddim_steps, run.guidance, record=record)
            bar.update(len(idx))
    bar.close()
    return {"z": torch.cat(zs), "t": torch.cat(ts), "e_p": torch.cat(eps),
            "e_a": torch.cat(eas), "item": torch.cat(owners)}


def index_cache(run: Run) -> None:
    run.cache_index = {}
    for row, item in enumerate(run.cache["item"].tolist()):
        run.cache_index.setdefault(item, []).append(row)


CACHE_KEYS = ["z", "t", "e_p", "e_a", "item"]


def shared_cache(run: Run, dist: Dist, progress: bool = False) -> dict:
    """The latent cache, built once by the main process (exactly as one process builds it)
    and broadcast: every process holds the same cache whatever the process count."""
    return dist.broadcast(build_cache(run, progress) if dist.is_main else None, CACHE_KEYS)


def draw_batch(run: Run, gen: torch.Generator):
    """This process's rows of a global batch of B: item indices and (z_t, t, e_p, e_a).

    The whole batch's composition is drawn from `gen` (the same stream in every process); fresh
    z_t noise comes from `run.noise_gen` (per process) when set, else from `gen`."""
    cfg, b = run.cfg, run.backend
    bs = cfg.train_batch_size
    mine = split(bs, run.rank, run.world)
    n_concepts = len(run.concepts)
    per_concept = [[i for i, it in enumerate(run.items) if it[0] == c] for c in range(n_concepts)]
    concept = torch.randint(0, n_concepts, (bs,), generator=gen).tolist()
    pick = [per_concept[c][int(torch.randint(0, len(per_concept[c]), (1,), generator=gen))]
            for c in concept]
    items = torch.tensor(pick)
    if run.cache is not None:
        cache = run.cache
        rows = []
        for i in pick:
            owned = run.cache_index[i]
            rows.append(owned[int(torch.randint(0, len(owned), (1,), generator=gen))])
        rows = torch.tensor(rows)[mine]
        dev = b.device
        return (items[mine], cache["z"][rows].to(dev), cache["t"][rows].to(dev),
                cache["e_p"][rows].to(dev), cache["e_a"][rows].to(dev))
    items = items[mine]
    with torch.no_grad():
        uncond = run.uncond.index(torch.zeros(len(items), dtype=torch.long))
        cond_t = run.cond_t.index(items)
        noise = run.noise_gen if run.noise_gen is not None else gen
        z, t = b.partial_sample(cond_t, uncond, noise, cfg.ddim_steps, run.guidance)
        e_p = b.predict(z, t, cond_t)
        e_a = b.predict(z, t, run.cond_a.index(items))
    return items, z, t, e_p, e_a


# --- one step ---------------------------------------------------------------------------------
def removal_loss(run: Run, items, z, t, e_p, e_a, gen) -> tuple[torch.Tensor, dict]:
    cfg, hn = run.cfg, run.hypernet
    emb = run.item_emb[items]
    consistency = None
    if cfg.adversarial_eps > 0:
        worst = adversarial_batch(hn, emb, cfg.adversarial_eps, cfg.adversarial_steps,
                                  cfg.adversarial_fraction, gen, cfg.train_batch_size,
                                  split(cfg.train_batch_size, run.rank, run.world))
        if cfg.adversarial_loss == "consistency":  # the removal loss keeps the clean prompts
            consistency = cfg.consistency_weight * _consistency_term(run, worst, emb, items, z, t)
        else:
            emb = worst
    loss, logs = _removal_term(run, emb, items, z, t, e_p, e_a, gen)
    if consistency is not None:
        loss = loss + consistency
        logs["consistency"] = float(consistency.detach())
    return loss, logs


def _consistency_term(run: Run, worst, emb, items, z, t) -> torch.Tensor:
    """The model's prediction with the worst cases' LoRA against its prediction with the clean
    prompts' (s = T, held fixed): TRADES' consistency, in the output space (unhype/trainer/adversary.py)."""
    hn, lora = run.hypernet, run.lora
    cond, rows = run.cond_t.index(items), torch.arange(len(items))
    with torch.no_grad():
        lora.set(hn(emb), rows)
        clean = run.backend.predict(z, t, cond)
        lora.clear()
    lora.set(hn(worst), rows)
    out = run.backend.predict(z, t, cond)
    lora.clear()
    return losses.consistency_loss(out, clean)


def _removal_term(run: Run, emb, items, z, t, e_p, e_a, gen) -> tuple[torch.Tensor, dict]:
    cfg, hn, lora = run.cfg, run.hypernet, run.lora
    cond = run.cond_t.index(items)
    rows = torch.arange(len(items))
    if cfg.mode == "direct":
        lora.set(hn(emb), rows)
        loss = losses.esd_loss_per_prompt(run.backend.predict(z, t, cond), e_p, e_a, cfg.eta)
        lora.clear()
        return loss.mean(), {"esd": float(loss.detach().mean())}
    # s for the whole global batch (one stream in every process), then this process's rows
    s = torch.randint(0, cfg.hyper_steps, (cfg.train_batch_size,), generator=gen)
    s = s[split(cfg.train_batch_size, run.rank, run.world)]
    with torch.no_grad():
        leaves = losses.factor_leaves(hn(emb, s))
    lora.set(leaves, rows)
    esd = losses.esd_loss_per_prompt(run.backend.predict(z, t, cond), e_p, e_a, cfg.eta)
    grads = losses.factor_grads(esd.sum(), leaves)
    lora.clear()
    loss = losses.fields_loss(hn(emb, s + 1), hn(emb, s), grads, cfg.fields_lambda)
    return loss, {"esd_s": float(esd.detach().mean()), "s_mean": float(s.float().mean())}


def retain_loss(run: Run, gen) -> torch.Tensor:
    """This process's part of the retention loss: averaged over processes, the global mean."""
    cfg, hn = run.cfg, run.hypernet
    n = len(run.retain_prompts)
    idx = torch.randperm(n, generator=gen)[: min(cfg.retain_batch_size, n)]
    if cfg.mode == "direct":
        s = torch.full((len(idx),), cfg.hyper_steps)
    else:
        s = torch.randint(1, cfg.hyper_steps + 1, (len(idx),), generator=gen)
    mine = split(len(idx), run.rank, run.world)
    n_all, idx, s = len(idx), idx[mine], s[mine]
    if len(idx) == 0:  # fewer retained prompts than processes: nothing here, zero gradient
        return sum(p.sum() for p in hn.parameters()) * 0.0
    emb = run.retain_emb[idx.to(run.retain_emb.device)]
    zero = torch.zeros(len(idx))
    loss = cfg.retain_weight * losses.retention_loss(hn(emb, s), hn(emb, zero))
    if len(idx) * run.world != n_all:  # unequal shares: weigh so the mean is the global one
        loss = loss * (len(idx) * run.world / n_all)
    return loss


@torch.no_grad()
def monitor(run: Run, items, z, t, e_p, e_a) -> dict:
    """ESD loss with the inference LoRA (s = T) and the update sizes: target vs retained."""
    hn, lora = run.hypernet, run.lora
    f_t = hn(run.item_emb[items])
    lora.set(f_t, torch.arange(len(items)))
    esd_t = losses.esd_loss_per_prompt(run.backend.predict(z, t, run.cond_t.index(items)),
                                       e_p, e_a, run.cfg.eta)
    lora.clear()
    esd_0 = losses.esd_loss_per_prompt(run.backend.predict(z, t, run.cond_t.index(items)),
                                       e_p, e_a, run.cfg.eta)
    f_r = hn(run.retain_emb[: min(256, len(run.retain_emb))])
    return {"esd_T": float(esd_t.mean()), "esd_base": float(esd_0.mean()),
            "esd_T_rel": float(esd_t.mean() / esd_0.mean().clamp(min=1e-12)),
            "delta_target": float(delta_norm(f_t).mean()),
            "delta_retain": float(delta_norm(f_r).mean()),
            "concepts": concept_monitor(run, items, esd_t, esd_0)}


CONCEPT_MONITOR_PROMPTS = 32  # per concept, evenly spread over its training prompts


@torch.no_grad()
def concept_monitor(run: Run, items, esd_t, esd_0) -> dict:
    """{target: {"delta_target": median update norm of (up to 32 of) the concept's own training
    prompts, and over this batch's rows of the concept: "esd_T", "esd_base", "esd_T_rel",
    "rows"}}. The pooled `delta_target` hides a concept the hypernetwork barely fires for; the
    ESD numbers come from the batch (summed over processes), so a concept drawn in no row of
    it gets "rows": 0 and no ESD numbers at that step."""
    n = len(run.concepts)
    picks = []
    for c in range(n):
        own = [i for i, it in enumerate(run.items[:run.own_items]) if it[0] == c]
        count = min(CONCEPT_MONITOR_PROMPTS, len(own))
        picks.append([own[j] for j in torch.linspace(0, len(own) - 1, count).round().long()])
    norms = delta_norm(run.hypernet(run.item_emb[[i for p in picks for i in p]]))
    owner = torch.as_tensor([run.items[int(i)][0] for i in items.tolist()] if len(items) else [],
                            dtype=torch.long)
    sums = torch.zeros(n, 3, dtype=torch.float64)
    if len(owner):
        sums.index_add_(0, owner, torch.stack([esd_t.double().cpu(), esd_0.double().cpu(),
                                               torch.ones(len(owner), dtype=torch.float64)], 1))
    if run.world > 1:
        sums = run.dist.sum(sums)
    out, start = {}, 0
    for c, concept in enumerate(run.concepts):
        own = norms[start:start + len(picks[c])]
        start += len(picks[c])
        entry = {"delta_target": float(own.median()), "rows": int(sums[c, 2])}
        if sums[c, 2] > 0:
            entry.update(esd_T=float(sums[c, 0] / sums[c, 2]),
                         esd_base=float(sums[c, 1] / sums[c, 2]),
                         esd_T_rel=float(sums[c, 0] / sums[c, 1].clamp(min=1e-12)))
        out[concept.target] = entry
    return out


def concept_summary(run: Run, refs: dict | None) -> str | None:
    """The end-of-training line for several concepts: each one's update size (median over its
    training prompts, what the file stores as `concept_references`) and its ESD ratio with the
    LoRA on, averaged over the last quarter of the logged steps; the weakest concept is the one
    whose ESD loss fell least (highest ratio), else the one with the smallest update."""
    if len(run.concepts) < 2:
        return None
    tail = run.log[-max(1, len(run.log) // 4):]
    ratio = {}
    for c in run.concepts:
        values = [r["concepts"][c.target]["esd_T_rel"] for r in tail
                  if "esd_T_rel" in r.get("concepts", {}).get(c.target, {})]
        if values:
            ratio[c.target] = sum(values) / len(values)
    parts = []
    for c in run.concepts:
        bits = []
        if refs and c.target in refs:
            bits.append(f"update {refs[c.target]:.3g}")
        if c.target in ratio:
            bits.append(f"ESD ratio {ratio[c.target]:.2f}")
        parts.append(f"{c.target} ({', '.join(bits) or 'no numbers'})")
    if ratio:
        weak = max(ratio, key=ratio.get)
        why = f"its ESD loss fell least (ratio {ratio[weak]:.2f} of the base's)"
    elif refs:
        weak = min(refs, key=refs.get)
        why = f"smallest update ({refs[weak]:.3g})"
    else:
        return None
    return (f"per concept: {'; '.join(parts)}; weakest: {weak}, {why}. Update sizes and ESD "
            "ratios are training signals, not measured erasure: score the file per concept "
            "(--eval on the toy, or unhype eval)")


def _finite(value: float, what: str, step: int):
    if not math.isfinite(value):
        raise NaNLoss(f"{what} loss is {value} at step {step + 1}")


def _mean_over_processes(run: Run, record: dict) -> dict:
    """Logged numbers of this process's rows -> the global batch's (equal shares: the mean)."""
    if run.world == 1:
        return record
    keys = list(record)
    values = run.dist.mean(torch.tensor([float(record[k]) for k in keys], dtype=torch.float64))
    out = dict(zip(keys, values.tolist()))
    if "esd_T_rel" in out:
        out["esd_T_rel"] = out["esd_T"] / max(out["esd_base"], 1e-12)
    return out


def training_attention(device: torch.device):
    """PyTorch SDPA kernels for the gradient steps on CUDA: flash, memory-efficient or math, not
    cuDNN's. cuDNN attention's backward failed at FLUX.1's shapes (24 heads x 128, 4608 tokens,
    bf16) on an H200 with torch 2.11 + CUDA 13 ("mha_graph.execute(...).is_good()", then an
    illegal memory access; benchmarks/bench_gpu.py --anomaly named the op)."""
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel
    except ImportError:  # torch < 2.3: no cuDNN attention to avoid either
        return contextlib.nullcontext()
    if torch.device(device).type != "cuda":
        return contextlib.nullcontext()
    return sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION,
                        SDPBackend.MATH])


def _phase(run: Run, name: str, step: int, compute, params) -> tuple[float, dict, object]:
    """One optimiser's step: `gradient_accumulation_steps` batches, gradients averaged over
    micro-batches (accelerate) and processes, then the step. Returns (loss, extras, batch)."""
    accel, cfg = run.accelerator, run.cfg
    k = cfg.gradient_accumulation_steps
    optimiser = run.optimisers[name]
    optimiser.zero_grad(set_to_none=True)
    total, extras, batch = 0.0, {}, None
    for micro in range(k):
        with accel.accumulate(), training_attention(run.backend.device):
            run.noise_gen = tdist.process_generator(cfg.seed, step, micro, run.rank)
            loss, extra, batch = compute()
            value = float(loss.detach())
            total += value / k
            for key, v in extra.items():
                extras[key] = extras.get(key, 0.0) + v / k
            if math.isfinite(value):  # a bad loss is reported below, by every process at once
                accel.backward(loss)
    run.noise_gen = None
    values = tdist.average_grads(run.dist, params, [total, *extras.values()])
    total, extras = values[0], dict(zip(extras, values[1:]))
    _finite(total, {"remove": "removal", "retain": "retention"}[name], step)
    optimiser.step()
    run.schedulers[name].step()
    return total, extras, batch


def lr_schedules(cfg: TrainConfig, optimisers: dict, step: int = 0) -> dict:
    """diffusers' schedule `lr_scheduler` for each optimiser, advanced to `step` (a resumed run
    continues the schedule where it stopped; it is a function of the step alone)."""
    from diffusers.optimization import get_scheduler

    out = {}
    for name, optimiser in optimisers.items():
        inner = getattr(optimiser, "optimizer", optimiser)  # accelerate's wrapper
        rate = cfg.learning_rate if name == "remove" else cfg.retain_learning_rate
        inner.defaults["lr"] = rate  # polynomial's lr_end is relative to it
        for group in inner.param_groups:  # the schedule's base: the configured rate
            group["initial_lr"] = group["lr"] = rate
        schedule = get_scheduler(cfg.lr_scheduler, inner, num_warmup_steps=cfg.lr_warmup_steps,
                                 num_training_steps=cfg.max_train_steps,
                                 num_cycles=cfg.lr_scheduler_num_cycles,
                                 power=cfg.lr_scheduler_power)
        with warnings.catch_warnings():  # fast-forwarding without optimiser steps is the point
            warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler.step\(\)`")
            for _ in range(step):
                schedule.step()
        out[name] = schedule
    return out


# --- the loop ---------------------------------------------------------------------------------
def train(run: Run, progress: bool = True) -> int:
    """Train; returns an exit code (0 done, 3 NaN, 130 interrupted). Writes all outputs (the
    main process). Runs under `accelerate launch` as well: see unhype/trainer/distributed.py."""
    cfg, hn = run.cfg, run.hypernet
    if run.accelerator is None:
        run.accelerator = tdist.make_accelerator(cfg)
    accel = run.accelerator
    dist = run.dist
    tdist.check_batch(cfg, dist.world)
    run.rank, run.world = dist.rank, dist.world
    main = dist.is_main
    params = [p for p in hn.parameters() if p.requires_grad]
    removal, retention = accel.prepare(torch.optim.Adam(params, lr=cfg.learning_rate),
                                       torch.optim.Adam(params, lr=cfg.retain_learning_rate))
    optimisers = run.optimisers = {"remove": removal, "retain": retention}
    gen = torch.Generator().manual_seed(cfg.seed)  # the global stream: the same in every process
    ckpt_dir = run.out_dir / "checkpoints"
    log_path = Path(cfg.logging_dir or run.out_dir) / f"{cfg.output_name}-loss.jsonl"
    if main:
        log_path.parent.mkdir(parents=True, exist_ok=True)
    step = 0
    if run.resume_from is not None:
        step, tensors, meta = ckpt.load_checkpoint(run.resume_from, run.fingerprint)
        rng = ckpt.restore(tensors, meta, hn, optimisers)
        gen.set_state(rng["gen"])
        torch.set_rng_state(rng["torch"])
        if main:
            _truncate_log(log_path, step)
            say(f"unhype train: resumed from {run.resume_from} at step {step}"
                + (f" ({dist.world} processes)" if dist.world > 1 else "")
                + _batch_note(meta, cfg.train_batch_size))
    else:
        torch.manual_seed(cfg.seed)  # what the global RNG draws is the same in every run
        if main and log_path.exists():
            log_path.unlink()
        earlier = ckpt.list_checkpoints(ckpt_dir) if main else []
        if earlier:  # another run's: they would crowd out this run's and mislead --resume
            aside = ckpt.set_aside(ckpt_dir, earlier)
            say(f"unhype train: {len(earlier)} checkpoint(s) of an earlier run moved to {aside}")
    run.schedulers = lr_schedules(cfg, optimisers, step)
    if dist.rank > 0:  # per-process seeding of torch's global RNG (process 0 keeps the saved one)
        torch.manual_seed(tdist.process_generator(cfg.seed, step, -1, dist.rank).initial_seed())
    if cfg.latent_cache and run.cache is None:
        t0 = time.time()
        run.cache = shared_cache(run, dist, progress)
        index_cache(run)
        if main:
            say(f"unhype train: latent cache of {len(run.cache['t'])} (z_t, t) pairs built in "
                f"{time.time() - t0:.0f} s" + (f", shared by {dist.world} processes"
                                                 if dist.world > 1 else ""))
    sampler = None
    if main and step < cfg.max_train_steps:
        from unhype.trainer.samples import SampleGrids

        sampler = SampleGrids(run)
        sampler.before(progress)

    def checkpoint(at, note=""):
        rng = {"gen": gen.get_state(), "torch": torch.get_rng_state()}
        def save():
            return ckpt.save_checkpoint(ckpt_dir, at, hn, optimisers, rng, run.fingerprint,
                                        {"config": cfg.to_dict(), "processes": dist.world},
                                        keep=cfg.save_last_n_checkpoints)
        before = set(ckpt.list_checkpoints(ckpt_dir))
        path = written("checkpoint", ckpt.checkpoint_path(ckpt_dir, at), save,
                       note or _last_note(last_good))
        for gone in before - set(ckpt.list_checkpoints(ckpt_dir)):  # pruned: its result too
            step_result_path(run, int(gone.stem.split("-")[1])).unlink(missing_ok=True)
        return path

    def save_point(at):
        """--save_every_n_steps: a usable hypernetwork of this step (as kohya's
        <name>-stepNNNNNNNN), then the resume checkpoint."""
        path = step_result_path(run, at)
        written("the step result", path, lambda: save_result(run, at, path),
                _last_note(last_good))
        return checkpoint(at)

    bar = None
    if progress and main:
        from tqdm import tqdm

        bar = tqdm(total=cfg.max_train_steps, initial=step, desc="unhype train",
                   dynamic_ncols=True, file=sys.stderr)
    last_good = ckpt.list_checkpoints(ckpt_dir)[-1] if ckpt.list_checkpoints(ckpt_dir) else None
    t_start = time.time()

    def removal_step():
        batch = draw_batch(run, gen)
        loss, extra = removal_loss(run, *batch, gen)
        return loss, extra, batch

    def retention_step():
        return retain_loss(run, gen), {}, None

    log = open(log_path, "a", encoding="utf-8") if main else None
    stop = DeferredInterrupt(say if main else (lambda _: None), dist)
    try:
        stop.__enter__()
        while step < cfg.max_train_steps:
            l_remove, extra, batch = _phase(run, "remove", step, removal_step, params)
            l_retain, _, _ = _phase(run, "retain", step, retention_step, params)
            step += 1
            if step % cfg.log_every == 0 or step == cfg.max_train_steps:
                seen = {**extra, **monitor(run, *batch)}
                per_concept = seen.pop("concepts")  # already global (concept_monitor)
                seen = _mean_over_processes(run, seen)
                record = {"step": step, "remove": l_remove, "retain": l_retain, **seen,
                          "concepts": per_concept, "time": round(time.time() - t_start, 2)}
                if main:
                    log.write(json.dumps(record) + "\n")
                    log.flush()
                run.log.append(record)
            if bar is not None:
                bar.update(1)
                bar.set_postfix(remove=f"{l_remove:.3g}", retain=f"{l_retain:.3g}",
                                refresh=False)
            if cfg.save_every_n_steps and step % cfg.save_every_n_steps == 0 \
                    and step < cfg.max_train_steps and main:
                last_good = save_point(step)
            if cfg.sample_every_n_steps and step % cfg.sample_every_n_steps == 0 \
                    and step < cfg.max_train_steps and main:
                sampler.after(step)
            if step < cfg.max_train_steps:
                stop.check()
    except NaNLoss as exc:
        if bar is not None:
            bar.close()
        where = f"the last good checkpoint is {last_good} (resume with --resume {last_good})" \
            if last_good else "no checkpoint was saved yet (use --save_every_n_steps)"
        if main:
            damaged = run.backend.nonfinite_weights()
            advice = (f"The base model itself holds NaN/Inf weights ({', '.join(damaged[:3])}"
                      f"{', ...' if len(damaged) > 3 else ''}): the checkpoint is damaged; "
                      "training cannot fix that." if damaged else
                      "Try a lower --learning_rate or --fields_lambda, or --mixed_precision no.")
            say(f"unhype train: stopped: {exc}; nothing was written for this step; {where}. "
                + advice)
        return EXIT_NAN
    except StopAtStepEnd:
        if bar is not None:
            bar.close()
        if main:
            path = checkpoint(step)
            say(f"unhype train: interrupted after step {step}; saved {path}; continue with "
                f"--resume {path}")
        return EXIT_INTERRUPTED
    except KeyboardInterrupt:
        if bar is not None:
            bar.close()
        # stopped in the middle of a step (a second Ctrl-C, or outside the main thread): its
        # state is half updated, so nothing is saved for it
        where = f"the last checkpoint is {last_good} (resume with --resume {last_good})" \
            if last_good else "no checkpoint was saved (use --save_every_n_steps)"
        if main:
            say(f"\nunhype train: stopped during step {step + 1}, not saved; {where}")
        return EXIT_INTERRUPTED
    finally:
        stop.__exit__()
        if log is not None:
            log.close()
    if bar is not None:
        bar.close()
    if main:  # the result first: it is what the run is for, and the smaller file
        out_path = result_path(run)
        written("the result", out_path, lambda: save_result(run, step), _last_note(last_good))
        final = checkpoint(step, f"; the result {out_path} was written and is complete (only "
                                 "this step's resume checkpoint is missing)")
        if sampler is not None:
            grids = sampler.after(step)
            say(f"unhype train: sample grids: {', '.join(str(g) for g in grids)}")
        say(f"unhype train: wrote {out_path} (checkpoint {final.name}); loss log {log_path}")
        summary = concept_summary(run, run.concept_refs)
        if summary:
            say(f"unhype train: {summary}")
    dist.barrier()  # the result exists when any process returns
    run.result_path = result_path(run)
    return 0


def _batch_note(meta: dict, batch: int) -> str:
    before = ckpt.recorded_config(meta).get("train_batch_size")
    if before is None or before == batch:
        return ""
    return f"; train_batch_size {before} -> {batch}: the steps from here draw {batch} prompts"


def _write_errors() -> tuple:
    try:
        from safetensors import SafetensorError  # safetensors' own I/O errors (disk full)
    except ImportError:
        return (OSError,)
    return (OSError, SafetensorError)


def written(what: str, path: Path, write, note: str = ""):
    """`write()` (which writes `path`); a disk error (full, I/O) becomes an UnHypeError that
    names the file, the cause and `note` (what is safe), instead of a traceback."""
    try:
        return write()
    except _write_errors() as exc:
        cause = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise UnHypeError(f"could not write {what} {path} ({cause}){note}") from None


def _last_note(last_good) -> str:
    return (f"; the last checkpoint is {last_good} (free space, then --resume {last_good})"
            if last_good else "; no checkpoint was saved before it")


def result_path(run: Run) -> Path:
    return run.out_dir / f"{run.cfg.output_name}.safetensors"


def step_result_path(run: Run, step: int) -> Path:
    return run.out_dir / f"{run.cfg.output_name}-step{step:08d}.safetensors"


def save_result(run: Run, step: int, path: Path | None = None) -> Path:
    """The hypernetwork file (`path`, default the result) with the run's metadata."""
    cfg = run.cfg
    path = path or result_path(run)
    training = public_options({k: v for k, v in cfg.to_dict().items() if k not in ("resume",)})
    # the precision the base model really ran in (the toy models ignore --mixed_precision)
    ran = {torch.float16: "fp16", torch.bfloat16: "bf16"}.get(run.backend.dtype, "no")
    training.update(mixed_precision=ran,
                    steps_done=step, method="unhype", retained_prompts=len(run.retain_prompts),
                    prediction_type=run.backend.prediction_type,
                    esd_space=f"native model output ({run.backend.prediction_type})",
                    final=run.log[-1] if run.log else {})
    refs = concept_references(run)
    ref = min(refs.values()) if refs else None
    if ref is not None and ref > 0 and math.isfinite(ref):
        training["gate_reference"] = ref
        # each concept's own median, for tools that measure a prompt against its own concept
        # (the hosts' floor reads only gate_reference, the minimum)
        training["concept_references"] = refs
    # each concept's signature: a prompt's concept is named by its update's direction, for
    # saturation to that concept's own reference and for long prompts' windows
    from unhype.concept_signatures import KEY, mean_embeddings

    signatures = mean_embeddings(run.backend.embed, run.concepts)
    if signatures:
        training[KEY] = signatures
    training.update(base_model_hashes(cfg.pretrained_model_name_or_path))  # cached per file
    concepts = concept_table(run.concepts)
    return save_hypernet(path, run.hypernet, run.backend.family.name, concepts=concepts,
                         training=training)


# options that may hold local paths: the shared file keeps only their last part (as kohya)
PATH_OPTIONS = ("output_dir", "logging_dir", "pretrained_model_name_or_path", "model_config",
                "concepts", "sample_prompts", "template_set")


def _base_name(value):
    """A local path's last part; anything else (a hub id, 'toy', concept names) as given."""
    if not isinstance(value, str) or not value:
        return value
    from unhype.trainer.concepts import could_be_path

    local = could_be_path(value) and (Path(value).is_absolute() or Path(value).exists())
    return Path(value).name if local else value


def public_options(options: dict) -> dict:
    """The training options as the result file records them: no local folder names."""
    out = dict(options)
    for key in PATH_OPTIONS:
        if key in out:
            out[key] = _base_name(out[key])
    if isinstance(out.get("retain_prompts"), str):
        out["retain_prompts"] = ",".join(_base_name(v.strip())
                                         for v in out["retain_prompts"].split(","))
    if isinstance(out.get("concepts_inline"), list):
        out["concepts_inline"] = [
            {k: _base_name(v) if k in ("templates", "template_set") else v for k, v in e.items()}
            if isinstance(e, dict) else e for e in out["concepts_inline"]]
    return out


def gate_reference(run: Run) -> float | None:
    """What the gate floor of the saved file is relative to (unhype.gate_floor): the smallest,
    over the concepts, median update norm of the concept's training prompts; None while the
    update is still exactly zero."""
    from unhype.gate_floor import concepts_reference

    return concepts_reference(run.hypernet, run.backend.embed, run.concepts)


def concept_references(run: Run) -> dict[str, float]:
    """{target: median update norm of the concept's own training prompts} (gate_floor), kept
    on the run for the end-of-training summary."""
    from unhype.gate_floor import concept_references as refs

    run.concept_refs = refs(run.hypernet, run.backend.embed, run.concepts)
    return run.concept_refs


def _truncate_log(path: Path, step: int):
    if not path.exists():
        return
    keep, dropped = [], 0
    for ln in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            record = json.loads(ln) if ln.strip() else None
        except json.JSONDecodeError:  # a line half-written when the run was killed
            record, dropped = None, dropped + 1
        at = record.get("step", 0) if isinstance(record, dict) else None
        if isinstance(at, (int, float)) and at <= step:
            keep.append(ln)
    if dropped:
        say(f"unhype train: {path}: dropped {dropped} unreadable line(s)")
    atomic_write_text(path, "".join(ln + "\n" for ln in keep))
