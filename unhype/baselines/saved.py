"""A trained static-LoRA baseline (ESD-x, ESD-u, SPM) as safetensors tensors and back, exactly.

`to_tensors(method)` gives the tensors and the string metadata that rebuild it: the LoRA factors
of every layer (`a.<layer>`, `b.<layer>`), the layer order, its name and training info, and for
SPM the similarity gate (`gate.ref`, tau, temp). `from_tensors` rebuilds the method for a UNet
whose trained layers are `dims`, raising ValueError when the tensors do not fit them.
"""

from __future__ import annotations

import json

from torch import Tensor

from unhype.baselines.esd import SimilarityGate, SPMMethod, StaticLoraMethod
from unhype.evaluation.methods import FactorBank


def to_tensors(method: StaticLoraMethod) -> tuple[dict[str, Tensor], dict[str, str]]:
    bank = method.bank
    tensors = {}
    for name, a, b in zip(bank.names, bank.a, bank.b):
        tensors[f"a.{name}"] = a.detach().cpu().contiguous()
        tensors[f"b.{name}"] = b.detach().cpu().contiguous()
    meta = {"kind": "static", "name": method.name, "layers": json.dumps(bank.names),
            "info": json.dumps(method.info)}
    if isinstance(method, SPMMethod):
        tensors["gate.ref"] = method.gate.ref.detach().cpu().contiguous()
        meta["kind"] = "spm"
        meta["gate"] = json.dumps({"tau": method.gate.tau, "temp": method.gate.temp})
    return tensors, meta


def from_tensors(tensors: dict[str, Tensor], meta: dict[str, str],
                 dims: dict[str, tuple[int, int]]) -> StaticLoraMethod:
    layers = json.loads(meta["layers"])
    if not layers or sorted(layers) != sorted(dims):
        raise ValueError(f"its {len(layers)} layers are not the {len(dims)} this model trains")
    expected = {f"{p}.{n}" for n in layers for p in "ab"} | \
        ({"gate.ref"} if meta["kind"] == "spm" else set())
    if set(tensors) != expected:
        raise ValueError("its tensors are not those of this baseline")
    ordered = {n: dims[n] for n in layers}  # the training's order (the factors' order)
    rank = tensors[f"a.{layers[0]}"].shape[-1]
    bank = FactorBank(ordered, rank)
    for name, a, b in zip(layers, bank.a, bank.b):
        for param, t in ((a, tensors[f"a.{name}"]), (b, tensors[f"b.{name}"])):
            if t.shape != param.shape or t.dtype != param.dtype:
                raise ValueError(f"{name}: {tuple(t.shape)} {t.dtype}, this model needs "
                                 f"{tuple(param.shape)} {param.dtype}")
            param.data.copy_(t)
    bank.requires_grad_(False)
    info = json.loads(meta["info"])
    if meta["kind"] == "static":
        return StaticLoraMethod(meta["name"], bank, ordered, info)
    if meta["kind"] == "spm":
        gate = json.loads(meta["gate"])
        return SPMMethod(bank, ordered, SimilarityGate.restore(tensors["gate.ref"], gate["tau"],
                                                               gate["temp"]), info, meta["name"])
    raise ValueError(f"unknown kind {meta['kind']!r}")
