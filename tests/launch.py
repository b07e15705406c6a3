"""Run `accelerate launch` with N CPU processes from a test (a gloo process group on this CPU).

`accelerate launch --cpu --num_processes N` starts N processes only through MPI
(`--mpirun_hostfile`); without it accelerate runs one. `--multi_gpu` starts them with torchrun,
and with no visible GPU each process runs on the CPU (the trainer and `unhype eval --device cpu`
then ask accelerate for a CPU group), which is what a CPU-only CI has.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _command(args: list[str], processes: int, module: str = "unhype",
             env: dict | None = None) -> tuple[list[str], dict]:
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu",
           "--num_processes", str(processes), "--num_machines", "1", "--mixed_precision", "no",
           "--dynamo_backend", "no", "--main_process_port", str(free_port()),
           "-m", module, *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
           "TQDM_DISABLE": "1", **(env or {})}
    return cmd, env


def start(args: list[str], processes: int = 2) -> subprocess.Popen:
    """The same launch, running, in its own process group (a terminal's foreground job: Ctrl-C
    there is os.killpg(proc.pid, SIGINT)); its output goes to files proc.out / proc.err."""
    import tempfile

    cmd, env = _command(args, processes)
    out, err = tempfile.TemporaryFile("w+"), tempfile.TemporaryFile("w+")
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out, stderr=err, text=True,
                            start_new_session=True)
    proc.out, proc.err = out, err
    return proc


def launch(args: list[str], processes: int = 2, timeout: int = 240, module: str = "unhype",
           env: dict | None = None, check: bool = True) -> subprocess.CompletedProcess:
    """`accelerate launch -m <module> <args>` with `processes` CPU processes, one thread each
    (`env`: more environment; `check`: a failed launch raises)."""
    cmd, env = _command(args, processes, module, env)
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)
    if check and done.returncode != 0:
        raise AssertionError(f"accelerate launch failed ({done.returncode}):\n"
                             f"{done.stdout[-3000:]}\n{done.stderr[-6000:]}")
    return done
