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

`--cache_text_encoder_outputs` (kohya's name): the trainer already encodes every prompt once,
before the first step; with this option the text encoders then wait in CPU memory (FLUX's
CLIP-L and T5-XXL: 9.1 GiB in bf16) and come back to the device only for the odd later encoding
(sample grids, the gate reference when the file is saved).

With either option `load_backend` builds the models on the CPU (`Backend.stage`): only the text
encoders visit the device for the up-front encoding, and `apply` moves the denoiser there last,
already in fp8, so the device never holds the full-precision model.
"""

from __future__ import annotations

import sys

import torch

from trainer.backends import TOY_FAMILIES
from unhype.errors import UnHypeError

FP8 = torch.float8_e4m3fn


def weight_bytes(*modules: torch.nn.Module) -> int:
    """Bytes of the parameters and buffers of `modules` (each tensor counted once)."""
    seen, total = set(), 0
    for module in modules:
        for t in [*module.parameters(), *module.buffers()]:
            if id(t) not in seen:
                seen.add(id(t))
                total += t.numel() * t.element_size()
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


def apply(cfg, backend) -> str | None:
    """Apply `cfg`'s memory options to a loaded backend; a line for the run's log, if any."""
    wanted = [name for name in ("fp8_base", "cache_text_encoder_outputs") if cfg.values.get(name)]
    if not wanted:
        return None
    if backend.family.name in TOY_FAMILIES:
        print(f"unhype: --{' --'.join(wanted)}: the toy models are tiny and always run in "
              "float32; the options apply to SD and FLUX models", file=sys.stderr)
        return None
    said = []
    if cfg.fp8_base:
        if backend.device.type == "mps":
            raise UnHypeError("--fp8_base: float8 weights are not supported on Apple's mps "
                              "device; use --mixed_precision fp16 or bf16 instead")
        before = weight_bytes(backend.unet)
        store_in_fp8(backend.unet, backend.dtype)
        said.append(f"fp8 base: {_gib(before)} -> {_gib(weight_bytes(backend.unet))} GiB of "
                    f"denoiser weights, computed in {str(backend.dtype).replace('torch.', '')}")
    if cfg.cache_text_encoder_outputs:
        moved = weight_bytes(*backend.text_modules())
        backend.offload_text_encoders()
        said.append(f"text encoders ({_gib(moved)} GiB) kept on the CPU after encoding")
    backend.place_denoiser()  # last: the device held only the text encoders until now
    return "; ".join(said)


def _gib(n: int) -> str:
    return f"{n / 2**30:.2f}"
