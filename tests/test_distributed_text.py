"""`Dist.tell` / `Dist.told` between two real gloo processes: through the process group's store,
and through the broadcast fallback a torch without that (private) store gets."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest

import unhype.distributed as distributed

ROOT = Path(__file__).resolve().parents[1]
TEXT = '{"meta": {"name": "SPM"}, "names": ["a", "b"], "note": "ünïcode"}'
WORKER = """
import json, sys, time
from types import SimpleNamespace
import torch
import unhype.distributed as distributed
from unhype.distributed import Dist

rank, port, without_store, text = int(sys.argv[1]), sys.argv[2], sys.argv[3] == "1", sys.argv[4]
torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                                     world_size=2)
if without_store:
    distributed._store = lambda: None
dist = Dist(SimpleNamespace(num_processes=2, process_index=rank, backend="gloo"))
if dist.is_main:
    time.sleep(0.5)  # the other process is already waiting
    dist.tell("trained/spm", text)
    dist.tell("trained/esd_x", "")
    got = ["told"]
else:
    got = [dist.told("trained/spm"), dist.told("trained/esd_x")]
torch.distributed.barrier()  # rank 0 hosts the store: it stays until both have read
torch.distributed.destroy_process_group()
print(json.dumps(got))
"""


@pytest.mark.parametrize("without_store", [False, True], ids=["store", "broadcast"])
def test_the_main_process_tells_the_others(without_store, tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    procs = [subprocess.Popen([sys.executable, str(script), str(rank), str(port),
                               str(int(without_store)), TEXT], cwd=ROOT, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE)
             for rank in (0, 1)]
    outs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [err[-2000:] for _, err in outs]
    assert json.loads(outs[0][0].splitlines()[-1]) == ["told"]
    assert json.loads(outs[1][0].splitlines()[-1]) == [TEXT, ""]


def test_no_store_means_none(monkeypatch):
    import torch.distributed.distributed_c10d as c10d

    monkeypatch.delattr(c10d, "_get_default_store")
    assert distributed._store() is None
