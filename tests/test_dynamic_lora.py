"""Per-row dynamic LoRA: equals merged weights row by row, cond-only rows, removal, dtypes."""

import pytest
import torch
from torch import nn

from tests.helpers import hypernet_for, tiny_sd_unet
from unhype.dynamic_lora import DynamicLoRA, resolve_modules, silent_prompts
from unhype.errors import UnHypeError
from unhype.families import get_family
from unhype.hypernet import delta_weight
from unhype.naming import HostPath


class WeightOnly(nn.Module):
    """Not an nn.Linear (like Forge's / ComfyUI's layers): just an [out, in] weight."""

    def __init__(self, weight):
        super().__init__()
        self.weight = nn.Parameter(weight)

    def forward(self, x):
        return x @ self.weight.T


def reference(x, weight, bias, a, b, rows, strength):
    out = []
    for i, r in enumerate(rows):
        w = weight + (strength * delta_weight(a[r], b[r]) if r >= 0 else 0)
        out.append(x[i] @ w.T + (bias if bias is not None else 0))
    return torch.stack(out)


@pytest.mark.parametrize("layer_kind", ["linear", "weight_only"])
def test_per_row_equals_merging_each_rows_delta(layer_kind):
    torch.manual_seed(0)
    lin = nn.Linear(8, 6)
    layer = lin if layer_kind == "linear" else WeightOnly(lin.weight.detach().clone())
    root = nn.Sequential(layer)
    a, b = torch.randn(3, 8, 2), torch.randn(3, 6, 2)
    x = torch.randn(5, 4, 8)
    rows = [2, -1, 0, 1, -1]
    before = layer.weight.detach().clone()
    with DynamicLoRA.attach(root, {"l": "0"}, {"l": (8, 6)}) as lora:
        lora.set({"l": (a, b)}, rows, strength=0.7)
        y = root(x)
    bias = lin.bias if layer_kind == "linear" else None
    torch.testing.assert_close(y, reference(x, before, bias, a, b, rows, 0.7),
                               rtol=1e-5, atol=1e-5)
    assert torch.equal(layer.weight, before) and not layer._forward_hooks
    torch.testing.assert_close(root(x), reference(x, before, bias, a, b, [-1] * 5, 0.0))


def test_unet_two_prompts_cond_only_rows():
    unet = tiny_sd_unet()
    net = hypernet_for(unet, rank=2, perturb=0.1)
    fam = get_family("sd1")
    targets = fam.targets(model=unet)
    factors = net(torch.randn(2, 768))
    sample, t = torch.randn(4, 4, 8, 8), torch.tensor([10, 10, 10, 10])
    ctx = torch.randn(4, 7, 768)
    rows = [-1, -1, 0, 1]  # [uncond, uncond, prompt 0, prompt 1], as CFG batches them
    before = {k: v.clone() for k, v in unet.state_dict().items()}
    with torch.no_grad():
        base = unet(sample, t, ctx).sample
        paths = {tg.name: tg.path for tg in targets}
        with DynamicLoRA.attach(unet, paths, {tg.name: (tg.in_dim, tg.out_dim)
                                              for tg in targets}) as lora:
            lora.set(factors, rows, strength=1.0)
            dyn = unet(sample, t, ctx).sample
        # reference: merge each prompt's delta into a copy of the weights
        for row, prompt in ((2, 0), (3, 1)):
            merged = tiny_sd_unet()
            merged.load_state_dict(before)
            mods = dict(merged.named_modules())
            for tg in targets:
                a, b = factors[tg.name]
                mods[tg.path].weight += delta_weight(a[prompt], b[prompt])
            ref = merged(sample[row:row + 1], t[:1], ctx[row:row + 1]).sample
            torch.testing.assert_close(dyn[row:row + 1], ref, rtol=1e-3, atol=2e-4)
    assert torch.equal(dyn[:2], base[:2])  # unconditional rows ran the base weights
    assert (dyn[2:] - base[2:]).abs().max() > 1e-2  # the LoRA is far above tolerance
    assert all(torch.equal(v, before[k]) for k, v in unet.state_dict().items())


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_modules(dtype):
    torch.manual_seed(0)
    lin = nn.Linear(16, 8).to(dtype)
    a, b = torch.randn(1, 16, 1), torch.randn(1, 8, 1)
    x = torch.randn(2, 3, 16).to(dtype)
    with DynamicLoRA.attach(nn.Sequential(lin), {"l": "0"}) as lora:
        lora.set({"l": (a, b)}, [0, -1])
        y = lin(x)
    assert y.dtype == dtype
    ref = reference(x.float(), lin.weight.float(), lin.bias.float(), a, b, [0, -1], 1.0)
    torch.testing.assert_close(y.float(), ref, rtol=3e-2, atol=3e-2)


def test_compute_dtype_runs_the_lora_matmuls_in_fp32_in_a_bf16_model(monkeypatch):
    """compute_dtype float32: the hook's two matmuls see fp32 operands (the bf16 activations
    cast up), the layer's output stays bf16 and matches the fp32 reference."""
    torch.manual_seed(0)
    lin = nn.Linear(64, 32).to(torch.bfloat16)
    a, b = torch.randn(1, 64, 2), torch.randn(1, 32, 2)
    x = torch.randn(2, 40, 64).to(torch.bfloat16)
    ref = reference(x.float(), lin.weight.float(), lin.bias.float(), a, b, [0, -1], 1.0)
    real_bmm, real_baddbmm, seen = torch.bmm, torch.baddbmm, []

    def spy(p, q):
        seen.append((p.dtype, q.dtype))
        return real_bmm(p, q)

    def spy_add(c, p, q):  # the bf16 path adds the second product to the output in one kernel
        seen.append((p.dtype, q.dtype))
        return real_baddbmm(c, p, q)
    monkeypatch.setattr(torch, "bmm", spy)
    monkeypatch.setattr(torch, "baddbmm", spy_add)
    for compute, expect in ((None, torch.bfloat16), (torch.float32, torch.float32)):
        monkeypatch.setattr(DynamicLoRA, "compute_dtype", compute)
        seen.clear()
        with DynamicLoRA.attach(nn.Sequential(lin), {"l": "0"}) as lora:
            lora.set({"l": (a, b)}, [0, -1])
            with torch.no_grad():
                y = lin(x)
        assert seen == [(expect, expect)] * 2
        assert y.dtype == torch.bfloat16
        torch.testing.assert_close(y.float(), ref, rtol=3e-2, atol=0.1)  # bf16 output rounding
    # with fp32 compute the update is added in fp32 and rounded once: exactly
    # round(base + delta), not round(base + round(delta))
    monkeypatch.setattr(torch, "bmm", real_bmm)
    with torch.no_grad():
        base = lin(x)
        delta = real_bmm(real_bmm(x[:1].float(), a), b.transpose(1, 2))
    assert torch.equal(y[:1], (base[:1].float() + delta).to(torch.bfloat16))
    assert torch.equal(y[1:], base[1:])


def test_row_map_is_moved_once_per_row_map_not_per_layer(monkeypatch):
    """Copying the row map to the factors' device at each hooked layer syncs a GPU per layer;
    it is copied once per row map (sampling), and still once while training recomputes
    the factors at every call."""
    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Linear(8, 8) for _ in range(3)])
    factors = {str(i): (torch.randn(1, 8, 1), torch.randn(1, 8, 1)) for i in range(3)}
    moves = []
    real = DynamicLoRA._rows_on

    def counted(self, device):
        if device not in self._rows.rows:
            moves.append(device)
        return real(self, device)
    monkeypatch.setattr(DynamicLoRA, "_rows_on", counted)
    with DynamicLoRA.attach(model, {str(i): str(i) for i in range(3)}) as lora:
        lora.set(factors, [-1, 0])
        with torch.no_grad():
            model(torch.randn(2, 8))
            model(torch.randn(2, 8))
        assert len(moves) == 1
        model(torch.randn(2, 8)).sum().backward()  # grad on: factors recomputed per call
        assert len(moves) == 1
        lora.set_rows([0, 0])
        with torch.no_grad():
            out = model(torch.randn(2, 8))
        assert len(moves) == 2 and out.shape == (2, 8)


def test_row_cache_gathers_once_across_steps_and_again_when_anything_changes(monkeypatch):
    """A host that builds hooks every step (ComfyUI's wrapper) shares one RowCache: the gathered
    factors of the last step serve the next while factors, row map and strength are the same,
    with the same outputs as gathering afresh."""
    from unhype.dynamic_lora import RowCache

    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Linear(8, 8) for _ in range(3)])
    paths = {str(i): str(i) for i in range(3)}
    factors = {str(i): (torch.randn(2, 8, 1), torch.randn(2, 8, 1)) for i in range(3)}
    gathered = []
    real = DynamicLoRA._row_factors

    def counted(self, name, device, dtype):
        if (name, device, dtype) not in self._rows.layers:
            gathered.append(name)
        return real(self, name, device, dtype)
    monkeypatch.setattr(DynamicLoRA, "_row_factors", counted)
    cache, x = RowCache(), torch.randn(2, 8)

    def step(f, rows, strength=1.0, shared=cache):
        with DynamicLoRA.attach(model, paths) if shared is None else \
                DynamicLoRA(resolve_modules(model, paths), shared) as lora:
            lora.set(f, rows, strength, skip_silent=False)
            with torch.no_grad():
                return model(x)
    first = step(factors, [-1, 0])
    assert len(gathered) == 3
    again = step(factors, [-1, 0])
    assert len(gathered) == 3 and torch.equal(again, first)  # reused, same output
    fresh = step(factors, [-1, 0], shared=None)
    assert len(gathered) == 6 and torch.equal(fresh, first)  # no cache: gathered again
    changes = [(factors, [-1, 1], 1.0), (factors, [-1, 1], 0.5),
               ({k: (a.clone(), b.clone()) for k, (a, b) in factors.items()}, [-1, 1], 0.5)]
    for n, (f, rows, strength) in enumerate(changes, start=3):
        step(f, rows, strength)
        assert len(gathered) == 3 * n


def test_fused_layer_slice_only_touches_its_rows():
    torch.manual_seed(0)
    qkv = nn.Linear(4, 12)
    a, b = torch.randn(1, 4, 1), torch.randn(1, 4, 1)
    x = torch.randn(1, 2, 4)
    base = qkv(x)
    with DynamicLoRA.attach(nn.Sequential(qkv), {"v": HostPath("0", (8, 12))}, {"v": (4, 4)}) as lo:
        lo.set({"v": (a, b)}, [0])
        y = qkv(x)
    assert torch.equal(y[..., :8], base[..., :8])
    torch.testing.assert_close(y[..., 8:], base[..., 8:] + x @ a[0] @ b[0].T)


def test_hooks_removed_after_exception_and_bad_values_refused():
    lin = nn.Linear(4, 4)
    root = nn.Sequential(lin)
    a, b = torch.randn(1, 4, 1), torch.randn(1, 4, 1)
    with pytest.raises(RuntimeError, match="boom"):
        with DynamicLoRA.attach(root, {"l": "0"}) as lora:
            lora.set({"l": (a, b)}, [0])
            raise RuntimeError("boom")
    assert not lin._forward_hooks
    with DynamicLoRA.attach(root, {"l": "0"}) as lora:
        for bad in (float("nan"), float("inf"), "strong"):
            with pytest.raises(UnHypeError, match="strength"):
                lora.set({"l": (a, b)}, [0], strength=bad)
        with pytest.raises(UnHypeError, match="outside"):
            lora.set({"l": (a, b)}, [1])
        lora.set({"l": (a, b)}, [0, 0])
        with pytest.raises(UnHypeError, match="row map"):
            lin(torch.randn(3, 4))
    assert not lin._forward_hooks


def test_gradients_flow_to_the_factors():
    lin = nn.Linear(4, 3)
    a = torch.randn(1, 4, 1, requires_grad=True)
    b = torch.randn(1, 3, 1, requires_grad=True)
    with DynamicLoRA.attach(nn.Sequential(lin), {"l": "0"}) as lora:
        lora.set({"l": (a, b)}, [0])
        lin(torch.randn(1, 4)).sum().backward()
    assert a.grad is not None and b.grad.abs().sum() > 0


def test_silent_prompts_are_skipped_with_the_same_output():
    torch.manual_seed(0)
    lin = nn.Linear(8, 6)
    root = nn.Sequential(lin)
    a, b = torch.randn(3, 8, 2), torch.randn(3, 6, 2)
    a[1] = 0  # prompt 1: the gate floor switched it off
    x = torch.randn(4, 4, 8)
    with DynamicLoRA.attach(root, {"l": "0"}, {"l": (8, 6)}) as lora:
        lora.set({"l": (a, b)}, [0, 1, -1, 2], skip_silent=True)
        assert lora.rows.tolist() == [0, -1, -1, 2]
        y = root(x)
        lora.set_rows([1, 1, 1, 1])  # later row maps are mapped too: nothing left to add
        assert lora.rows.tolist() == [-1] * 4
        y_silent = root(x)
        lora.set({"l": (a, b)}, [0, 1, -1, 2], skip_silent=False)  # prompt 1 keeps its row
        assert lora.rows.tolist() == [0, 1, -1, 2]
        lora.set({"l": (a, b)}, [0, 1, -1, 2])  # default: skipped only with gradients off
        assert lora.rows.tolist() == [0, 1, -1, 2]  # (gradients are on here)
        with torch.no_grad():
            lora.set({"l": (a, b)}, [0, 1, -1, 2])
        assert lora.rows.tolist() == [0, -1, -1, 2]
    torch.testing.assert_close(y, reference(x, lin.weight, lin.bias, a, b, [0, 1, -1, 2], 1.0),
                               rtol=1e-5, atol=1e-5)
    assert torch.equal(y_silent, root(x))  # base layers, bit for bit
    b[2] = 0  # a zero B silences a prompt too; one live layer keeps it
    other = (torch.randn(3, 8, 2), torch.randn(3, 6, 2))
    assert silent_prompts({"l": (a, b)}).tolist() == [False, True, True]
    assert silent_prompts({"l": (a, b), "m": other}).tolist() == [False, False, False]


def test_row_matcher_tells_rows_with_the_same_context_apart_by_their_pooled_vector():
    """FLUX prompts with the same t5xxl text share the cross-attention tensor; ComfyUI passes
    each row's pooled vector as ``y`` (SDXL: followed by the size embeddings)."""
    from unhype.comfy_apply import RowMatcher

    gen = torch.Generator().manual_seed(0)
    cross = torch.randn(4, 8, generator=gen)
    pooled = torch.randn(2, 6, generator=gen)
    matcher = RowMatcher([cross, cross.clone()], pooled)
    context = torch.stack([cross, cross, torch.randn(4, 8, generator=gen)])
    y = torch.stack([pooled[1], pooled[0], pooled[0]])
    assert matcher.match(context, y).tolist() == [1, 0, -1]
    sdxl_y = torch.cat([y, torch.randn(3, 5, generator=gen)], dim=1)  # pooled, then sizes
    assert matcher.match(context, sdxl_y).tolist() == [1, 0, -1]
    assert matcher.match(context).tolist() == [0, 0, -1]  # no y: the first, as before
    other = torch.randn(3, 6, generator=gen)  # a y that is none of them: the context decides
    assert matcher.match(context, other).tolist() == [0, 0, -1]
