"""One sampling run with UnHype: prompts -> embeddings -> LoRA factors -> per-row hooks.

`build_session` does all the work that can fail (files, family check, text encoding,
hypernetwork) before anything is hooked; `Session.attach` adds forward hooks on the UNet's
target modules (core DynamicLoRA) plus one forward pre-hook on the UNet that sets each call's
row map from the rows' own cross-attention context (core CondBank). `Session.remove` takes them
all off; the script calls it in a ``finally`` around ``p.sample``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import NamedTuple

import torch

from unhype.dynamic_lora import DynamicLoRA
from unhype.errors import UnHypeError
from unhype.fileformat import LoadedHypernet, host_paths
from unhype.model_check import detect_family, family_problem
from unhype.prompt_tags import has_break, plain_text, split_and
from unhype.prompt_windows import prompt_windows, stack_rows
from unhype.row_match import CondBank

from unhype_webui import host

log = logging.getLogger("unhype")
MISMATCH_CONTINUE = "Generate without UnHype"
MISMATCH_STOP = "Stop with an error"
FLUX_NEEDS_FORGE = " (FLUX models run in Forge; A1111 cannot load them)"


def host_family_problem(file_family: str, model_family: str, file_name: str = "") -> str | None:
    """family_problem, pointing to Forge when a FLUX file meets A1111, which runs no FLUX."""
    problem = family_problem(file_family, model_family, file_name)
    if problem and file_family == "flux" and not host.is_forge():
        problem += FLUX_NEEDS_FORGE
    return problem


@dataclass
class Active:
    """One hypernetwork to apply: from the panel (items=None: every prompt) or from tags."""

    name: str
    file_hash: str
    loaded: LoadedHypernet
    strength: float
    cond_only: bool = True
    items: set[int] | None = None


@dataclass(eq=False)
class Session:
    unet: torch.nn.Module
    actives: list[Active]
    bank: CondBank
    factors: list[dict]
    item_k: list[int]
    warnings: list[str] = field(default_factory=list)
    loras: list[DynamicLoRA] = field(default_factory=list)
    _pre_handle: object = None
    calls: int = 0

    @property
    def attached(self) -> bool:
        return self._pre_handle is not None or bool(self.loras)

    def attach(self) -> "Session":
        try:
            for active, factors in zip(self.actives, self.factors):
                meta = active.loaded.meta
                dims = {t.name: (t.in_dim, t.out_dim) for t in meta.config.targets}
                lora = DynamicLoRA.attach(self.unet, host_paths(meta, "ldm"), dims)
                self.loras.append(lora)
                lora.set(factors, [-1], active.strength, skip_silent=True)
            if self.loras:
                self._pre_handle = self.unet.register_forward_pre_hook(self._pre_hook,
                                                                       with_kwargs=True)
        except BaseException:
            self.remove()
            raise
        return self

    def remove(self) -> None:
        if self._pre_handle is not None:
            self._pre_handle.remove()
            self._pre_handle = None
        while self.loras:
            self.loras.pop().remove()
        # a session is never attached again (each pass builds its own): what it held for its
        # rows goes now, not when the generation ends (one per batch-count iteration and pass)
        self.bank.release()
        self.factors = []

    def row_maps(self, context, latents=None) -> dict[bool, list[int]]:
        maps = {}
        for active in self.actives:
            if active.cond_only not in maps:
                maps[active.cond_only] = self.bank.rows(context, self.item_k, active.cond_only,
                                                        latents)
        return maps

    def _pre_hook(self, module, args, kwargs):
        context = kwargs.get("context")
        if context is None and len(args) > 2:
            context = args[2]
        if context is None:
            raise UnHypeError("UnHype: the UNet was called without a text context")
        if isinstance(context, (list, tuple)):  # ldm's c_crossattn list form
            context = torch.cat(list(context), dim=1)
        latents = args[0] if args else kwargs.get("x")
        maps = self.row_maps(context, latents if isinstance(latents, torch.Tensor) else None)
        for active, lora in zip(self.actives, self.loras):
            lora.set_rows(maps[active.cond_only])
        self.calls += 1
        return None


def fit_problems(actives: list[Active], model_family: str, on_mismatch: str,
                 where: str = "") -> list[str]:
    """Notes for the files that do not fit a model of `model_family` (which then run without
    them), or, by default, UnHypeError for the first. `where` names the checkpoint."""
    warnings = []
    for active in actives:
        problem = host_family_problem(active.loaded.meta.family, model_family, active.name)
        if not problem:
            continue
        if on_mismatch != MISMATCH_CONTINUE:
            raise UnHypeError(problem + f" (Settings > UnHype > '{MISMATCH_CONTINUE}' lets the "
                              f"generation continue without it){where}")
        warnings.append(problem + where)
        log.warning(problem + where)
    return warnings


class Schedule(NamedTuple):
    """How the web UI schedules one pass's prompt editing (prompt_parser.
    get_learned_conditioning_prompt_schedules): its total steps; for a hires pass the first
    pass's total and its own (``hires_steps``); the old-scheduling setting."""
    steps: int
    hires_steps: int | None = None
    old: bool = False


def conditioning_groups(prompt: str, schedule: Schedule) -> list[list[str]]:
    """The texts one prompt's conditioning rows are computed from: per AND part, its schedule
    (prompt editing) texts. The host encodes each group in one call (prompt_parser.
    get_learned_conditioning, Forge L158 / A1111 1.10: one get_learned_conditioning per
    prompt of its schedule texts), and emphasis normalisation depends on the call's batch, so
    UnHype encodes the same groups to get the same tensors."""
    parts = [text for text, _ in split_and(prompt)] or [prompt]
    return [list(sched) for sched in host.prompt_schedules(parts, schedule, dedupe=False)]


def conditioning_texts(prompt: str, schedule: Schedule) -> list[str]:
    return list(dict.fromkeys(t for group in conditioning_groups(prompt, schedule)
                              for t in group))


def build_session(sd_model, actives: list[Active],
                  item_prompts: list[list[tuple[str, Schedule]]],
                  on_mismatch: str = MISMATCH_STOP) -> Session:
    """Everything needed to apply `actives` to a batch; item_prompts[i]: (prompt, its pass's
    schedule) of batch item i (first pass and hires). Raises UnHypeError before touching the
    model."""
    unet = host.diffusion_model(sd_model)
    model_family = detect_family(unet)
    warnings = fit_problems(actives, model_family, on_mismatch)
    usable = [a for a in actives if a.strength != 0 and
              not host_family_problem(a.loaded.meta.family, model_family, a.name)]
    bank = CondBank()
    if not usable:
        return Session(unet, [], bank, [], [], warnings)

    cond_texts, owners, groups = [], [], []
    guiding, avoiding = set(), set()  # texts of AND parts weighted >= 0 / < 0
    for i, prompts in enumerate(item_prompts):
        for prompt, schedule in prompts:
            weights = [w for _, w in split_and(prompt)] or [1.0]
            for group, weight in zip(conditioning_groups(prompt, schedule), weights):
                if group not in groups:
                    groups.append(group)
                (guiding if weight >= 0 else avoiding).update(group)
                for text in group:
                    if text not in cond_texts:
                        cond_texts.append(text)
                        owners.append(set())
                    owners[cond_texts.index(text)].add(i)
    embed_texts, text_k = [], []
    for text in cond_texts:
        plain = plain_text(text)
        if plain not in embed_texts:
            embed_texts.append(plain)
        text_k.append(embed_texts.index(plain))

    vectors = {}
    for group in groups:
        cond = host.learned_conditioning(sd_model, group)
        for text, row in zip(group, host.crossattn(cond)):
            if text in guiding:  # a part weighted below 0 steers away: the base model's, as
                bank.add(row, text_k[cond_texts.index(text)])  # the negative prompt is
        if model_family in host.POOLED_IN_VECTOR:
            for text, vec in zip(group, host.pooled_embeddings(sd_model, model_family, group,
                                                               cond)):
                vectors.setdefault(text_k[cond_texts.index(text)], vec)
    if model_family in host.POOLED_IN_VECTOR:
        emb = torch.stack([vectors[k] for k in range(len(embed_texts))])
    else:
        emb = host.pooled_embeddings(sd_model, model_family, embed_texts)
    # long prompts: also read through word windows (unhype.prompt_windows.combined_rows).
    # SDXL / FLUX: the host's vector is its first chunk's pooled output, which ends at a BREAK;
    # such a prompt is also read whole, without BREAK, as SD1 / SD2 prompts are (plain_text)
    broken = sorted({text_k[j] for j, text in enumerate(cond_texts) if has_break(text)}) \
        if model_family in host.POOLED_IN_VECTOR else []
    windows = [(k, embed_texts[k]) for k in broken] + \
        [(k, w) for k, text in enumerate(embed_texts) for w in prompt_windows(text)]
    read_for = list(range(len(embed_texts))) + [k for k, _ in windows]  # prompt of each row
    if windows:
        emb = torch.cat([emb, host.pooled_embeddings(sd_model, model_family,
                                                     [w for _, w in windows])])
    item_k = []
    for i, prompts in enumerate(item_prompts):
        first_text = conditioning_texts(*prompts[0])[0] if prompts else ""
        item_k.append(text_k[cond_texts.index(first_text)] if first_text in cond_texts else -1)

    factors = []
    for active in usable:
        want = active.loaded.meta.config.embed_dim
        if emb.shape[1] != want:
            raise UnHypeError(f"UnHype: {active.name} reads {want}-d embeddings, this model's "
                              f"text encoder gives {emb.shape[1]}-d")
        rows = emb.to(next(active.loaded.hypernet.parameters()).device)
        with torch.no_grad():
            if windows:  # the strongest reading, and those of other concepts windows name
                f = stack_rows(*active.loaded.pick_readings(rows, read_for, len(embed_texts)))
            else:
                f = active.loaded.generate(rows)
        if active.items is not None:  # a tag applies only to the prompts that carry it
            keep = torch.zeros(len(embed_texts))
            for j, owner in enumerate(owners):
                if owner & active.items:
                    keep[text_k[j]] = 1.0
            f = {n: (a * keep.to(a)[:, None, None], b) for n, (a, b) in f.items()}
        factors.append({n: (a.detach(), b.detach()) for n, (a, b) in f.items()})
    return Session(unet, usable, bank, factors, item_k, warnings)
