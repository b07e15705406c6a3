"""Apply generated LoRAs to a module tree, per batch row, through removable forward hooks.

Given factors for K prompts (A [K, in, r], B [K, out, r] per layer) and a row map (batch row ->
prompt index, -1 = base weights, e.g. the unconditional rows of classifier-free guidance), each
row of a forward pass gets its own update in one batched computation:

    y[row] += strength * (x[row] @ A[p]) @ B[p].T      for p = rows[row] >= 0

Prompts whose update is exactly zero in every layer (the gate floor switched them off,
unhype.gate_floor) can be mapped to -1 with `skip_silent`, so a batch of only such rows runs the
base layers without the extra matmuls; their output is the same either way.

Hooks sit on module instances, so any module whose weight is [out, in] works (nn.Linear, Forge's
and ComfyUI's custom layers), and fused layers take a row slice of their output (FLUX qkv).
Nothing touches a weight: removing the hooks restores the model exactly.

Under gradient checkpointing a block's forward runs again in the backward, when the hooks may hold
other factors (the trainer clears them before the backward): `checkpointing_function` gives the
model a checkpoint that replays each block with the LoRA state of its first forward.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from unhype.errors import UnHypeError
from unhype.hypernet import LoraFactors
from unhype.model_check import weight_shape
from unhype.naming import HostPath


@dataclass
class _Binding:
    name: str
    module: nn.Module
    out_slice: tuple[int, int] | None


def resolve_modules(root: nn.Module, paths: dict[str, HostPath | str],
                    dims: dict[str, tuple[int, int]] | None = None) -> dict[str, _Binding]:
    """Find each target's module under `root`, checking its weight shape against `dims`."""
    named = dict(root.named_modules())
    bindings, missing, wrong = {}, [], []
    for name, hp in paths.items():
        hp = HostPath(hp) if isinstance(hp, str) else hp
        module = named.get(hp.path)
        if module is None:
            missing.append(hp.path)
            continue
        weight = getattr(module, "weight", None)
        if dims is not None and name in dims:
            in_dim, out_dim = dims[name]
            shape = None if weight is None else weight_shape(weight)
            if shape is None or len(shape) != 2:
                wrong.append(f"{hp.path} has no 2-D weight")
            else:
                rows = shape[0] if hp.out_slice is None else hp.out_slice[1] - hp.out_slice[0]
                fits = hp.out_slice is None or hp.out_slice[1] <= shape[0]
                if shape[1] != in_dim or rows != out_dim or not fits:
                    wrong.append(f"{hp.path} is {tuple(shape)}, expected "
                                 f"[{out_dim}, {in_dim}]" + (f" rows {hp.out_slice}"
                                                             if hp.out_slice else ""))
        bindings[name] = _Binding(name, module, hp.out_slice)
    if missing:
        raise UnHypeError(f"{len(missing)} target layer(s) do not exist in this model "
                          f"(wrong family or preset?), e.g. {missing[:3]}")
    if wrong:
        raise UnHypeError(f"{len(wrong)} target layer(s) have other shapes in this model "
                          f"(mismatched model?): {wrong[:3]}")
    return bindings


def silent_prompts(factors: LoraFactors) -> Tensor:
    """[K] bool: prompts whose update B A^T is zero in every layer (A or B all zero)."""
    silent = None
    for a, b in factors.values():
        a, b = a.detach().flatten(1), b.detach().flatten(1)
        zero = (a.abs().amax(1) == 0) | (b.abs().amax(1) == 0)
        silent = zero if silent is None else silent & zero.to(silent.device)
    return silent.cpu() if silent is not None else torch.zeros(0, dtype=torch.bool)


MAX_STRENGTH = 100.0


def check_strength(strength) -> float:
    try:
        value = float(strength)
    except (TypeError, ValueError):
        raise UnHypeError(f"strength must be a number, got {strength!r}") from None
    if not math.isfinite(value):
        raise UnHypeError(f"strength must be finite, got {strength!r}")
    if abs(value) > MAX_STRENGTH:  # fp16 activations overflow to NaN from about 1e4
        raise UnHypeError(f"strength {value:g} is outside [-{MAX_STRENGTH:g}, {MAX_STRENGTH:g}]"
                          " (1 is the trained erasure; 2 is already strong)")
    return value


class RowCache:
    """Each layer's factors gathered for a row map (and the row map per device), kept while the
    factors, the row map and the strength stay the same: a host's sampling steps reuse them
    instead of gathering them again at every layer of every step. A host that builds new hooks
    each step (ComfyUI's wrapper) passes one RowCache to all of them."""

    def __init__(self):
        self.reset()

    def reset(self) -> None:
        self.key, self.factors = None, None  # the factors are held so their id() stays unique
        self.layers: dict = {}  # (layer, device, dtype) -> (A rows, B rows)
        self.rows: dict = {}  # device -> row map

    def use(self, factors, rows: Tensor, strength: float) -> None:
        key = (id(factors), tuple(rows.tolist()), strength)
        if key != self.key:
            self.reset()
            self.key, self.factors = key, factors


class DynamicLoRA:
    """Per-row LoRA hooks on a set of modules. Use as a context manager or call `remove()`.

    `compute_dtype`: dtype of the LoRA's two matmuls (None: the activations'); float32 keeps the
    small update exact in an fp16/bf16 model, at the cost of an fp32 copy of each hooked input."""

    compute_dtype: torch.dtype | None = None

    def __init__(self, bindings: dict[str, _Binding], row_cache: RowCache | None = None):
        self.bindings = bindings
        self.factors: LoraFactors | None = None
        self.rows: Tensor | None = None
        self._live = False  # any row with a LoRA: checked once per row map, not per layer
        self.strength = 1.0
        self.silent: Tensor | None = None  # set by set(skip_silent=True)
        self._rows = row_cache if row_cache is not None else RowCache()
        self._own_rows = row_cache is None  # a host's shared cache outlives these hooks
        self._handles = [b.module.register_forward_hook(self._hook(b)) for b in bindings.values()]

    @classmethod
    def attach(cls, root: nn.Module, paths: dict[str, HostPath | str],
               dims: dict[str, tuple[int, int]] | None = None) -> "DynamicLoRA":
        return cls(resolve_modules(root, paths, dims))

    def set(self, factors: LoraFactors, rows, strength: float = 1.0,
            skip_silent: bool | None = None) -> "DynamicLoRA":
        """Use `factors` (K prompts) for the next forwards; rows[i] = prompt of batch row i.

        `skip_silent`: rows of prompts with a zero update (`silent_prompts`) become -1 in this
        and every later row map. Default: when gradients are off (sampling), since in training
        a zero factor still has a gradient."""
        absent = set(self.bindings) - set(factors)
        if absent:
            raise UnHypeError(f"factors lack {len(absent)} hooked layer(s), e.g. "
                              f"{sorted(absent)[:2]}")
        self.factors = factors
        self.strength = check_strength(strength)
        if skip_silent is None:
            skip_silent = not torch.is_grad_enabled()
        self.silent = silent_prompts(factors) if skip_silent else None
        self.set_rows(rows)
        return self

    def set_rows(self, rows) -> None:
        rows = torch.as_tensor(rows, dtype=torch.long).flatten()
        k = next(iter(self.factors.values()))[0].shape[0] if self.factors else 0
        if rows.numel() and (rows.max() >= k or rows.min() < -1):
            raise UnHypeError(f"row map {rows.tolist()} points outside the {k} prompts given")
        if self.silent is not None and rows.numel():
            rows = torch.where(self.silent[rows.clamp(min=0)], -1, rows)
        self.rows = rows
        self._live = bool((rows >= 0).any())
        self._rows.use(self.factors, rows, self.strength)

    def clear(self) -> None:
        """Keep the hooks but run base weights (no factors)."""
        self.factors, self.rows, self.silent = None, None, None
        self._live = False

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self.clear()
        if self._own_rows:
            self._rows.reset()  # a removed hook set holds no factors

    def state(self) -> tuple:
        """What the hooks apply now (factors, row map, strength, silent prompts)."""
        return self.factors, self.rows, self.strength, self.silent, self._live

    @contextlib.contextmanager
    def replaying(self, state: tuple):
        """Apply `state` (from `state()`) inside the block, the current state again after it."""
        now = self.state()
        self._apply_state(state)
        try:
            yield
        finally:
            self._apply_state(now)

    def _apply_state(self, state: tuple) -> None:
        self.factors, self.rows, self.strength, self.silent, self._live = state
        if self.rows is not None:
            self._rows.use(self.factors, self.rows, self.strength)

    def checkpointing_function(self):
        """A `gradient_checkpointing_func` for diffusers' `enable_gradient_checkpointing` on the
        model these hooks sit on: non-reentrant checkpoints whose recomputation sees the LoRA
        state of the original forward, so the gradients are those without checkpointing."""
        from torch.utils.checkpoint import checkpoint

        def checkpointed(block, *args, **kwargs):
            state = self.state()
            return checkpoint(block.__call__, *args, use_reentrant=False,
                              context_fn=lambda: (contextlib.nullcontext(),
                                                  self.replaying(state)), **kwargs)
        return checkpointed

    def __enter__(self) -> "DynamicLoRA":
        return self

    def __exit__(self, *exc) -> None:
        self.remove()

    def _rows_on(self, device) -> Tensor:
        """The row map on `device`, copied once per row map: a copy from the CPU at every hooked
        layer would make the host wait for the GPU at each of them."""
        if device not in self._rows.rows:
            self._rows.rows[device] = self.rows.to(device)
        return self._rows.rows[device]

    def _row_factors(self, name: str, device, dtype):
        key = (name, device, dtype)
        layers = self._rows.layers
        if key not in layers:
            a, b = self.factors[name]
            rows = self._rows_on(a.device)
            keep = (rows >= 0).to(a.dtype) * self.strength
            a_rows = a[rows.clamp(min=0)] * keep[:, None, None]
            b_rows = b[rows.clamp(min=0)]
            layers[key] = (a_rows.to(device, dtype), b_rows.to(device, dtype))
        return layers[key]

    def _hook(self, binding: _Binding):
        def hook(module, args, output):
            if not self._live:
                return None
            x = args[0]
            n = x.shape[0]
            if n != self.rows.numel():
                raise UnHypeError(f"layer {binding.name} got a batch of {n} rows but the row "
                                  f"map has {self.rows.numel()}")
            a_rows, b_rows = self._row_factors(binding.name, x.device,
                                               self.compute_dtype or x.dtype)
            if torch.is_grad_enabled():  # training: factors change between calls, keep the graph
                self._rows.layers.clear()
            flat = x.reshape(n, -1, x.shape[-1]).to(a_rows.dtype)
            mid = torch.bmm(flat, a_rows)
            if binding.out_slice is None and output.dtype == b_rows.dtype:
                # output + mid B^T in one kernel: a host-bound GPU pays per launch
                flat_out = output.reshape(n, -1, output.shape[-1])
                return torch.baddbmm(flat_out, mid, b_rows.transpose(1, 2)).view(output.shape)
            delta = torch.bmm(mid, b_rows.transpose(1, 2))
            delta = delta.reshape(*output.shape[:-1], delta.shape[-1])
            # added at the LoRA's precision, rounded to the layer's dtype once
            if binding.out_slice is None:
                return (output.to(delta.dtype) + delta).to(output.dtype)
            start, stop = binding.out_slice
            part = (output[..., start:stop].to(delta.dtype) + delta).to(output.dtype)
            return torch.cat([output[..., :start], part, output[..., stop:]], dim=-1)
        return hook
