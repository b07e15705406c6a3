"""Robustness probes: deterministic typos/paraphrases; the embedding attack stays in its bound and
reaches an input-dependent method through the pooled (EOS) row."""

from __future__ import annotations

import torch

from unhype.evaluation.attack import (AttackSettings, embedding_attack, eos_index,
                                      paraphrase_prompts, typos)


def test_typos_and_paraphrases():
    assert typos("circle") == ["cicle", "cirrcle", "cricle"]
    assert all(t != "star" for t in typos("star")) and typos("star")
    assert all("ring" in p for p in paraphrase_prompts("ring"))


def test_embedding_attack_is_bounded_and_moves_the_pooled_row(toy_backend, toy_hypernet_file):
    from unhype.evaluation.harness import ToyGenerator
    from unhype.evaluation.methods import UnHypeMethod
    from unhype.fileformat import load_hypernet

    gen = ToyGenerator(toy_backend.toy, steps=2)
    method = UnHypeMethod.from_loaded(load_hypernet(toy_hypernet_file)).attach(gen.unet)
    prompts = ["a red circle", "a disk"]
    try:
        hidden, pooled = gen.encode(prompts)
        target = torch.rand(2, 3, 16, 16)
        h, p = embedding_attack(gen, method, prompts, target, AttackSettings(eps=0.2, steps=2))
    finally:
        method.detach()
    rel = (h - hidden).norm(dim=-1) / hidden.norm(dim=-1)
    assert rel.max() <= 0.2 + 1e-4 and rel.max() > 0.05
    assert torch.allclose(p, h[torch.arange(2), eos_index(hidden, pooled)])
    assert not torch.allclose(p, pooled)
    assert method.lora is None  # detached: no hooks left
