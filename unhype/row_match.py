"""Which prompt each row of a UNet batch belongs to, read from the rows' own conditioning.

Web UIs batch the denoiser's rows in several ways (cond rows then uncond rows, separate calls
per chunk, composable AND prompts, skipped uncond, hires passes, Forge's own batching), so a
fixed row layout is not reliable. Each prompt's cross-attention conditioning is unique, so the
rows are recognised by content instead: a row whose context starts with a known prompt's
conditioning (within a relative tolerance, so fp16/fp32 recomputation still matches) gets
that prompt's index; any other row (unconditional, negative prompt, unknown) gets -1, or, when
the LoRA is applied to every row, the index of its batch item by position.
"""

from __future__ import annotations

import torch
from torch import Tensor

from unhype.errors import UnHypeError


class CondBank:
    """Known conditional rows: cross-attention conditioning -> prompt index."""

    def __init__(self, tolerance: float = 3e-2):
        self.tolerance = tolerance
        self._entries: list[tuple[Tensor, int]] = []
        self._on: dict = {}
        self._latents: list[tuple[Tensor, int]] = []  # recent cond rows' latents -> index

    def __len__(self) -> int:
        return len(self._entries)

    def add(self, cond: Tensor, index: int) -> None:
        """Register one conditioning ([tokens, dim] or [1, tokens, dim]) for prompt `index`."""
        cond = cond.detach()
        if cond.dim() == 3 and cond.shape[0] == 1:
            cond = cond[0]
        if cond.dim() != 2:
            raise UnHypeError(f"conditioning must be [tokens, dim], got {tuple(cond.shape)}")
        for known, _ in self._entries:
            if known.shape == cond.shape and torch.equal(known, cond.float().cpu()):
                return  # same text twice: the first index wins, both give the same LoRA
        self._entries.append((cond.float().cpu().clone(), int(index)))
        self._on.clear()

    def release(self) -> None:
        """Forget every row (the bank's owner is done with it): entries, device copies,
        remembered latents."""
        self._entries.clear()
        self._on.clear()
        self._latents.clear()

    def _entries_on(self, device) -> list[tuple[Tensor, Tensor, int]]:
        if device not in self._on:
            self._on[device] = [(e.to(device), e.to(device).norm().clamp_min(1e-12), i)
                                for e, i in self._entries]
        return self._on[device]

    def match(self, context: Tensor) -> list[int]:
        """Prompt index of each row of `context` [B, tokens, dim], -1 where none matches."""
        if context is None or context.dim() != 3:
            raise UnHypeError("UNet context must be [batch, tokens, dim]")
        ctx = context.detach().float()
        best = torch.full((ctx.shape[0],), float("inf"), device=ctx.device)
        best_gap = torch.full((ctx.shape[0],), ctx.shape[1] + 1, device=ctx.device)
        index = torch.full((ctx.shape[0],), -1, dtype=torch.long, device=ctx.device)
        for known, norm, i in self._entries_on(ctx.device):
            if known.shape[1] != ctx.shape[2]:
                continue
            n = min(known.shape[0], ctx.shape[1])
            dist = (ctx[:, :n] - known[:n]).flatten(1).norm(dim=1) / norm
            # a prompt whose conditioning is another's first chunk ("a dog" and "a dog BREAK a
            # cat") matches that one's rows too: the entry as long as the rows wins
            gap = abs(known.shape[0] - ctx.shape[1])
            better = (dist < self.tolerance) & ((gap < best_gap) | ((gap == best_gap) &
                                                                    (dist < best)))
            best = torch.where(better, dist, best)
            best_gap = torch.where(better, torch.full_like(best_gap, gap), best_gap)
            index = torch.where(better, torch.full_like(index, i), index)
        return index.tolist()

    def rows(self, context: Tensor, item_rows: list[int] | None = None,
             cond_only: bool = True, latents: Tensor | None = None) -> list[int]:
        """Row map for one UNet call.

        cond_only: unmatched rows run the base weights (-1). Otherwise an unmatched row gets the
        index of its batch item's (first) prompt: found by its latent, which CFG gives the
        item's cond and uncond rows alike, also when the host split them over several calls
        (`latents` [B, ...]: the call's input); else the k-th unmatched row gets
        item_rows[k % len(item_rows)] (A1111 and Forge put one uncond row per batch item, in
        item order).
        """
        rows = self.match(context)
        if cond_only or not item_rows:
            return rows
        if latents is not None and latents.shape[0] == len(rows):
            for r, value in enumerate(rows):
                if value >= 0 and self._recall(latents[r]) is None:
                    self._latents.append((latents[r].detach().clone(), value))
            del self._latents[:-256]  # this step's rows are the latest
            for r, value in enumerate(rows):
                if value < 0:
                    rows[r] = self._recall(latents[r], default=-1)
        k = 0
        for r, value in enumerate(rows):
            if value < 0:
                rows[r] = item_rows[k % len(item_rows)]
                k += 1
        return rows

    def _recall(self, latent: Tensor, default=None):
        for known, index in reversed(self._latents):
            if known.shape == latent.shape and known.device == latent.device and \
                    torch.equal(known, latent):
                return index
        return default
