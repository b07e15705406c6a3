"""`unhype eval` under `accelerate launch` with 2 CPU processes: the batches are shared out, the
images gathered, and every number (and every grid) equals the single-process run's."""

import json

import torch

from tests.launch import launch
from unhype.cli import main
from unhype.distributed import Dist
from unhype.evaluation.harness import _gather_batches

KEYS = ("acc_e", "acc_s", "acc_g", "h_o", "h_c", "clip_score")


def test_eval_two_processes_equal_one(random_toy, toy_hypernet_file, tmp_path):
    args = ["eval", "--hypernet", str(toy_hypernet_file), "--toy_weights", str(random_toy),
            "--per_class", "2", "--steps", "2", "--batch_size", "4", "--classifier", "judge",
            "--keep_images", "3", "--device", "cpu"]
    one, two = tmp_path / "one", tmp_path / "two"
    assert main(args + ["--out", str(one)]) == 0
    done = launch(args + ["--out", str(two)])
    assert done.stdout.count("| base model |") == 1  # only the main process reports
    r1 = json.loads((one / "results.json").read_text())
    r2 = json.loads((two / "results.json").read_text())
    assert r2["processes"] == 2 and r1["processes"] == 1
    assert r1["sets"] == r2["sets"] and len(r1["methods"]) == 2
    n_prompts = sum(len(v) for v in r1["sets"].values())
    assert n_prompts > 2 * 4  # more than one batch per process
    for name, row in r1["methods"].items():
        for key in KEYS:
            assert r2["methods"][name][key] == row[key], (name, key)
    grids = sorted(p.name for p in one.glob("grid_*.png"))
    assert grids and grids == sorted(p.name for p in two.glob("grid_*.png"))
    for g in grids:  # the same images, pixel for pixel
        assert (one / g).read_bytes() == (two / g).read_bytes()
    # only the main process wrote the rows; a two-process rerun into the single-process
    # folder reuses the base row (its images go to both processes for change_s / kept_s) and
    # computes the hypernetwork's row, as the single-process run did
    rows = sorted(p.name for p in (two / "rows").iterdir())
    assert rows[:2] == ["base_model.json", "base_others.safetensors"] and len(rows) == 3
    (one / "rows" / rows[2]).unlink()
    again = launch(args + ["--out", str(one)])
    assert "reused 1 finished row(s)" in again.stderr and again.stdout.count("| base model |") == 1
    r3 = json.loads((one / "results.json").read_text())
    for name, row in r1["methods"].items():
        for key in KEYS + ("change_s", "kept_s"):
            assert r3["methods"][name][key] == row[key], (name, key)


def test_gather_in_one_process_is_the_concatenation():
    batches = {0: torch.rand(4, 3, 2, 2), 4: torch.rand(2, 3, 2, 2)}
    assert torch.equal(_gather_batches(Dist(), batches, 6),
                       torch.cat([batches[0], batches[4]]))
