"""`Dist.tell` / `Dist.told` between two real gloo processes: through the process group's store,
and through the broadcast fallback a torch without that (private) store gets."""

from __future__ import annotations

import socket
import time
from types import SimpleNamespace

import pytest
import torch
import torch.multiprocessing as mp

import unhype.distributed as distributed
from unhype.distributed import Dist

TEXT = '{"meta": {"name": "SPM"}, "names": ["a", "b"], "note": "ünïcode"}'


def _worker(rank: int, port: int, without_store: bool, results) -> None:
    torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}",
                                         rank=rank, world_size=2)
    try:
        if without_store:
            distributed._store = lambda: None
        dist = Dist(SimpleNamespace(num_processes=2, process_index=rank, backend="gloo"))
        if dist.is_main:
            time.sleep(0.5)  # the other process is already waiting
            dist.tell("trained/spm", TEXT)
            dist.tell("trained/esd_x", "")
            results.put((rank, "told"))
        else:
            results.put((rank, dist.told("trained/spm")))
            results.put((rank, dist.told("trained/esd_x")))
        torch.distributed.barrier()  # rank 0 hosts the store: it stays until both have read
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.parametrize("without_store", [False, True], ids=["store", "broadcast"])
def test_the_main_process_tells_the_others(without_store):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    mp.start_processes(_worker, args=(port, without_store, results), nprocs=2, join=True,
                       start_method="spawn")
    got = sorted(results.get(timeout=10) for _ in range(3))
    assert got == [(0, "told"), (1, ""), (1, TEXT)]


def test_no_store_means_none(monkeypatch):
    import torch.distributed.distributed_c10d as c10d

    monkeypatch.delattr(c10d, "_get_default_store")
    assert distributed._store() is None
