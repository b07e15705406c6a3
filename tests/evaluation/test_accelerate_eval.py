"""`unhype eval` under `accelerate launch` with 2 CPU processes: the batches are shared out, the
images gathered, and every number (and every grid) equals the single-process run's; a trained
baseline is trained by the main process only and sent to the others."""

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


def _trace(base, rank: int) -> list[dict]:
    path = base.parent / f"{base.name}.{rank}"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


def test_only_the_main_process_trains_a_baseline(random_toy, tmp_path):
    from safetensors import safe_open

    out, trace = tmp_path / "out", tmp_path / "trace"
    args = ["eval", "--model", "toy", "--erase", "circle", "--toy_weights", str(random_toy),
            "--baselines", "esd_x,spm", "--baseline_steps", "2", "--per_class", "1",
            "--steps", "2", "--batch_size", "4", "--classifier", "judge", "--no_base",
            "--device", "cpu", "--out", str(out)]
    module, env = "tests.evaluation.traced_eval", {"TRACE": str(trace)}
    launch(args, module=module, env=env)
    main_run, other = _trace(trace, 0), _trace(trace, 1)
    assert [e["event"] for e in main_run].count("train") == 2
    assert not [e for e in other if e["event"] == "train"]  # it received the weights
    stored = set()
    for name in ("esd_x", "spm"):
        with safe_open(str(out / "trained" / f"{name}.safetensors"), "pt") as fh:
            stored.add(fh.metadata()["sha256"])
    shas = {rank: {e["name"]: e["sha"] for e in run if e["event"] == "weights"}
            for rank, run in ((0, main_run), (1, other))}
    assert len(shas[1]) == 2 and shas[0] == shas[1]  # bit for bit, as the main process kept them
    assert set(shas[1].values()) == stored

    for path in trace.parent.glob("trace.*"):
        path.unlink()
    failed = launch(args + ["--force"], module=module, env={**env, "FAIL_TRAINING": "1"},
                    check=False)
    assert failed.returncode != 0
    other = _trace(trace, 1)
    assert not [e for e in other if e["event"] == "train"] and other[-1] == {"event": "exit",
                                                                             "code": 2}
    assert "esd_x: the main process could not train or load it (RuntimeError: training " \
           "failed on purpose)" in failed.stderr


def test_gather_in_one_process_is_the_concatenation():
    batches = {0: torch.rand(4, 3, 2, 2), 4: torch.rand(2, 3, 2, 2)}
    assert torch.equal(_gather_batches(Dist(), batches, 6),
                       torch.cat([batches[0], batches[4]]))
