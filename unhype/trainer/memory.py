"""Memory options for the frozen base model: fp8 weights, text encoders on the CPU.

Used by `unhype train` and `unhype eval` (whose text encoders come back for every batch).

`--fp8_base` (kohya's name) keeps the denoiser's linear weights in float8 (e4m3) and upcasts each
layer to the compute dtype (`--mixed_precision`) for its own forward, through diffusers'
layerwise casting, at the cost of rounding the frozen weights to fp8. The model's own skip list
keeps norm, embedding and AdaLN modulation layers in the compute dtype, and convolutions stay
too (`UNSAFE_LAYERS`): FLUX.1-dev goes from 22.2 to 14.1 GiB, not 11.1, because its modulation
layers (3.2 B of 11.9 B parameters) stay in bf16, where kohya's `--fp8_base` rounds them too.
The gradients are those of the fp8-rounded model (tests/trainer/test_memory.py);
benchmarks/bench_training_memory.py counts the bytes.

`--nf4_base` stores the same linear layers in 4-bit NF4 instead: bitsandbytes' `Linear4bit`
(the QLoRA format), dequantised per layer into the compute dtype. FLUX.1-dev's transformer goes
from 22.2 to about 10.2 GiB, so with the text encoders on the CPU it trains on a 16 GB card; the
price is training against weights rounded to 16 levels per block of 64. The layers are replaced
(not cast in place), so `shrink` runs before the trainer hooks its target layers.

`--cache_text_encoder_outputs` (kohya's name): the trainer already encodes every prompt once,
before the first step; with this option the text encoders then wait in CPU memory (FLUX's
CLIP-L and T5-XXL: 9.1 GiB in bf16) and come back to the device only for the odd later encoding
(sample grids, the gate reference when the file is saved).

With either option `load_backend` builds the models on the CPU (`Backend.stage`): only the text
encoders visit the device for the up-front encoding, and `apply` moves the denoiser there last,
already in fp8, so the device never holds the full-precision model.
"""

from __future__ import annotations

import re
import sys

import torch

from unhype.trainer.backends import MEMORY_OPTIONS, TOY_FAMILIES
from unhype.errors import UnHypeError

FP8 = torch.float8_e4m3fn


def weight_bytes(*modules: torch.nn.Module) -> int:
    """Bytes of the parameters and buffers of `modules` (each tensor counted once), with the
    per-block scales of bitsandbytes 4-bit weights (kept in their quant_state)."""
    seen, total = set(), 0
    for module in modules:
        for t in [*module.parameters(), *module.buffers()]:
            if id(t) not in seen:
                seen.add(id(t))
                total += t.numel() * t.element_size()
                state = getattr(t, "quant_state", None)
                if state is not None:
                    scales = [state.absmax] + ([state.state2.absmax] if state.nested else [])
                    total += sum(x.numel() * x.element_size() for x in scales)
    return total


# Layerwise casting swaps each weight's data back to fp8 after the layer's forward. A convolution
# saves the weight tensor itself for its backward, which then reads fp8 ("expected scalar type
# Float but found Float8_e4m3fn", or a checkpoint's "different metadata" on recomputation);
# a linear layer saves a transposed view of the upcast data, which stays valid. So only linear
# layers are stored in fp8.
UNSAFE_LAYERS = (torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d, torch.nn.ConvTranspose1d,
                 torch.nn.ConvTranspose2d, torch.nn.ConvTranspose3d)


def store_in_fp8(model: torch.nn.Module, compute_dtype: torch.dtype) -> None:
    """Keep `model`'s linear weights in float8 e4m3, each layer upcast to `compute_dtype` for
    its forward (diffusers' `enable_layerwise_casting`, with the model's own skip list)."""
    if not hasattr(model, "enable_layerwise_casting"):
        import diffusers

        raise UnHypeError(f"--fp8_base needs diffusers >= 0.33 (layerwise casting); this is "
                          f"{diffusers.__version__}: pip install -U diffusers")
    model.enable_layerwise_casting(storage_dtype=FP8, compute_dtype=compute_dtype,
                                   skip_modules_classes=UNSAFE_LAYERS)


def skip_patterns(model: torch.nn.Module) -> tuple[str, ...]:
    """The module-name patterns diffusers' layerwise casting leaves alone (its defaults plus the
    model's own list: norms, embeddings, AdaLN modulation), so NF4 skips what fp8 skips."""
    from diffusers.hooks.layerwise_casting import DEFAULT_SKIP_MODULES_PATTERN

    return tuple(DEFAULT_SKIP_MODULES_PATTERN) + tuple(
        getattr(model, "_keep_in_fp32_modules", None) or ()) + tuple(
        getattr(model, "_skip_layerwise_casting_patterns", None) or ())


# bitsandbytes' NF4 with its defaults: 4 bits a weight, one absmax a block of 64 weights,
# itself quantised to 8 bits in blocks of 256 with an fp32 scale each (double quantisation)
NF4_BYTES_PER_WEIGHT = 0.5 + 1 / 64 + 4 / (64 * 256)


def nf4_layers(model: torch.nn.Module) -> list[tuple[torch.nn.Module, str, torch.nn.Linear]]:
    """(parent, name, layer) of every plain linear layer outside `skip_patterns`."""
    patterns = skip_patterns(model)
    out = []
    for name, module in model.named_modules():
        for child_name, child in module.named_children():
            path = f"{name}.{child_name}" if name else child_name
            if type(child) is torch.nn.Linear and not any(re.search(p, path) for p in patterns):
                out.append((module, child_name, child))
    return out


def store_in_nf4(model: torch.nn.Module, compute_dtype: torch.dtype, device=None) -> int:
    """Replace `nf4_layers(model)` by bitsandbytes NF4 layers that compute in `compute_dtype`,
    quantised on `device` (default: where each layer is) and left there; returns how many.
    The trainer passes its GPU for a model staged on the CPU: quantising there is fast (FLUX's
    8.7 B weights took ~6 min on this 2-core CPU) and only one full-precision layer at a time
    visits the GPU."""
    try:
        import bitsandbytes as bnb
    except ImportError:
        raise UnHypeError("--nf4_base needs bitsandbytes: pip install bitsandbytes") from None
    layers = nf4_layers(model)
    for parent, child_name, child in layers:
        target = torch.device(device) if device is not None else child.weight.device
        layer = bnb.nn.Linear4bit(child.in_features, child.out_features,
                                  bias=child.bias is not None, compute_dtype=compute_dtype,
                                  quant_type="nf4", device="meta")
        layer.weight = bnb.nn.Params4bit(child.weight.data.to(target), requires_grad=False,
                                         quant_type="nf4")
        if child.bias is not None:
            layer.bias = torch.nn.Parameter(child.bias.data.to(target), requires_grad=False)
        setattr(parent, child_name, layer.to(target))  # .to() quantises
    return len(layers)


def nf4_weight_bytes(model: torch.nn.Module) -> float:
    """The bytes `model` would take after `store_in_nf4` (works on the meta device)."""
    saved = sum(child.weight.numel() * (child.weight.element_size() - NF4_BYTES_PER_WEIGHT)
                for _, _, child in nf4_layers(model))
    return weight_bytes(model) - saved


def shrink(cfg, backend) -> str | None:
    """`--fp8_base` / `--nf4_base` on the loaded denoiser (on the CPU when `load_backend` staged
    it); a note for the log. Idempotent; NF4 replaces layers, so it must run before anything
    hooks them (the trainer calls this right after loading, `apply` again finds it done)."""
    kind = "fp8" if cfg.values.get("fp8_base") else "nf4" if cfg.values.get("nf4_base") else None
    if kind is None or backend.family.name in TOY_FAMILIES or backend.shrunk:
        return backend.shrunk
    if backend.device.type == "mps":
        raise UnHypeError(f"--{kind}_base: {kind} weights are not supported on Apple's mps "
                          "device; use --mixed_precision fp16 or bf16 instead")
    before = weight_bytes(backend.unet)
    if kind == "fp8":
        store_in_fp8(backend.unet, backend.dtype)
    else:
        store_in_nf4(backend.unet, backend.dtype, backend.device)
    backend.shrunk = (f"{kind} base: {_gib(before)} -> {_gib(weight_bytes(backend.unet))} GiB "
                      f"of denoiser weights, computed in "
                      f"{str(backend.dtype).replace('torch.', '')}")
    return backend.shrunk


def apply(cfg, backend) -> str | None:
    """Apply `cfg`'s memory options to a loaded backend; a line for the run's log, if any."""
    wanted = [name for name in MEMORY_OPTIONS if cfg.values.get(name)]
    if not wanted:
        return None
    if backend.family.name in TOY_FAMILIES:
        print(f"unhype: --{' --'.join(wanted)}: the toy models are tiny and always run in "
              "float32; the options apply to SD and FLUX models", file=sys.stderr)
        return None
    said = [note for note in [shrink(cfg, backend)] if note]
    if cfg.cache_text_encoder_outputs:
        moved = weight_bytes(*backend.text_modules())
        backend.offload_text_encoders()
        said.append(f"text encoders ({_gib(moved)} GiB) kept on the CPU after encoding")
    backend.place_denoiser()  # last: the device held only the text encoders until now
    return "; ".join(said)


def _gib(n: int) -> str:
    return f"{n / 2**30:.2f}"
