"""The hypernetwork: pooled CLIP embedding (+ hyper step s) -> LoRA factors for every target.

Two variants behind one interface (`HyperNetwork.forward(emb, s)`):

* ``per_layer`` (the paper's): one independent MLP pair per target layer.
* ``shared`` (ours, compact): one trunk for all layers, learned layer and module-type embeddings,
  a small shared mixer and one A/B head per module type (sliced to each layer's dims).

Both use the paper's parameterisation, with u = s / T:

    A(e, s) = alpha(s) * (L0 + u * headA(e, s))      alpha(s) = alpha_base + u * alpha_learned
    B(e, s) = u * headB(e, s)                          last layer of headB zero-initialised

so the update B A^T is exactly zero at s = 0 for every prompt, and at initialisation for every s.
The weight update of a layer for prompt n is ``B[n] @ A[n].T`` ([out, in]); hosts apply it as
``y += strength * (x @ A) @ B.T``. Computation is fp32 whatever the model's dtype.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import torch
from torch import Tensor, nn

from unhype.errors import UnHypeError

VARIANTS = ("per_layer", "shared")

# name -> (A [N, in, r], B [N, out, r])
LoraFactors = dict[str, tuple[Tensor, Tensor]]


@dataclass
class TargetSpec:
    """What the hypernetwork needs to know of a target layer (a subset of families.Target)."""

    name: str  # canonical (kohya) name
    module_type: str  # e.g. "attn2.to_k"; the shared variant has one head pair per type
    in_dim: int
    out_dim: int
    path: str = ""  # diffusers module path


def is_whole_number(value, minimum: int = 0) -> bool:
    """An int >= `minimum` (JSON's true/false are not)."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= minimum


@dataclass
class HyperNetConfig:
    variant: str
    targets: list[TargetSpec]
    embed_dim: int
    rank: int = 1
    hidden: int = 100  # per_layer: MLP width (paper: 100 or 512); shared: trunk width
    head_hidden: int = 64  # shared only: width of the per-layer code read by the type heads
    hyper_steps: int = 300  # T
    alpha_base: float = 1.0
    fourier_freqs: int = 16
    seed: int = 0
    extra: dict = field(default_factory=dict)

    def __post_init__(self):
        if not isinstance(self.targets, (list, tuple)) or not all(
                isinstance(t, (TargetSpec, dict)) for t in self.targets):
            raise UnHypeError("invalid hypernetwork config: 'targets' must be a list of objects")
        self.targets = [t if isinstance(t, TargetSpec) else TargetSpec(**{
            k: t[k] for k in ("name", "module_type", "in_dim", "out_dim", "path") if k in t})
            for t in self.targets]
        problems = []
        for t in self.targets:
            bad = [key for key in ("name", "module_type") if not isinstance(getattr(t, key), str)
                   or not getattr(t, key)]
            bad += [key for key in ("in_dim", "out_dim")
                    if not is_whole_number(getattr(t, key), 1)]
            if not isinstance(t.path, str):
                bad.append("path")
            if bad:
                problems.append(f"target {str(t.name)[:60]!r} has an invalid {', '.join(bad)} "
                                "(names are texts, dims positive integers)")
                break
        if not isinstance(self.seed, int) or isinstance(self.seed, bool) or \
                not 0 <= self.seed < 2 ** 63:
            problems.append(f"seed must be an integer in [0, 2^63), got {self.seed!r}")
        if not isinstance(self.extra, dict):
            problems.append("extra must be an object")
        if self.variant not in VARIANTS:
            problems.append(f"variant {self.variant!r} is not one of {VARIANTS}")
        for key in ("embed_dim", "rank", "hidden", "head_hidden", "hyper_steps", "fourier_freqs"):
            value = getattr(self, key)
            if not is_whole_number(value, 1):
                problems.append(f"{key} must be a positive integer, got {value!r}")
        if not self.targets:
            problems.append("no target layers")
        if len({t.name for t in self.targets}) != len(self.targets):
            problems.append("duplicate target names")
        if not isinstance(self.alpha_base, (int, float)) or isinstance(self.alpha_base, bool) \
                or not math.isfinite(self.alpha_base):
            problems.append("alpha_base is not finite")
        if problems:
            raise UnHypeError("invalid hypernetwork config: " + "; ".join(problems))

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "HyperNetConfig":
        known = set(cls.__dataclass_fields__)
        missing = {"variant", "targets", "embed_dim"} - set(data)
        if missing:
            raise UnHypeError(f"hypernetwork config lacks {sorted(missing)}")
        return cls(**{k: v for k, v in data.items() if k in known})


class FourierFeatures(nn.Module):
    """sin/cos of s/T at log-spaced frequencies from 1 to T/2 periods over [0, T]."""

    def __init__(self, num_freqs: int, hyper_steps: int):
        super().__init__()
        top = max(hyper_steps / 2.0, 1.0)
        freqs = math.pi * torch.logspace(0, math.log10(top), num_freqs, dtype=torch.float64)
        self.register_buffer("freqs", freqs.float(), persistent=False)
        self.hyper_steps = hyper_steps

    def forward(self, u: Tensor) -> Tensor:  # u: [N] in [0, 1]
        angles = u[:, None] * self.freqs[None, :]
        return torch.cat([angles.sin(), angles.cos()], dim=1)


def _mlp(in_dim: int, hidden: int, out_dim: int, zero_last: bool) -> nn.Sequential:
    net = nn.Sequential(nn.Linear(in_dim, hidden), nn.ReLU(), nn.Linear(hidden, out_dim))
    if zero_last:
        nn.init.zeros_(net[2].weight)
        nn.init.zeros_(net[2].bias)
    return net


class HyperNetwork(nn.Module):
    """Common part: step handling, fixed A bases, learned alphas, output assembly."""

    def __init__(self, config: HyperNetConfig):
        super().__init__()
        self.config = config
        self.target_names = [t.name for t in config.targets]
        self.fourier = FourierFeatures(config.fourier_freqs, config.hyper_steps)
        self.input_dim = config.embed_dim + 2 * config.fourier_freqs
        generator = torch.Generator().manual_seed(config.seed)
        # Fixed random base of A (the paper's L0): buffers, saved with the file.
        self.a_base = nn.ParameterList()
        for t in config.targets:
            base = torch.randn(t.in_dim, config.rank, generator=generator) / math.sqrt(t.in_dim)
            self.a_base.append(nn.Parameter(base, requires_grad=False))
        self.alpha = nn.Parameter(torch.zeros(len(config.targets)))

    @property
    def hyper_steps(self) -> int:
        return self.config.hyper_steps

    def _inputs(self, emb: Tensor, s) -> tuple[Tensor, Tensor]:
        if emb.dim() == 1:
            emb = emb[None]
        if emb.dim() != 2 or emb.shape[1] != self.config.embed_dim:
            raise UnHypeError(f"embedding of shape {tuple(emb.shape)} given; this hypernetwork "
                              f"reads [N, {self.config.embed_dim}]")
        emb = emb.to(device=self.alpha.device, dtype=torch.float32)
        if not torch.isfinite(emb).all():
            raise UnHypeError("embedding contains NaN or Inf")
        n = emb.shape[0]
        if s is None:
            s = float(self.config.hyper_steps)
        s = torch.as_tensor(s, dtype=torch.float32, device=emb.device)
        s = s.expand(n) if s.dim() == 0 else s
        u = s / self.config.hyper_steps
        return torch.cat([emb, self.fourier(u)], dim=1), u

    def _assemble(self, index: int, u: Tensor, head_a: Tensor, head_b: Tensor):
        """head_a [N, in*r], head_b [N, out*r] -> (A [N,in,r], B [N,out,r]) with the gating."""
        t = self.config.targets[index]
        r = self.config.rank
        ug = u[:, None, None]
        alpha = self.config.alpha_base + ug * self.alpha[index]
        a = alpha * (self.a_base[index][None] + ug * head_a.reshape(-1, t.in_dim, r))
        b = ug * head_b.reshape(-1, t.out_dim, r)
        return a, b

    def forward(self, emb: Tensor, s=None) -> LoraFactors:
        """LoRA factors for N embeddings at hyper step s (default: T, the inference step)."""
        raise NotImplementedError

    def num_parameters(self, trainable_only: bool = True) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad or not trainable_only)


class PerLayerHyperNetwork(HyperNetwork):
    """The paper's variant: an independent (headA, headB) MLP pair per target layer."""

    def __init__(self, config: HyperNetConfig):
        super().__init__(config)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(config.seed)
            self.heads_a = nn.ModuleList(
                _mlp(self.input_dim, config.hidden, t.in_dim * config.rank, zero_last=False)
                for t in config.targets)
            self.heads_b = nn.ModuleList(
                _mlp(self.input_dim, config.hidden, t.out_dim * config.rank, zero_last=True)
                for t in config.targets)

    def forward(self, emb: Tensor, s=None) -> LoraFactors:
        x, u = self._inputs(emb, s)
        return {name: self._assemble(i, u, self.heads_a[i](x), self.heads_b[i](x))
                for i, name in enumerate(self.target_names)}


class SharedHyperNetwork(HyperNetwork):
    """Compact variant: shared trunk + layer/type embeddings + one head pair per module type."""

    def __init__(self, config: HyperNetConfig):
        super().__init__(config)
        self.module_types = sorted({t.module_type for t in config.targets})
        type_index = {m: i for i, m in enumerate(self.module_types)}
        self.register_buffer("layer_type", torch.tensor(
            [type_index[t.module_type] for t in config.targets]), persistent=False)
        h, k, r = config.hidden, config.head_hidden, config.rank
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(config.seed)
            self.trunk = nn.Sequential(nn.Linear(self.input_dim, h), nn.SiLU(),
                                       nn.Linear(h, h), nn.SiLU())
            self.layer_embedding = nn.Parameter(torch.randn(len(config.targets), h) * 0.02)
            self.type_embedding = nn.Parameter(torch.randn(len(self.module_types), h) * 0.02)
            self.mixer = nn.Sequential(nn.Linear(h, k), nn.SiLU())
            self.heads_a = nn.ModuleList()
            self.heads_b = nn.ModuleList()
            for m in self.module_types:
                dims = [t for t in config.targets if t.module_type == m]
                self.heads_a.append(nn.Linear(k, max(t.in_dim for t in dims) * r))
                head_b = nn.Linear(k, max(t.out_dim for t in dims) * r)
                nn.init.zeros_(head_b.weight)
                nn.init.zeros_(head_b.bias)
                self.heads_b.append(head_b)

    def forward(self, emb: Tensor, s=None) -> LoraFactors:
        x, u = self._inputs(emb, s)
        trunk = self.trunk(x)  # [N, h]
        per_layer = trunk[:, None, :] + self.layer_embedding[None] + \
            self.type_embedding[self.layer_type][None]
        codes = self.mixer(per_layer)  # [N, L, k]
        r = self.config.rank
        out = {}
        for type_id in range(len(self.module_types)):
            layer_ids = (self.layer_type == type_id).nonzero().flatten().tolist()
            type_codes = codes[:, layer_ids]  # [N, L_t, k]
            full_a = self.heads_a[type_id](type_codes)  # [N, L_t, max_in * r]
            full_b = self.heads_b[type_id](type_codes)
            for j, i in enumerate(layer_ids):
                t = self.config.targets[i]
                head_a = full_a[:, j].reshape(-1, full_a.shape[-1] // r, r)[:, :t.in_dim]
                head_b = full_b[:, j].reshape(-1, full_b.shape[-1] // r, r)[:, :t.out_dim]
                out[t.name] = self._assemble(i, u, head_a, head_b)
        return {name: out[name] for name in self.target_names}


def build_hypernet(config: HyperNetConfig) -> HyperNetwork:
    cls = PerLayerHyperNetwork if config.variant == "per_layer" else SharedHyperNetwork
    return cls(config)


def default_hidden(variant: str) -> int:
    return 100 if variant == "per_layer" else 256


def delta_weight(a: Tensor, b: Tensor) -> Tensor:
    """Weight update(s) B A^T: [..., out, in] from A [..., in, r], B [..., out, r]."""
    return b @ a.transpose(-1, -2)


def update_size_sq(factors: LoraFactors) -> Tensor:
    """[N] squared Frobenius norm of each prompt's full update, sum over layers of ||B A^T||^2,
    as trace((B^T B)(A^T A)): r x r products, never the out x in matrix (and no sqrt, whose
    gradient at B = 0 is not finite: unhype/trainer/adversary.py differentiates this)."""
    total = 0
    for a, b in factors.values():
        total = total + ((b.transpose(1, 2) @ b) * (a.transpose(1, 2) @ a)).flatten(1).sum(1)
    return total


def update_gram(f1: LoraFactors, f2: LoraFactors) -> Tensor:
    """[N1, N2] Frobenius inner products <B1 A1^T, B2 A2^T> of two factor sets' updates, summed
    over layers, in float64, as sum((A1^T A2) * (B1^T B2)): r x r products only."""
    total = None
    for name, (a1, b1) in f1.items():
        a2, b2 = f2[name]
        aa = torch.einsum("nir,mis->nmrs", a1.double(), a2.to(a1.device).double())
        bb = torch.einsum("nor,mos->nmrs", b1.double(), b2.to(b1.device).double())
        g = (aa * bb).sum(dim=(2, 3))
        total = g if total is None else total + g
    if total is None:
        raise ValueError("update_gram: no layers")
    return total


def delta_norm(factors: LoraFactors) -> Tensor:
    """[N] Frobenius norm of the full weight update of each prompt (all layers)."""
    return update_size_sq(factors).clamp(min=0).sqrt()


def flatten_factors(factors: LoraFactors) -> Tensor:
    """All factors of each prompt as one vector [N, P] (for the fields and retention losses)."""
    parts = []
    for a, b in factors.values():
        parts += [a.reshape(a.shape[0], -1), b.reshape(b.shape[0], -1)]
    return torch.cat(parts, dim=1)
