"""The process group of `accelerate launch` as `unhype train` / `unhype eval` use it.

`Dist` wraps an accelerate `Accelerator` or `PartialState` (or nothing: one process) and offers
the collectives the project needs: a sum (and mean, max) over processes, a broadcast of named tensors from
the main process (the latent cache, retain embeddings: computed once, shared, no pickle) and a
barrier. With one process every call is a no-op that returns its input, so single-process runs
take exactly the code path they always took.
"""

from __future__ import annotations

import time

import torch
from torch import Tensor

# dtype codes for the broadcast header (every process must allocate the same buffers)
_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int64,
           torch.int32, torch.uint8, torch.bool)
_CHUNK = 1 << 26  # elements per broadcast call (bounds the device copy on NCCL)


class Dist:
    def __init__(self, state=None):
        self.state = state
        self.world = int(state.num_processes) if state is not None else 1
        self.rank = int(state.process_index) if state is not None else 0
        self.is_main = self.rank == 0

    @property
    def comm_device(self) -> torch.device:
        """Where collective buffers must live: the GPU for NCCL, the CPU for gloo."""
        if self.world > 1 and getattr(self.state, "backend", None) == "nccl":
            return torch.device(self.state.device)
        return torch.device("cpu")

    def barrier(self) -> None:
        if self.world > 1:
            self.state.wait_for_everyone()

    def sum(self, tensor: Tensor) -> Tensor:
        """Element-wise sum over processes (every process gets it), on the tensor's device."""
        return self._all_reduce(tensor, "SUM")

    def mean(self, tensor: Tensor) -> Tensor:
        """Element-wise mean over processes (every process gets it)."""
        return self.sum(tensor) / self.world if self.world > 1 else tensor

    def max(self, tensor: Tensor) -> Tensor:
        return self._all_reduce(tensor, "MAX")

    def _all_reduce(self, tensor: Tensor, op: str) -> Tensor:
        if self.world == 1:
            return tensor
        buf = tensor.detach().to(self.comm_device).contiguous().clone()
        torch.distributed.all_reduce(buf, getattr(torch.distributed.ReduceOp, op))
        return buf.to(tensor.device)

    def tell(self, key: str, text: str) -> None:
        """The main process leaves `text` under `key` in the process group's store, for `told`
        (every other process calls `told(key)` at the same point of its work)."""
        if self.world > 1 and self.is_main:
            store = _store()
            if store is None:
                self._send_text(text)
            else:
                store.set(f"unhype/{key}", text)

    def told(self, key: str, poll_s: float = 0.2) -> str:
        """What the main process `tell`s under `key` (the others wait for it). Polled, not a
        collective: a wait of hours (the main process training a baseline) meets no NCCL / gloo
        timeout, and Ctrl-C stops it at once. A main process that dies never tells, but then the
        launcher ends every process. (A torch without the store: a broadcast on a gloo group of
        its own whose timeout is a week.)"""
        key = f"unhype/{key}"
        store = _store()
        if store is None:
            return self._send_text(None)
        while not store.check([key]):
            time.sleep(poll_s)
        return store.get(key).decode()

    def _send_text(self, text: str | None) -> str:
        """`text` from the main process to every other one, on `_patient_group()`."""
        group = _patient_group()
        data = torch.tensor(list(text.encode()) if self.is_main else [], dtype=torch.uint8)
        size = torch.tensor([data.numel()], dtype=torch.long)
        torch.distributed.broadcast(size, src=0, group=group)
        if not self.is_main:
            data = torch.empty(int(size), dtype=torch.uint8)
        torch.distributed.broadcast(data, src=0, group=group)
        return data.numpy().tobytes().decode()

    def broadcast(self, tensors: dict[str, Tensor] | None, names: list[str]) -> dict[str, Tensor]:
        """The main process's `tensors` (others pass None) on every process, on the CPU."""
        if self.world == 1:
            return tensors
        dev = self.comm_device
        header = torch.zeros(1 + 10 * len(names), dtype=torch.long)
        if self.is_main:
            for i, name in enumerate(names):
                t = tensors[name]
                if t.dim() > 8:
                    raise ValueError(f"broadcast: {name} has more than 8 dimensions")
                header[1 + 10 * i: 1 + 10 * i + 2 + t.dim()] = torch.tensor(
                    [_DTYPES.index(t.dtype), t.dim(), *t.shape])
        header = header.to(dev)
        torch.distributed.broadcast(header, src=0)
        header = header.cpu()
        out = {}
        for i, name in enumerate(names):
            code, ndim = int(header[1 + 10 * i]), int(header[2 + 10 * i])
            shape = [int(x) for x in header[3 + 10 * i: 3 + 10 * i + ndim]]
            if self.is_main:
                flat = tensors[name].detach().cpu().contiguous().reshape(-1).clone()
            else:
                flat = torch.empty(int(torch.tensor(shape).prod()) if shape else 1,
                                   dtype=_DTYPES[code])
            for start in range(0, flat.numel(), _CHUNK):
                part = flat[start:start + _CHUNK].to(dev)
                torch.distributed.broadcast(part, src=0)
                flat[start:start + _CHUNK] = part.cpu()
            out[name] = flat.reshape(shape)
        return out


def _store():
    """The key-value store every process of the group shares (the launcher's rendezvous), or
    None: torch has no public way to it, and a torch without this private one falls back to
    `Dist._send_text`."""
    try:
        from torch.distributed.distributed_c10d import _get_default_store

        return _get_default_store()
    except (ImportError, AttributeError, RuntimeError, ValueError):
        return None


_PATIENT = None


def _patient_group():
    """A gloo group of every process whose collectives wait a week (made on first use, by every
    process at the same point): the main process may train for hours before it sends."""
    global _PATIENT
    if _PATIENT is None:
        from datetime import timedelta

        _PATIENT = torch.distributed.new_group(backend="gloo", timeout=timedelta(days=7))
    return _PATIENT


def split(n: int, rank: int, world: int) -> slice:
    """Process `rank`'s contiguous share of n rows (sizes differ by at most one)."""
    return slice(n * rank // world, n * (rank + 1) // world)
