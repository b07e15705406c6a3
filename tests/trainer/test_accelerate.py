"""`unhype train` under `accelerate launch` with 2 CPU processes on the toy world: the same
hypernetwork as one process with the same global batch, only the main process writes, and a
checkpoint resumes with another process count (2 -> 1, 1 -> 2)."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from tests.launch import launch, start
from unhype.trainer import checkpoint as ckpt
from unhype.trainer import distributed as tdist
from unhype.trainer.config import resolve
from unhype.cli import main
from unhype.distributed import split
from unhype.errors import UnHypeError
from unhype.fileformat import load_hypernet, read_header

# fields mode (3 hypernet calls a step, inner gradients), latent cache, retain batch 5 (shares
# 3 + 2: unequal, weighted), global batch 4 (2 + 2)
TOML = """
[model]
pretrained_model_name_or_path = "toy"
cpu_threads = 1
[concepts]
concepts = "circle"
template_set = "toy"
retain_prompts = "toy"
[network]
network_hidden = 16
hyper_steps = 5
[training]
mode = "fields"
max_train_steps = 4
train_batch_size = 4
retain_batch_size = 5
learning_rate = 1e-3
retain_learning_rate = 3e-4
fields_lambda = 10.0
ddim_steps = 3
latent_cache = 1
seed = 3
log_every = 1
[output]
output_name = "erase"
save_every_n_steps = 2
sample_steps = 2
sample_seeds = 1
"""
TOL = 1e-4  # float reduction order only (measured ~1e-5 on weights of size ~0.5)


@pytest.fixture(scope="module")
def config(tmp_path_factory):
    path = tmp_path_factory.mktemp("acc_cfg") / "toy.toml"
    path.write_text(TOML)
    return path


@pytest.fixture(scope="module")
def one_process(config, tmp_path_factory):
    out = tmp_path_factory.mktemp("one")
    assert main(["train", "--config_file", str(config), "--output_dir", str(out)]) == 0
    return out


@pytest.fixture(scope="module")
def two_processes(config, tmp_path_factory):
    out = tmp_path_factory.mktemp("two")
    done = launch(["train", "--config_file", str(config), "--output_dir", str(out)])
    return out, done.stderr


def _tensors(path):
    return {k: v for k, v in load_file(str(path)).items() if v.is_floating_point()}


def _max_diff(a, b):
    assert set(a) == set(b)
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def _log(out):
    return [json.loads(x) for x in (out / "erase-loss.jsonl").read_text().splitlines()]


def test_two_processes_train_what_one_does(one_process, two_processes):
    two, stderr = two_processes
    assert "shared by 2 processes" in stderr  # the cache was built once and broadcast
    assert stderr.count("unhype train: wrote") == 1  # only the main process writes
    diff = _max_diff(_tensors(one_process / "erase.safetensors"),
                     _tensors(two / "erase.safetensors"))
    assert diff < TOL, diff
    # checkpoints: network and both Adam states; the global generator is in the same state
    a = load_file(str(one_process / "checkpoints" / "step-0000004.safetensors"))
    b = load_file(str(two / "checkpoints" / "step-0000004.safetensors"))
    assert torch.equal(a["rng.gen"], b["rng.gen"])
    assert _max_diff({k: v for k, v in a.items() if v.is_floating_point()},
                     {k: v for k, v in b.items() if v.is_floating_point()}) < TOL
    info = json.loads(read_header(two / "checkpoints" / "step-0000004.safetensors")[0]["info"])
    assert info["processes"] == 2
    # one log, one line a step, the global batch's numbers
    log1, log2 = _log(one_process), _log(two)
    assert [r["step"] for r in log2] == [1, 2, 3, 4]
    for r1, r2 in zip(log1, log2):
        for key in ("remove", "retain", "esd_s", "s_mean", "esd_T", "delta_target"):
            assert r2[key] == pytest.approx(r1[key], rel=1e-4, abs=1e-6), key
    assert load_hypernet(two / "erase.safetensors").meta.training["steps_done"] == 4
    assert len(list((two / "samples").glob("circle-step*.png"))) == 1


def test_two_process_checkpoint_resumes_in_one_process(config, one_process, two_processes,
                                                       tmp_path):
    two, _ = two_processes
    out = tmp_path / "resumed"
    shutil.copytree(two, out)
    (out / "checkpoints" / "step-0000004.safetensors").unlink()
    (out / "erase.safetensors").unlink()
    assert main(["train", "--config_file", str(config), "--output_dir", str(out),
                 "--resume", str(out / "checkpoints")]) == 0
    diff = _max_diff(_tensors(one_process / "erase.safetensors"),
                     _tensors(out / "erase.safetensors"))
    assert diff < TOL, diff
    assert [r["step"] for r in _log(out)] == [1, 2, 3, 4]


def test_one_process_checkpoint_resumes_in_two_processes(config, one_process, tmp_path):
    out = tmp_path / "resumed2"
    shutil.copytree(one_process, out)
    (out / "checkpoints" / "step-0000004.safetensors").unlink()
    (out / "erase.safetensors").unlink()
    done = launch(["train", "--config_file", str(config), "--output_dir", str(out),
                   "--resume", str(out / "checkpoints")])
    assert "at step 2 (2 processes)" in done.stderr
    diff = _max_diff(_tensors(one_process / "erase.safetensors"),
                     _tensors(out / "erase.safetensors"))
    assert diff < TOL, diff
    assert [r["step"] for r in _log(out)] == [1, 2, 3, 4]


def test_gradient_accumulation_steps_the_optimisers_once_per_step(config, tmp_path):
    assert main(["train", "--config_file", str(config), "--output_dir", str(tmp_path),
                 "--max_train_steps", "2", "--gradient_accumulation_steps", "2",
                 "--train_batch_size", "2"]) == 0
    meta, _ = read_header(tmp_path / "checkpoints" / "step-0000002.safetensors")
    scalars = json.loads(meta["optimisers"])
    for name in ("remove", "retain"):  # Adam counted 2 steps, not 4 micro-batches
        steps = {v for k, v in scalars[name]["scalars"].items() if k.endswith(".step")}
        state = load_file(str(tmp_path / "checkpoints" / "step-0000002.safetensors"))
        steps |= {float(v) for k, v in state.items() if k.startswith(f"optim.{name}.")
                  and k.endswith(".step")}
        assert steps == {2.0}, (name, steps)
    assert load_hypernet(tmp_path / "erase.safetensors").meta.training[
        "gradient_accumulation_steps"] == 2


def test_global_batch_must_split_evenly(config):
    cfg = resolve({"config_file": str(config), "train_batch_size": 3})
    with pytest.raises(UnHypeError, match="multiple of 2"):
        tdist.check_batch(cfg, 2)
    tdist.check_batch(cfg, 1)
    assert [split(5, r, 2) for r in (0, 1)] == [slice(0, 2), slice(2, 5)]
    assert [split(4, r, 2) for r in (0, 1)] == [slice(0, 2), slice(2, 4)]


def test_ctrl_c_with_two_processes_stops_both_after_the_same_step(config, tmp_path):
    """Ctrl-C in the terminal of `accelerate launch` (SIGINT to the launcher and both workers,
    then the launcher's own copy to each worker): both finish the same step, the main process
    saves it, and resuming from it ends where an uninterrupted run of one more step does."""
    import os
    import signal
    import time

    long = tmp_path / "long.toml"
    long.write_text(config.read_text().replace("max_train_steps = 4", "max_train_steps = 400")
                    .replace("save_every_n_steps = 2", "save_every_n_steps = 0"))
    out = tmp_path / "two"
    proc = start(["train", "--config_file", str(long), "--output_dir", str(out)])
    log = out / "erase-loss.jsonl"
    deadline = time.monotonic() + 200
    while not (log.is_file() and log.read_text().strip()) and proc.poll() is None:
        assert time.monotonic() < deadline, "no training step within 200 s"
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGINT)
    proc.wait(timeout=120)
    proc.err.seek(0)
    stderr = proc.err.read()
    saved = ckpt.list_checkpoints(out / "checkpoints")
    assert len(saved) == 1, stderr[-3000:]
    step = int(saved[0].stem.split("-")[1])
    assert 1 <= step < 400 and f"interrupted after step {step}; saved" in stderr
    assert "not saved" not in stderr and not (out / "erase.safetensors").exists()
    assert [r["step"] for r in _log(out)] == list(range(1, step + 1))
    # resumed in one process for one more step = one process straight to that step
    ref = tmp_path / "ref"
    assert main(["train", "--config_file", str(long), "--output_dir", str(ref),
                 "--max_train_steps", str(step + 1)]) == 0
    assert main(["train", "--config_file", str(long), "--output_dir", str(out),
                 "--max_train_steps", str(step + 1), "--resume", str(saved[0])]) == 0
    diff = _max_diff(_tensors(ref / "erase.safetensors"), _tensors(out / "erase.safetensors"))
    assert diff < TOL, diff
