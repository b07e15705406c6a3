"""The trainer on HF accelerate: one code path for 1 process and N (`accelerate launch`).

The hypernetwork is not wrapped in DDP (the fields loss calls it three times per step and takes
inner gradients w.r.t. LoRA factor leaves, which DDP's one-forward-per-backward hooks do not
allow). Instead every process draws the same global batch with the same global generator, takes
its contiguous share of the rows, and before each optimiser step the gradients are averaged
across processes explicitly (`average_grads`, one all-reduce of a flat buffer). Equal shares make
the mean of the per-process means the global mean, so N processes compute what one process
computes on the whole batch, up to the order of float additions.

Randomness: the global generator (batch composition, cache rows, s, retain rows) is one stream,
the same in every process and stored in checkpoints; what is per process (the noise of fresh
z_t when `latent_cache = 0`) comes from a generator derived from (seed, step, micro-step,
process index), so nothing per process needs saving and `--resume` works with any count.
"""

from __future__ import annotations

import hashlib
import os

import torch

from unhype.errors import UnHypeError


def make_accelerator(cfg):
    """An `Accelerator` with kohya's mixed precision and gradient accumulation options."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState

    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        # one process (tests, benchmarks, several runs in one interpreter): accelerate keeps
        # its state process-wide and refuses a second mixed_precision, so start it afresh
        AcceleratorState._reset_state()
        GradientState._reset_state()
    # cpu=True is what lets N processes on a machine without GPUs form a gloo group
    cpu = cfg.device == "cpu" or (cfg.device == "auto" and not torch.cuda.is_available())
    return Accelerator(mixed_precision=cfg.mixed_precision, cpu=cpu,
                       gradient_accumulation_steps=cfg.gradient_accumulation_steps)


def check_batch(cfg, world: int) -> None:
    if cfg.train_batch_size % world:
        raise UnHypeError(f"--train_batch_size {cfg.train_batch_size} is the global batch, split "
                          f"over {world} processes: it must be a multiple of {world}")


def process_generator(seed: int, step: int, micro: int, rank: int) -> torch.Generator:
    """A generator for what differs per process, derived from where the run is, not stored."""
    key = f"unhype:{seed}:{step}:{micro}:{rank}".encode()
    value = int.from_bytes(hashlib.sha256(key).digest()[:8], "little") & ((1 << 63) - 1)
    return torch.Generator().manual_seed(value)


def average_grads(dist, params: list[torch.Tensor], scalars: list[float]) -> list[float]:
    """Mean gradients (and the logged `scalars`) over processes; no-op for one process.

    A parameter without a gradient counts as zero; it stays without one only if no process has
    one (Adam skips it then, as with one process)."""
    if dist.world == 1:
        return list(scalars)
    device = params[0].device
    has = torch.tensor([float(p.grad is not None) for p in params], device=device)
    flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1)
                      for p in params] + [has, torch.tensor(scalars, device=device,
                                                            dtype=has.dtype)])
    flat = dist.mean(flat)
    offset = 0
    n_params = sum(p.numel() for p in params)
    flags = flat[n_params:n_params + len(params)]
    for p, flag in zip(params, flags.tolist()):
        size = p.numel()
        p.grad = flat[offset:offset + size].view_as(p).clone() if flag > 0 else None
        offset += size
    return flat[n_params + len(params):].tolist()
