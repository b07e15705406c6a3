"""The gate floor: prompts under the floor get exactly no update, the concept's own stay as
generated, files without a reference behave as before, bad values are refused."""

import pytest
import torch

from tests.helpers import hypernet_for, tiny_sd_unet
from unhype.errors import UnHypeError
from unhype.fileformat import load_hypernet, save_hypernet
from unhype.gate_floor import apply_floor, check_floor, floor_scale, reference_norm
from unhype.hypernet import delta_norm


def factors_with_norms(norms):
    """One layer, rank 1: prompt i's update B A^T has Frobenius norm norms[i]."""
    n = len(norms)
    a = torch.zeros(n, 4, 1)
    a[:, 0, 0] = 1.0
    b = torch.zeros(n, 3, 1)
    b[:, 0, 0] = torch.tensor(norms)
    return {"layer": (a, b)}


def test_floor_scale_ramp():
    norms = torch.tensor([0.0, 0.2, 0.29, 0.45, 0.6, 10.0])
    assert floor_scale(norms, 10.0, 0.03).tolist() == pytest.approx([0, 0, 0, 0.5, 1, 1],
                                                                    abs=1e-6)
    assert floor_scale(norms, 10.0, 0.0).tolist() == [1.0] * 6
    with pytest.raises(UnHypeError, match="positive"):
        floor_scale(norms, 0.0, 0.03)


def test_apply_floor_zeroes_weak_prompts_and_keeps_strong_ones_exactly():
    f = factors_with_norms([0.1, 0.45, 10.0, 12.5])
    out = apply_floor(f, 10.0, 0.03)
    assert delta_norm(out).tolist() == pytest.approx([0.0, 0.225, 10.0, 12.5])
    a, b = out["layer"]
    assert torch.equal(a[2:], f["layer"][0][2:]) and torch.equal(b, f["layer"][1])
    assert apply_floor(f, None, 0.03) is f  # no reference: as generated
    assert apply_floor(f, 10.0, 0.0) is f


def test_bad_floors_are_refused():
    for bad in (-0.01, 0.5, float("nan"), "x", None):
        with pytest.raises(UnHypeError, match="gate floor"):
            check_floor(bad)
    assert check_floor("0.05") == 0.05


def test_reference_is_the_weakest_concepts_median():
    def embed(prompts):
        return torch.tensor([[float(p)] for p in prompts])

    def hypernet(emb):
        return factors_with_norms(emb[:, 0].tolist())

    assert reference_norm(hypernet, embed, [["1", "2", "9"], ["4", "5", "6"]]) == 2.0
    with pytest.raises(UnHypeError, match="no concept prompts"):
        reference_norm(hypernet, embed, [[]])


def test_loaded_file_applies_its_floor(tmp_path):
    net = hypernet_for(tiny_sd_unet(), rank=1)
    emb = torch.randn(5, 768, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        norms = delta_norm(net(emb))
    old = tmp_path / "old.safetensors"
    save_hypernet(old, net, "sd1", concepts=[{"target": "cat"}], training={"mode": "direct"})
    loaded = load_hypernet(old)
    assert loaded.gate_reference is None  # trained before the reference existed: unchanged
    assert torch.equal(delta_norm(loaded.generate(emb)), delta_norm(net(emb)))

    # a reference that puts prompt 0 under the floor and the strongest prompt above 2f
    ref = float(norms[0]) / 0.02
    new = tmp_path / "new.safetensors"
    save_hypernet(new, net, "sd1", concepts=[{"target": "cat"}],
                  training={"mode": "direct", "gate_reference": ref})
    loaded = load_hypernet(new)
    got = delta_norm(loaded.generate(emb))
    assert got[0] == 0
    want = norms * floor_scale(norms, ref, 0.03)
    assert got.tolist() == pytest.approx(want.tolist(), rel=1e-5)
    assert torch.equal(delta_norm(loaded.generate(emb, floor=0)), delta_norm(net(emb)))

    for bad in ("big", -1.0, float("inf")):
        save_hypernet(new, net, "sd1", training={"gate_reference": bad})
        with pytest.raises(UnHypeError, match="gate_reference must be a positive number"):
            load_hypernet(new)
    # the floor the file was trained with is the hosts' default
    save_hypernet(new, net, "sd1", training={"gate_reference": ref, "gate_floor": 0.1})
    loaded = load_hypernet(new)
    assert loaded.gate_floor == 0.1
    assert torch.equal(delta_norm(loaded.generate(emb)), delta_norm(loaded.generate(emb, 0.1)))
    save_hypernet(new, net, "sd1", training={"gate_reference": ref, "gate_floor": 0.9})
    with pytest.raises(UnHypeError, match=r"training.gate floor must be in \[0, 0.5\)"):
        load_hypernet(new)


def test_comfy_factors_and_baked_lora_follow_the_floor(tmp_path):
    from unhype.bake import bake_lora
    from unhype.comfy_apply import generate_factors

    net = hypernet_for(tiny_sd_unet(), rank=1)
    emb = torch.randn(2, 768, generator=torch.Generator().manual_seed(4))
    path = tmp_path / "h.safetensors"
    save_hypernet(path, net, "sd1", concepts=[{"target": "cat"}],
                  training={"gate_reference": float(delta_norm(net(emb)).detach().max()) * 100})
    loaded = load_hypernet(path)  # both prompts under 1% of the reference: no update
    assert float(delta_norm(generate_factors(loaded, emb)).max()) == 0.0
    tensors, _ = bake_lora(loaded, emb[0], "a dog")
    downs = [t for k, t in tensors.items() if "lora_down" in k]
    assert downs and all(float(t.abs().max()) == 0 for t in downs)  # B A^T = 0

    # saturated: both prompts above 2 x 3% of the reference, raised to it in ComfyUI and in bake
    ref = float(delta_norm(net(emb)).detach().max()) * 4
    save_hypernet(path, net, "sd1", concepts=[{"target": "cat"}],
                  training={"gate_reference": ref, "gate_saturate": True})
    loaded = load_hypernet(path)
    assert delta_norm(generate_factors(loaded, emb)).tolist() == pytest.approx([ref] * 2, rel=1e-5)
    tensors, _ = bake_lora(loaded, emb[0], "a cat")
    baked = sum(float((tensors[k].double() @ tensors[k.replace("lora_up", "lora_down")].double())
                      .pow(2).sum()) for k in tensors if k.endswith("lora_up.weight")) ** 0.5
    assert baked == pytest.approx(ref, rel=1e-5)  # sum of ||up @ down||^2 over layers: ||B A^T||


def test_saturation_raises_recognised_prompts_to_the_concepts_strength():
    """gate_saturate: under the floor still nothing; from 2f the update norm is the reference
    (stronger prompts unchanged); the ramp between scales the reference."""
    norms = [0.0, 0.2, 0.29, 0.45, 0.6, 5.0, 10.0, 20.0]
    f = factors_with_norms(norms)
    out = apply_floor(f, 10.0, 0.03, saturate=True)
    assert delta_norm(out).tolist() == pytest.approx([0, 0, 0, 5.0, 10.0, 10.0, 10.0, 20.0],
                                                     abs=1e-5)
    # the direction of each update is the hypernetwork's: only A is scaled, positively
    a, b = out["layer"]
    assert torch.equal(b, f["layer"][1]) and bool((a[3:, 0, 0] > 0).all())
    assert torch.equal(out["layer"][0][6:], f["layer"][0][6:])  # at or above the reference
    assert apply_floor(f, 10.0, 0.0, saturate=True) is f  # no floor: nothing to saturate
    assert apply_floor(f, None, 0.03, saturate=True) is f
    unsat = delta_norm(apply_floor(f, 10.0, 0.03)).tolist()
    assert unsat == pytest.approx([0, 0, 0, 0.225, 0.6, 5.0, 10.0, 20.0], abs=1e-5)


def test_loaded_file_saturates_only_when_it_says_so(tmp_path):
    net = hypernet_for(tiny_sd_unet(), rank=1)
    emb = torch.randn(5, 768, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        norms = delta_norm(net(emb))
    ref = float(norms.max()) * 4  # every prompt recognised (above 2 x 3%), all weaker than ref
    path = tmp_path / "h.safetensors"
    save_hypernet(path, net, "sd1", concepts=[{"target": "cat"}],
                  training={"mode": "direct", "gate_reference": ref, "gate_saturate": True})
    loaded = load_hypernet(path)
    assert loaded.gate_saturate is True
    assert delta_norm(loaded.generate(emb)).tolist() == pytest.approx([ref] * 5, rel=1e-5)
    # a host may switch it off for a measurement: then as generated
    assert torch.equal(delta_norm(loaded.generate(emb, saturate=False)), norms)
    save_hypernet(path, net, "sd1", training={"gate_reference": ref})
    assert load_hypernet(path).gate_saturate is False  # files without the entry
    save_hypernet(path, net, "sd1", training={"gate_reference": ref, "gate_saturate": "yes"})
    with pytest.raises(UnHypeError, match="training.gate_saturate must be true or false"):
        load_hypernet(path)


def test_a_fields_mode_file_is_never_saturated_even_when_it_says_so(tmp_path, caplog):
    from unhype.summary import gate_text

    net = hypernet_for(tiny_sd_unet(), rank=1)
    emb = torch.randn(5, 768, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        norms = delta_norm(net(emb))
    ref = float(norms.max()) * 4
    path = tmp_path / "h.safetensors"  # as if edited by hand: the trainer refuses to write it
    save_hypernet(path, net, "sd1", concepts=[{"target": "cat"}],
                  training={"mode": "fields", "gate_reference": ref, "gate_saturate": True})
    with caplog.at_level("WARNING", logger="unhype"):
        loaded = load_hypernet(path)
    assert loaded.stored_saturate is True and loaded.gate_saturate is False
    assert "stored gate_saturate is ignored: gate_saturate needs mode 'direct'" in caplog.text
    assert torch.equal(delta_norm(loaded.generate(emb)), norms)  # as generated, not raised
    assert "saturation off (stored on, but gate_saturate needs mode 'direct'" in gate_text(loaded)
