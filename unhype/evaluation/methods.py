"""What the harness compares: a `Method` edits how a base model denoises, UnHype being one of them.

A method is attached to a UNet once (`attach`), then for every batch of prompts told their
conditioning (`begin(hidden [N, L, C], pooled [N, D])`, which may return hidden states to use for
the unconditional rows: the negative-prompt baseline), told the row map before every UNet call
(`rows`: prompt index per batch row, -1 = unconditional) and `end`ed; `detach` restores the
model exactly. LoRA-type methods return per-prompt factors (`factors`), applied through
`unhype.dynamic_lora` on the conditional rows only, like UnHype in every host.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from unhype.dynamic_lora import DynamicLoRA
from unhype.hypernet import LoraFactors


class Method:
    name = "base model"

    def attach(self, unet: nn.Module) -> "Method":
        return self

    def detach(self) -> None:
        pass

    def begin(self, hidden: Tensor, pooled: Tensor) -> Tensor | None:
        return None

    def rows(self, rows) -> None:
        pass

    def end(self) -> None:
        pass

    def settings(self) -> dict:
        return {}


class LoraMethod(Method):
    """Per-prompt LoRA factors on a set of layers ({name: module path}, dims {name: (in, out)})."""

    def __init__(self, paths: dict[str, str], dims: dict[str, tuple[int, int]],
                 strength: float = 1.0):
        self.paths, self.dims, self.strength = paths, dims, strength
        self.lora: DynamicLoRA | None = None

    def factors(self, hidden: Tensor, pooled: Tensor) -> LoraFactors:
        raise NotImplementedError

    def attach(self, unet):
        self.lora = DynamicLoRA.attach(unet, self.paths, self.dims)
        return self

    def detach(self):
        if self.lora is not None:
            self.lora.remove()
            self.lora = None

    def begin(self, hidden, pooled):
        self.lora.set(self.factors(hidden, pooled), torch.arange(len(pooled)), self.strength)
        return None

    def rows(self, rows):
        self.lora.set_rows(rows)

    def end(self):
        self.lora.clear()


class UnHypeMethod(LoraMethod):
    """A hypernetwork: LoRA factors generated from each prompt's pooled embedding (s = T), with
    the gate floor (unhype.gate_floor) where a reference is known."""

    def __init__(self, hypernet: nn.Module, paths: dict, dims: dict, strength: float = 1.0,
                 name: str = "UnHype", gate_reference: float | None = None, floor: float = 0.0,
                 saturate: bool = False, signatures=None):
        super().__init__(paths, dims, strength)
        self.hypernet, self.name = hypernet, name
        self.gate_reference, self.floor, self.saturate = gate_reference, floor, saturate
        self.signatures = signatures  # the file's (unhype.concept_signatures), as hosts use

    @classmethod
    def from_loaded(cls, loaded, strength: float = 1.0, name: str | None = None,
                    floor: float | None = None, saturate: bool | None = None) -> "UnHypeMethod":
        from unhype.fileformat import host_paths
        from unhype.gate_floor import check_floor

        cfg = loaded.meta.config
        paths = {k: hp for k, hp in host_paths(loaded.meta, "diffusers").items()}
        dims = {t.name: (t.in_dim, t.out_dim) for t in cfg.targets}
        return cls(loaded.hypernet, paths, dims, strength,
                   name or f"UnHype ({cfg.variant}, {loaded.meta.training.get('mode', '?')})",
                   loaded.gate_reference, loaded.gate_floor if floor is None else check_floor(floor),
                   loaded.gate_saturate if saturate is None else bool(saturate),
                   loaded.signatures)

    def factors(self, hidden, pooled):
        from unhype.gate_floor import apply_floor

        return apply_floor(self.hypernet(pooled.float()), self.gate_reference, self.floor,
                           self.saturate, self.signatures)

    def settings(self):
        floored = self.gate_reference is not None
        return {"strength": self.strength, "gate_floor": self.floor if floored else None,
                "gate_saturate": self.saturate if floored else None}


class FactorBank(nn.Module):
    """One static LoRA (A [in, r], B [out, r] per layer) as trainable parameters; B starts at 0."""

    def __init__(self, dims: dict[str, tuple[int, int]], rank: int, seed: int = 0):
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        self.names = list(dims)
        self.a = nn.ParameterList([nn.Parameter(torch.randn(i, rank, generator=gen) / i ** 0.5)
                                   for i, _ in dims.values()])
        self.b = nn.ParameterList([nn.Parameter(torch.zeros(o, rank)) for _, o in dims.values()])

    def expand(self, n: int, scale: Tensor | None = None) -> LoraFactors:
        """Factors for n prompts ([n, in, r], [n, out, r]); `scale` [n] multiplies each prompt's B."""
        out = {}
        for name, a, b in zip(self.names, self.a, self.b):
            bb = b.unsqueeze(0).expand(n, -1, -1)
            if scale is not None:
                bb = bb * scale.view(n, 1, 1).to(b.dtype)
            out[name] = (a.unsqueeze(0).expand(n, -1, -1), bb)
        return out
