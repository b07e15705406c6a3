"""Parameter counts of both hypernetwork variants for a family's preset (no weights built)."""

from __future__ import annotations

import functools

import torch

from unhype.families import get_family
from unhype.hypernet import HyperNetConfig, build_hypernet, default_hidden


def count_parameters(family: str, variant: str, rank: int, preset: str | None = None) -> int:
    fam = get_family(family)
    targets = [t.as_dict() for t in fam.targets(preset)]
    cfg = HyperNetConfig(variant=variant, targets=targets, embed_dim=fam.embedding.dim,
                         rank=rank, hidden=default_hidden(variant))
    with torch.device("meta"):
        return build_hypernet(cfg).num_parameters()


@functools.lru_cache(maxsize=None)
def variant_size_table(family: str = "sd1", ranks: tuple = (1, 6)) -> list[dict]:
    rows = []
    for rank in ranks:
        per_layer = count_parameters(family, "per_layer", rank)
        shared = count_parameters(family, "shared", rank)
        rows.append({"family": family, "rank": rank, "per_layer": per_layer, "shared": shared,
                     "ratio": per_layer / shared})
    return rows
