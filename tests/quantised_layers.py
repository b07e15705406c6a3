"""Linear layers stored quantised, as the hosts load 4-bit and GGUF checkpoints.

* `NF4Linear`: Forge's ``ForgeOperationsBNB4bits.Linear`` once loaded (ComfyUI_bitsandbytes_NF4
  ports the same class): ``weight`` a real bitsandbytes ``Params4bit``, packed uint8
  [out * in / 2, 1] with the shape in ``quant_state.shape``; forward = ``bnb.matmul_4bit``.
* `FP8Linear`: Forge's plain layer on an fp8 checkpoint (weight in float8_e4m3fn, cast per
  call).
* `GGUFLinear`: Forge's ``ForgeOperationsGGUF.Linear`` / ComfyUI-GGUF's ``GGMLOps.Linear``:
  the weight's data are the quantised bytes ([out, bytes] uint8, from the real ``gguf``
  package), its ``shape`` reports the real [out, in] (Forge ``ParameterGGUF``, ComfyUI-GGUF
  ``GGMLTensor.tensor_shape``); dequantised for each call.

`quantise_linears` swaps a model's Linear layers for one of them and returns the fp32 twin that
holds the dequantised weights: the model every hooked row must equal.
"""

from __future__ import annotations

import copy

import torch
from torch import nn


class NF4Linear(nn.Module):
    def __init__(self, linear: nn.Linear):
        super().__init__()
        from bitsandbytes.nn.modules import Params4bit

        self.weight = Params4bit(linear.weight.data.float().clone(), requires_grad=False,
                                 quant_type="nf4")._quantize("cpu")
        self.bias = linear.bias

    def forward(self, x):
        import bitsandbytes as bnb

        return bnb.matmul_4bit(x, self.weight.t(), bias=self.bias,
                               quant_state=self.weight.quant_state).to(x)

    def dequantized(self) -> torch.Tensor:
        from bitsandbytes.functional import dequantize_4bit

        return dequantize_4bit(self.weight, quant_state=self.weight.quant_state)


class ParameterGGUF(nn.Parameter):
    def __new__(cls, data, real_shape, qtype):
        return super().__new__(cls, torch.tensor(data), requires_grad=False)

    def __init__(self, data, real_shape, qtype):
        super().__init__()
        self.real_shape, self.qtype = torch.Size(real_shape), qtype

    @property
    def shape(self):
        return self.real_shape


class GGUFLinear(nn.Module):
    def __init__(self, linear: nn.Linear, qtype_name: str = "Q8_0"):
        super().__init__()
        from gguf import GGMLQuantizationType, quants

        qtype = getattr(GGMLQuantizationType, qtype_name)
        data = quants.quantize(linear.weight.detach().float().numpy(), qtype)
        self.weight = ParameterGGUF(data, linear.weight.shape, qtype)
        self.bias = linear.bias

    def dequantized(self) -> torch.Tensor:
        from gguf import quants

        return torch.from_numpy(quants.dequantize(self.weight.data.numpy(), self.weight.qtype))

    def forward(self, x):
        return nn.functional.linear(x, self.dequantized().to(x), self.bias)


class FP8Linear(nn.Module):
    """Forge's ``ForgeOperations.Linear`` on an fp8 checkpoint: the weight stored in
    float8_e4m3fn, cast to the input's dtype for each call (backend/operations.py
    weights_manual_cast)."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.weight = nn.Parameter(linear.weight.detach().to(torch.float8_e4m3fn),
                                   requires_grad=False)
        self.bias = linear.bias

    def dequantized(self) -> torch.Tensor:
        return self.weight.float()

    def forward(self, x):
        return nn.functional.linear(x, self.weight.to(x.dtype), self.bias)


LAYERS = {"nf4": ("bitsandbytes", NF4Linear), "gguf_q8_0": ("gguf", GGUFLinear),
          "fp8": ("torch", FP8Linear)}
PACKED = ("nf4", "gguf_q8_0")  # stored as integers, their real shape reported apart


def quantise_linears(root: nn.Module, kind: str, select=lambda name: True) -> nn.Module:
    """Replace every nn.Linear under `root` whose path `select` accepts with a `kind` layer;
    returns a deep copy of the original holding the dequantised weights (in fp32)."""
    layer = LAYERS[kind][1]
    plain = copy.deepcopy(root)
    for name, module in list(root.named_modules()):
        for child_name, child in list(module.named_children()):
            path = f"{name}.{child_name}" if name else child_name
            if isinstance(child, nn.Linear) and select(path):
                quantised = layer(child)
                setattr(module, child_name, quantised)
                with torch.no_grad():
                    plain.get_submodule(path).weight.copy_(quantised.dequantized())
    return plain
