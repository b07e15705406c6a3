"""Host-agnostic logic of the ComfyUI adapter: per-conditioning LoRAs inside one batched forward.

ComfyUI's samplers batch several conditioning entries (positive prompts, area conds, the
negative) into one UNet call and tell a ``model_function_wrapper`` only which chunk is
conditional (``cond_or_uncond``) and the batched ``c_crossattn``. UnHype records, at Apply time,
the cross-attention tensor of every positive conditioning row it generated a LoRA for; inside
the wrapper each conditional row is matched against those tensors by value (ComfyUI pads shorter
prompts by repeating tokens and repeats rows to the latent batch, so a row's first ``L`` tokens
equal one recorded ``[L, D]`` row exactly). Matched rows get their prompt's LoRA whatever chunk
ComfyUI put them in (guiders that batch three conditionings label the chunks by their position
in the list, ``row_map``); the negative of a plain [positive, negative] call and unmatched rows
run the base weights. Forward hooks are attached on entry of every call and removed in
``finally``: the model is never left changed.

No ComfyUI import here; ``nodes/`` passes ComfyUI's objects in.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field

import torch
from torch import Tensor

from unhype.dynamic_lora import (DynamicLoRA, RowCache, check_strength, resolve_modules,
                                 silent_prompts)
from unhype.errors import UnHypeError
from unhype.families import APPLY_ALL, get_family
from unhype.fileformat import LoadedHypernet, host_paths
from unhype.hypernet import LoraFactors, delta_weight
from unhype.prompt_windows import stack_rows

log = logging.getLogger("unhype")

# ComfyUI labels each chunk of a call with the position of its conditioning in the list given to
# calc_cond_batch: a plain sampler passes [positive, negative], DualCFGGuider [negative, middle,
# positive], PerpNegGuider [positive, negative, empty], SAG / PAG / PerpNeg's patch re-run one
# conditioning alone as [x] (label 0)
COND, UNCOND = 0, 1
# the pooled embeddings of a long prompt's word windows [W, D], stored in the conditioning by
# UnHype Text Encode (unhype.prompt_windows; ComfyUI's own pooled_output is the first chunk's)
WINDOWS_KEY = "unhype_pooled_windows"
# the embedding itself, where ComfyUI's pooled_output is another vector (SD 2.x: UnHype Text
# Encode stores it)
EMBEDDING_KEY = "unhype_embedding"
# SD 2.x: ComfyUI's pooled_output is OpenCLIP-H's last layer, projected; the trainer reads the
# penultimate layer's EOS row (diffusers' SD2 text encoder drops the last layer)
OWN_EMBEDDING_SOURCES = {"openclip_h_pooled"}


def pooled_rows(conditioning, embed_dim: int, source: str,
                node: str = "UnHype Apply") -> list[Tensor]:
    """The pooled embedding rows [k, D] of each conditioning entry, with clear errors that name
    the node reading them."""
    if not isinstance(conditioning, (list, tuple)) or not conditioning:
        raise UnHypeError(f"{node}: the conditioning is empty; connect a CLIP Text Encode "
                          "output")
    out = []
    for i, entry in enumerate(conditioning):
        try:
            cross, extra = entry[0], entry[1]
        except (TypeError, IndexError, KeyError):
            raise UnHypeError(f"{node}: conditioning entry {i} is not a "
                              "[tensor, dict] pair") from None
        if not isinstance(cross, Tensor) or cross.dim() != 3:
            raise UnHypeError(f"{node}: conditioning entry {i} has no [batch, tokens, dim] "
                              "cross-attention tensor")
        if cross.shape[0] == 0:
            raise UnHypeError(f"{node}: conditioning entry {i} holds no prompt (batch 0)")
        own = extra.get(EMBEDDING_KEY) if isinstance(extra, dict) else None
        pooled = own if own is not None else \
            extra.get("pooled_output") if isinstance(extra, dict) else None
        if own is None and source in OWN_EMBEDDING_SOURCES and pooled is not None:
            raise UnHypeError(
                f"{node}: conditioning entry {i}: on SD 2.x ComfyUI's pooled_output is "
                f"another vector than the {source} this hypernetwork reads (OpenCLIP-H's last "
                "layer, projected, where it was trained on the penultimate layer's): encode "
                "the prompt with 'UnHype Text Encode', which stores the right one")
        if pooled is not None and (not isinstance(pooled, Tensor) or pooled.dim() == 0):
            raise UnHypeError(f"{node}: conditioning entry {i}'s 'pooled_output' is not "
                              f"a [batch, dim] tensor ({type(pooled).__name__})")
        if pooled is None:
            raise UnHypeError(
                f"{node}: conditioning entry {i} has no 'pooled_output'; this hypernetwork "
                f"reads {source} ({embed_dim}-d) from it. Use a CLIP Text Encode output directly "
                "(nodes such as ConditioningZeroOut or some custom encoders drop it)")
        pooled = pooled.reshape(-1, pooled.shape[-1]) if pooled.dim() != 2 else pooled
        if pooled.shape[-1] != embed_dim:
            raise UnHypeError(
                f"{node}: conditioning entry {i} has a {pooled.shape[-1]}-d pooled_output; "
                f"this hypernetwork reads {source} ({embed_dim}-d): wrong CLIP or wrong file")
        if pooled.shape[0] != cross.shape[0]:
            if pooled.shape[0] == 1:
                pooled = pooled.expand(cross.shape[0], -1)
            else:
                raise UnHypeError(f"{node}: conditioning entry {i} has {cross.shape[0]} "
                                  f"cross-attention rows but {pooled.shape[0]} pooled rows")
        if not torch.isfinite(pooled.float()).all():
            raise UnHypeError(f"{node}: conditioning entry {i} has NaN/Inf in pooled_output")
        out.append(pooled.float())
    return out


@torch.no_grad()
def generate_factors(loaded: LoadedHypernet, embeddings: Tensor, owner: list[int] | None = None,
                     n: int | None = None) -> LoraFactors:
    """LoRA factors (on the CPU, fp32) for K embedding rows, at the inference hyper step T;
    with `owner` (row k reads prompt owner[k], of n), per prompt the sum of the readings it
    gets (unhype.prompt_windows.combined_rows: a long prompt's strongest window, and those of
    other concepts its windows name)."""
    device = next(loaded.hypernet.parameters()).device
    if owner is None:
        factors = loaded.generate(embeddings.to(device))
    else:
        applied, picks = loaded.pick_readings(embeddings.to(device), owner, n)
        factors = stack_rows(applied, picks)
    return {k: (a.float().cpu(), b.float().cpu()) for k, (a, b) in factors.items()}


class RowMatcher:
    """Maps the conditional rows of a batched ComfyUI call to recorded prompt rows by value:
    their cross-attention tensor, and where two recorded rows share it (FLUX prompts with the
    same t5xxl text but other clip_l texts), their pooled vector, which ComfyUI passes to the
    model as ``y`` (FLUX: the pooled output; SDXL: it, then the size embeddings)."""

    def __init__(self, cross_rows: list[Tensor], pooled: Tensor | None = None):
        # Group recorded rows [L, D] by token count L; keep the LoRA index of each.
        groups: dict[int, list[tuple[int, Tensor]]] = {}
        for index, row in enumerate(cross_rows):
            groups.setdefault(row.shape[0], []).append((index, row.detach()))
        self._groups = {n: (torch.tensor([i for i, _ in rows]), torch.stack([r for _, r in rows]))
                        for n, rows in groups.items()}
        # only needed (and read per call) when some recorded rows share their context
        shared = any(torch.equal(rows[i], rows[j]) for _, rows in self._groups.values()
                     for i in range(len(rows)) for j in range(i))
        self._pooled = pooled.detach().float() if shared and pooled is not None and \
            pooled.shape[0] == len(cross_rows) else None
        self._on_device: dict = {}

    def _group(self, n: int, device, dtype):
        key = (n, device, dtype)
        if key not in self._on_device:
            idx, rows = self._groups[n]
            self._on_device[key] = (idx.to(device), rows.to(device=device, dtype=dtype))
        return self._on_device[key]

    def match(self, context: Tensor, y: Tensor | None = None, joined: list | None = None
              ) -> Tensor:
        """[N, Lc, D] cross-attention rows (and their ``y`` [N, Dy], if any) -> [N] LoRA index
        (-1 where nothing matches). A longer row matches a recorded one by its first tokens;
        ComfyUI pads by repeating the row, so a match whose remainder is not that repetition is
        a row joined to other text after Apply (ConditioningConcat): its index goes to
        ``joined`` when a list is given."""
        n, length, dim = context.shape
        same_pooled = self._same_pooled(y, n)
        result = torch.full((n,), -1, dtype=torch.long, device=context.device)
        # Exact-length groups first: a shorter prompt can be a prefix of a padded longer one.
        for tokens in sorted(self._groups, key=lambda t: (t != length, -t)):
            if length % tokens:
                continue
            idx, rows = self._group(tokens, context.device, context.dtype)
            if rows.shape[-1] != dim:
                continue
            todo = (result < 0).nonzero().flatten()
            if not todo.numel():
                break
            prefix = context[todo, :tokens]
            equal = (prefix[:, None] == rows[None]).flatten(2).all(-1)  # [todo, M]
            if same_pooled is not None:  # prefer the row whose pooled vector is also its own
                both = equal & same_pooled[todo.cpu()][:, idx.cpu()].to(equal.device)
                equal = torch.where(both.any(1, keepdim=True), both, equal)
            hit = equal.any(1)
            first = equal.float().argmax(1)
            result[todo[hit]] = idx[first[hit]]
            if joined is not None and tokens < length and bool(hit.any()):
                got = context[todo[hit]]
                blocks = got.reshape(got.shape[0], length // tokens, tokens, dim)
                padded = (blocks == blocks[:, :1]).flatten(1).all(1)
                joined += todo[hit][~padded].cpu().tolist()
        return result.cpu()

    def _same_pooled(self, y: Tensor | None, n: int) -> Tensor | None:
        """[N, K] whether row r's ``y`` starts with recorded row k's pooled vector."""
        if self._pooled is None or y is None or y.dim() != 2 or y.shape[0] != n or \
                y.shape[1] < self._pooled.shape[1]:
            return None
        head = y[:, :self._pooled.shape[1]].detach().float().cpu()
        scale = self._pooled.norm(dim=1).clamp_min(1e-12)
        return (head[:, None] - self._pooled[None]).norm(dim=2) <= 1e-4 * scale[None]


@dataclass
class ApplyPlan:
    """What UnHype Apply hands to a sampler: factors per prompt row and how to find the rows."""

    factors: LoraFactors
    matcher: RowMatcher
    strength: float
    paths: dict  # canonical name -> HostPath under the diffusion model
    dims: dict  # canonical name -> (in, out)
    apply_to: str = "cond_only"  # the family's rule: "all" also matches unconditional chunks
    silent: Tensor | None = None  # [K] bool: rows with a zero update (gate floor): base weights
    warned: set = field(default_factory=set)
    matched: bool = False  # some call has had a row that came through Apply


def window_rows(conditioning, pooled: list[Tensor]) -> tuple[list[Tensor], list[int]]:
    """The window embeddings of every conditioning row that carries them, and the row each
    belongs to (rows numbered across entries, as the factors are)."""
    extra, read_for, row = [], [], 0
    for i, (entry, rows) in enumerate(zip(conditioning, pooled)):
        windows = entry[1].get(WINDOWS_KEY)
        if windows is not None:
            if not isinstance(windows, Tensor) or windows.dim() != 2 or \
                    windows.shape[1] != rows.shape[1] or not torch.isfinite(windows).all():
                raise UnHypeError(f"UnHype Apply: conditioning entry {i} has a malformed "
                                  f"'{WINDOWS_KEY}' (expected [windows, {rows.shape[1]}])")
            for r in range(rows.shape[0]):
                extra.append(windows.float())
                read_for += [row + r] * windows.shape[0]
        row += rows.shape[0]
    return extra, read_for


def build_plan(loaded: LoadedHypernet, conditioning, strength: float) -> ApplyPlan:
    strength = check_strength(strength)
    meta = loaded.meta
    pooled = pooled_rows(conditioning, meta.config.embed_dim, meta.embedding.get("source", "?"))
    cross_rows = [row for entry in conditioning for row in entry[0]]
    emb = torch.cat(pooled)
    extra, read_for = window_rows(conditioning, pooled)
    # a row with windows: the strongest of its own and its windows' updates, and those of other
    # concepts its windows name (unhype.prompt_windows.combined_rows)
    factors = generate_factors(loaded, torch.cat([emb] + extra),
                               list(range(len(emb))) + read_for if extra else None, len(emb))
    return ApplyPlan(factors=factors, matcher=RowMatcher(cross_rows, emb), strength=strength,
                     paths=host_paths(meta, "ldm"),
                     dims={t.name: (t.in_dim, t.out_dim) for t in meta.config.targets},
                     apply_to=get_family(meta.family).apply_to, silent=silent_prompts(factors))


def long_prompt_rows(conditioning, family: str) -> int:
    """Conditioning rows of an SD family longer than one 77-token chunk and without window
    embeddings: ComfyUI's ``pooled_output`` (what the hypernetwork reads) comes from the first
    chunk alone (ConditioningConcat keeps conditioning_to's), so a concept named only after its
    75 tokens gets no LoRA there (UnHype Text Encode stores the windows' embeddings; the
    conditioning itself does not carry the text)."""
    if family not in ("sd1", "sd2", "sdxl"):
        return 0  # FLUX's context is T5's, whose length says nothing about CLIP-L's chunks
    return sum(int(entry[0].shape[0]) for entry in conditioning
               if entry[0].shape[1] > 77 and WINDOWS_KEY not in entry[1])


def long_prompt_note(conditioning, family: str) -> str:
    """Apply's info about `long_prompt_rows` ('' when there are none)."""
    long = long_prompt_rows(conditioning, family)
    if not long:
        return ""
    return (f" {long} prompt row(s) are longer than 75 tokens (a long prompt, or conditioning "
            "joined by ConditioningConcat) and carry no window embeddings: the pooled embedding "
            "UnHype reads covers only their first 75 tokens (ConditioningConcat keeps only "
            "conditioning_to's), so they are judged on that part alone and a concept named "
            "after it is not erased there; encode the text with UnHype Text Encode (long "
            "prompts), or name the concept early.")


def rows_under_floor(plan: ApplyPlan) -> int:
    """Prompt rows whose update the gate floor switched off (they run the base weights)."""
    return int(plan.silent.sum()) if plan.silent is not None else 0


def merge_row(plan: ApplyPlan) -> int | None:
    """The prompt row whose LoRA merge mode writes into the weights (one for every row): the
    strongest update among the rows not under the gate floor; None when all are under it."""
    from unhype.prompt_windows import update_norms

    norms = update_norms(plan.factors).cpu()
    if plan.silent is not None:
        norms = torch.where(plan.silent.to(norms.device), -1.0, norms)
    best = int(torch.argmax(norms))
    return best if norms[best] > 0 else None


def row_map(plan: ApplyPlan, context: Tensor, cond_or_uncond, y: Tensor | None = None
            ) -> Tensor:
    """Batch row -> LoRA index for one call (-1: base weights), decided by value: a row equal to
    a prompt row recorded at Apply gets that prompt's LoRA whatever chunk it is in (DualCFGGuider
    puts its middle prompt in chunk 1). The chunk label excludes one case: in a plain
    [positive, negative] call (no chunk labelled 2 or more) the negative runs the base weights
    even where it equals a positive prompt. Guidance-distilled families (FLUX) match every row."""
    n = context.shape[0]
    flags = [int(f) for f in cond_or_uncond] or [COND]
    if n % len(flags):
        raise UnHypeError(f"batch of {n} rows does not split into {len(flags)} conditioning "
                          "chunks")
    label = torch.tensor(flags).repeat_interleave(n // len(flags))
    plain = max(flags) <= UNCOND
    candidate = label != UNCOND if plain and plan.apply_to != APPLY_ALL else \
        torch.ones(n, dtype=torch.bool)
    rows = torch.full((n,), -1, dtype=torch.long)
    joined: list[int] = []
    if candidate.any():
        idx = candidate.nonzero().flatten()
        rows[idx] = plan.matcher.match(
            context[idx.to(context.device)],
            y[idx.to(y.device)] if isinstance(y, Tensor) and y.shape[0] == n else None, joined)
    _warn(plan, rows, label, flags, len(joined))
    if plan.silent is not None:  # no hooks for rows the floor switched off
        rows = torch.where(plan.silent[rows.clamp(min=0)], -1, rows)
    return rows


def _warn(plan: ApplyPlan, rows: Tensor, label: Tensor, flags: list[int], joined: int) -> None:
    """Warn once when rows that should be erased are not: the positive chunk of a plain
    [positive, negative] call matching nothing, or another call (cfg 1, a three-prompt guider)
    none of whose rows came through Apply while none ever has. Other unmatched rows are
    negatives, a guider's extra prompts (PerpNegGuider's empty one), or a negative re-run alone
    (SAG, SLG): base weights, as meant."""
    hit = rows >= 0
    seen_before, plan.matched = plan.matched, plan.matched or bool(hit.any())
    if joined and "joined" not in plan.warned:
        plan.warned.add("joined")
        log.warning("UnHype: %d row(s) begin with a prompt that passed through UnHype Apply but "
                    "go on with other text (ConditioningConcat after Apply?): they are given "
                    "that prompt's update, judged on its first part alone; put UnHype Apply "
                    "last in the positive chain", joined)
    if "unmatched" in plan.warned:
        return
    if set(flags) == {COND, UNCOND}:
        missed = int((~hit & (label == COND)).sum())
        kind = "positive row(s)"
    elif set(flags) != {UNCOND} and not hit.any() and not seen_before:
        missed = int((label != UNCOND).sum()) if max(flags) <= UNCOND else len(rows)
        kind = f"row(s) of chunks {sorted(set(flags))}, and none so far,"
    else:
        return
    if missed:
        plan.warned.add("unmatched")
        log.warning("UnHype: %d %s come from conditioning that did not pass through UnHype Apply "
                    "(or was changed after it); they run without erasure", missed, kind)


class UnHypeWrapper:
    """A ComfyUI ``model_function_wrapper``: hooks on entry, per-row LoRAs, removed in finally.

    ``get_root`` returns the diffusion model (``model.model.diffusion_model``); ``inner`` is the
    wrapper that was set before (chained, called with our hooks in place) or None.
    """

    def __init__(self, plan: ApplyPlan, get_root, inner=None):
        self.plan, self.get_root, self.inner = plan, get_root, inner
        self.calls = 0
        self._bound = (None, None)  # (root module, bindings): resolved once per model
        self._row_cache = RowCache()  # the gathered factors, reused while the row map holds

    def _bindings(self):
        root = self.get_root()
        if self._bound[0] is not root:
            self._bound = (root, resolve_modules(root, self.plan.paths, self.plan.dims))
        return self._bound[1]

    def __deepcopy__(self, memo):
        # ModelPatcher.clone() deep-copies model_options: share the plan and the model, never
        # copy them (the bound modules are the UNet itself)
        import copy

        new = type(self)(self.plan, self.get_root, copy.deepcopy(self.inner, memo))
        new._bound = self._bound
        return new

    def to(self, device):  # ModelPatcher.model_patches_to calls this when the model loads
        if self.inner is not None and hasattr(self.inner, "to"):
            self.inner = self.inner.to(device)
        if isinstance(device, (str, torch.device)):  # keep the factors beside the weights
            self.plan.factors = {k: (a.to(device), b.to(device))
                                 for k, (a, b) in self.plan.factors.items()}
        return self

    def __call__(self, apply_model, args: dict):
        c = args["c"]
        context = c.get("c_crossattn")
        run = (lambda: self.inner(apply_model, args)) if self.inner is not None else \
            (lambda: apply_model(args["input"], args["timestep"], **c))
        if context is None or self.plan.strength == 0.0:
            return run()
        rows = row_map(self.plan, context, args.get("cond_or_uncond") or
                       c.get("transformer_options", {}).get("cond_or_uncond", []), c.get("y"))
        if not bool((rows >= 0).any()):
            return run()
        self.calls += 1
        lora = DynamicLoRA(self._bindings(), self._row_cache)
        try:
            # row_map already sent the silent rows to -1: no second scan of every layer per call
            lora.set(self.plan.factors, rows, self.plan.strength, skip_silent=False)
            return run()
        finally:
            lora.remove()


def merged_delta(plan: ApplyPlan, name: str, index: int = 0) -> Tensor:
    """strength * B A^T ([out, in]) of layer `name` for prompt row `index`."""
    a, b = plan.factors[name]
    return plan.strength * delta_weight(a[index], b[index])


def merge_rounding_loss(pairs) -> float:
    """The share of an update that writing it into weights stored in their own dtype loses, for
    (W, dW) pairs taken one at a time: ||round(W + dW) - W - dW|| / ||dW|| over all layers,
    rounding to nearest (ComfyUI rounds into fp8 stochastically: unbiased, with errors of the
    same size). ~1e-7 for float32 weights."""
    err = total = 0.0
    for w, d in pairs:
        w32 = w.detach().float()
        d = d.detach().float().to(w32.device)
        stored = (w32 + d).to(w.dtype).float()
        err += float(((stored - w32) - d).pow(2).sum())
        total += float(d.pow(2).sum())
    return math.sqrt(err / total) if total else 0.0
