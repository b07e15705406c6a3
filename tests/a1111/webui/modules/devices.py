"""modules/devices.py: ``autocast()`` as A1111 1.10 chooses it, and ``manual_cast``.

With Settings > Optimizations > "FP8 weight", A1111 stores the UNet's Linear / Conv2d weights in
float8_e4m3fn and sets ``fp8``; with full-precision inference (``--no-half``, dtype_inference
float32) ``autocast()`` is then ``manual_cast(dtype)``: the forwards of these layer classes are
patched at class level to move the module's weights to the target dtype, run, and move them
back. On the CPU A1111 uses torch's bf16 autocast instead; elsewhere CUDA autocast. Defaults
here: fp32, no fp8 -> a no-op, as before.
"""

import contextlib

import torch

fp8 = False
device = torch.device("cpu")
dtype = torch.float32
dtype_inference = torch.float32
patch_module_list = [torch.nn.Linear, torch.nn.Conv2d, torch.nn.MultiheadAttention,
                     torch.nn.GroupNorm, torch.nn.LayerNorm]


def manual_cast_forward(target_dtype):
    def forward_wrapper(self, *args, **kwargs):
        if any(isinstance(a, torch.Tensor) and a.dtype != target_dtype for a in args):
            args = [a.to(target_dtype) if isinstance(a, torch.Tensor) else a for a in args]
            kwargs = {k: v.to(target_dtype) if isinstance(v, torch.Tensor) else v
                      for k, v in kwargs.items()}
        org_dtype = next(self.parameters()).dtype
        if org_dtype != target_dtype:
            self.to(target_dtype)
        result = self.org_forward(*args, **kwargs)
        if org_dtype != target_dtype:
            self.to(org_dtype)
        if target_dtype != dtype_inference and isinstance(result, torch.Tensor):
            result = result.to(dtype_inference)
        return result
    return forward_wrapper


@contextlib.contextmanager
def manual_cast(target_dtype):
    for module_type in patch_module_list:
        if hasattr(module_type, "org_forward"):
            continue
        module_type.org_forward = module_type.forward
        module_type.forward = manual_cast_forward(target_dtype)
    try:
        yield None
    finally:
        for module_type in patch_module_list:
            if hasattr(module_type, "org_forward"):
                module_type.forward = module_type.org_forward
                delattr(module_type, "org_forward")


def autocast(disable=False):
    if disable:
        return contextlib.nullcontext()
    if fp8 and device.type == "cpu":
        return torch.autocast("cpu", dtype=torch.bfloat16, enabled=True)
    if fp8 and dtype_inference == torch.float32:
        return manual_cast(dtype)
    return contextlib.nullcontext()
