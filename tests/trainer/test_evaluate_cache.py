"""The base-prediction cache key of unhype/trainer/evaluate.py: one key per family and weight set."""

import os
from types import SimpleNamespace

from unhype.trainer import evaluate


def fake_weights(root):
    for rel in ("unet/diffusion_pytorch_model.safetensors", "scheduler/scheduler_config.json",
                "tokenizer/tokenizer.json", "text_encoder/model.safetensors",
                "judge/model.safetensors", "flow/transformer/diffusion_pytorch_model.safetensors",
                "flow/scheduler/scheduler_config.json"):
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"x" * 8)
    return root


def backend(family, weights):
    return SimpleNamespace(family=SimpleNamespace(name=family), weights=weights)


def test_toy_and_toy_flux_never_share_cached_base_predictions(tmp_path):
    weights = fake_weights(tmp_path)
    sets = evaluate.prompt_sets(["circle"], per_class=1)
    sd, flow = backend("toy", weights), backend("toy_flux", weights)
    assert evaluate.base_cache_key(sd, sets, 7) != evaluate.base_cache_key(flow, sets, 7)
    assert evaluate.base_cache_key(sd, sets, 7) == evaluate.base_cache_key(sd, sets, 7)


def test_key_follows_exactly_the_files_the_family_reads(tmp_path):
    weights = fake_weights(tmp_path)
    sets = evaluate.prompt_sets(["circle"], per_class=1)
    sd, flow = backend("toy", weights), backend("toy_flux", weights)
    before = {b.family.name: evaluate.base_cache_key(b, sets, 7) for b in (sd, flow)}
    transformer = weights / "flow/transformer/diffusion_pytorch_model.safetensors"
    transformer.write_bytes(b"y" * 9)  # a rebuilt flow model
    assert evaluate.base_cache_key(flow, sets, 7) != before["toy_flux"]
    assert evaluate.base_cache_key(sd, sets, 7) == before["toy"]  # the SD toy does not read it
    unet = weights / "unet/diffusion_pytorch_model.safetensors"
    os.utime(unet, (1, 1))
    assert evaluate.base_cache_key(sd, sets, 7) != before["toy"]
