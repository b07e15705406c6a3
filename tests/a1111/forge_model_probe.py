"""Run by tests/a1111/test_forge_models.py in a process of its own: Forge's own model classes
(``backend.nn.unet.IntegratedUNet2DConditionModel``, ``backend.nn.flux.
IntegratedFluxTransformer2DModel``), which the extension hooks in Forge instead of ldm's UNet.
Full size on the meta device: every target of every preset resolves, by the extension's
paths (``host_paths(meta, "ldm")``), to a layer of the expected shape. Tiny with random
weights: the hooks change the output exactly as merging the update into the weights does.
Prints JSON. Its own process: Forge's ``backend`` reads ``sys.argv`` and sets torch up on
import."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
FORGE = Path(os.environ["FORGE_PATH"])

LDM = {  # ComfyUI / huggingface_guess unet_config of each reference model
    "sd1": dict(num_res_blocks=[2] * 4, channel_mult=[1, 2, 4, 4], context_dim=768,
                transformer_depth=[1, 1, 1, 1, 1, 1, 0, 0], transformer_depth_middle=1,
                transformer_depth_output=[1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0], num_heads=8),
    "sd2": dict(num_res_blocks=[2] * 4, channel_mult=[1, 2, 4, 4], context_dim=1024,
                transformer_depth=[1, 1, 1, 1, 1, 1, 0, 0], transformer_depth_middle=1,
                transformer_depth_output=[1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0],
                num_head_channels=64, use_linear_in_transformer=True),
    "sdxl": dict(num_res_blocks=[2] * 3, channel_mult=[1, 2, 4], context_dim=2048,
                 transformer_depth=[0, 0, 2, 2, 10, 10], transformer_depth_middle=10,
                 transformer_depth_output=[0, 0, 0, 2, 2, 2, 10, 10, 10], num_head_channels=64,
                 use_linear_in_transformer=True, num_classes="sequential", adm_in_channels=2816),
}
FLUX_DEV = dict(in_channels=16, vec_in_dim=768, context_in_dim=4096, hidden_size=3072,
                mlp_ratio=4.0, num_heads=24, depth=19, depth_single_blocks=38,
                axes_dim=[16, 56, 56], theta=10000, qkv_bias=True, guidance_embed=True)


def _forge_unet(family, **override):
    from backend.nn.unet import IntegratedUNet2DConditionModel

    cfg = {"in_channels": 4, "out_channels": 4, "model_channels": 320,
           "use_spatial_transformer": True, **LDM[family], **override}
    return IntegratedUNet2DConditionModel(**cfg)


def _full_size(family):
    import torch

    from unhype.dynamic_lora import resolve_modules
    from unhype.families import get_family
    from unhype.naming import host_path

    fam = get_family(family)
    with torch.device("meta"):
        model = _forge_unet(family) if family != "flux" else \
            __import__("backend.nn.flux", fromlist=["x"]).IntegratedFluxTransformer2DModel(
                **FLUX_DEV)
    resolved = {}
    for preset in fam.presets:
        targets = fam.targets(preset)
        paths = {t.name: host_path(fam, t.path, "ldm") for t in targets}
        try:
            resolve_modules(model, paths, {t.name: (t.in_dim, t.out_dim) for t in targets})
            resolved[preset] = len(targets)
        except Exception as exc:  # reported, the test names it
            resolved[preset] = f"{type(exc).__name__}: {exc}"[:600]
    return resolved


def _hooked_vs_merged(family):
    """Largest difference between the hooked model's output and the merged model's, and the
    size of the update's effect (hooked vs base), on a tiny Forge model."""
    import copy

    import torch

    from unhype.dynamic_lora import DynamicLoRA
    from unhype.families import get_family
    from unhype.hypernet import delta_weight
    from unhype.naming import HostPath, host_path

    torch.manual_seed(0)
    if family == "flux":
        from backend.nn.flux import IntegratedFluxTransformer2DModel

        model = IntegratedFluxTransformer2DModel(**{
            **FLUX_DEV, "hidden_size": 64, "num_heads": 2, "depth": 1,
            "depth_single_blocks": 1, "axes_dim": [8, 12, 12], "context_in_dim": 32})
        inputs = dict(x=torch.randn(1, 16, 4, 4), timestep=torch.tensor([0.5]),
                      context=torch.randn(1, 5, 32), y=torch.randn(1, 768),
                      guidance=torch.tensor([3.5]))
        paths = {}  # the FLUX targets that exist in one double and one single block
        fam = get_family("flux")
        for t in fam.targets("attn_all"):
            if t.path.startswith(("transformer_blocks.0.", "single_transformer_blocks.0.")):
                hp = host_path(fam, t.path, "ldm")  # fused rows, scaled to the tiny width
                paths[t.name] = hp if hp.out_slice is None else HostPath(
                    hp.path, tuple(r * 64 // FLUX_DEV["hidden_size"] for r in hp.out_slice))
    else:
        model = _forge_unet(family, model_channels=32, channel_mult=[1, 2],
                            num_res_blocks=[1, 1], transformer_depth=[1, 1],
                            transformer_depth_middle=1, transformer_depth_output=[1, 1, 1, 1],
                            num_heads=-1, num_head_channels=16, num_classes=None,
                            adm_in_channels=None)
        ctx = LDM[family]["context_dim"]
        inputs = dict(x=torch.randn(2, 4, 8, 8), timesteps=torch.tensor([10, 500]),
                      context=torch.randn(2, 7, ctx))
        paths = {path.replace(".", "_"): HostPath(path)  # the tiny model's attention layers
                 for path, _ in model.named_modules()
                 if path.endswith(("attn2.to_k", "attn2.to_v", "attn1.to_q", "attn2.to_out.0"))}
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(0.05 * torch.randn(p.shape))
    model.eval()
    named = dict(model.named_modules())
    factors, dims = {}, {}
    for name, hp in paths.items():
        out_dim, in_dim = named[hp.path].weight.shape
        if hp.out_slice is not None:
            out_dim = hp.out_slice[1] - hp.out_slice[0]
        dims[name] = (in_dim, out_dim)
        factors[name] = (0.3 * torch.randn(1, in_dim, 2), 0.3 * torch.randn(1, out_dim, 2))
    merged = copy.deepcopy(model)
    merged_named = dict(merged.named_modules())
    with torch.no_grad():
        base = model(**inputs)
        for name, hp in paths.items():
            a, b = factors[name]
            w = merged_named[hp.path].weight
            rows = slice(None) if hp.out_slice is None else slice(*hp.out_slice)
            w[rows] += delta_weight(a[0], b[0]).to(w.dtype)
        want = merged(**inputs)
        with DynamicLoRA.attach(model, paths, dims) as lora:
            lora.set(factors, [0] * inputs["x"].shape[0], 1.0)
            got = model(**inputs)
        after = model(**inputs)  # the hooks gone: the base model again
    return {"layers": len(paths), "diff": float((got - want).abs().max()),
            "effect": float((want - base).abs().max()), "restored": float((after - base).abs().max())}


def main():
    sys.argv = [sys.argv[0], "--always-cpu"]  # backend.args parses the command line on import
    sys.path[:0] = [str(FORGE), str(ROOT)]
    import torch

    torch.set_num_threads(1)
    out = {"full_size": {f: _full_size(f) for f in ("sd1", "sd2", "sdxl", "flux")},
           "tiny": {f: _hooked_vs_merged(f) for f in ("sd1", "sdxl", "flux")}}
    print("RESULT " + json.dumps(out))


if __name__ == "__main__":
    main()
