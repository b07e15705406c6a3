"""End-to-end training on tiny random diffusers models: output file, resume, Ctrl-C, NaN."""

import json
import math

import pytest
import torch
from safetensors.torch import load_file

from tests.trainer.conftest import inline_cfg
from unhype.trainer import checkpoint as ckpt
from unhype.trainer import loop
from unhype.trainer.config import resolve
from unhype.fileformat import check_targets_in_model, load_hypernet


def run_training(model, out, **over):
    cfg = inline_cfg(model, out, **over)
    session = loop.prepare(cfg, quiet=True)
    return loop.train(session, progress=False), session


def net_state(out):
    tensors = load_file(str(ckpt.list_checkpoints(out / "checkpoints")[-1]))
    return {k: v for k, v in tensors.items() if not k.startswith("rng.")}


def test_output_file_loads_with_metadata(tiny_sd1, tmp_path):
    code, session = run_training(tiny_sd1, tmp_path, max_train_steps=3)
    assert code == 0
    loaded = load_hypernet(tmp_path / "erase.safetensors")
    meta = loaded.meta
    assert meta.family == "sd1" and meta.embedding["source"] == "clip_l_pooled"
    assert meta.concepts[0]["target"] == "dog" and meta.concepts[0]["anchor"] == "cat"
    assert meta.concepts[0]["synonyms"] == ["puppy"]
    assert meta.training["steps_done"] == 3 and meta.training["mode"] == "fields"
    assert meta.training["prediction_type"] == "epsilon"
    assert meta.config.rank == 1 and meta.config.hyper_steps == 10
    assert len(meta.config.targets) == 8  # 4 cross-attention blocks x (to_k, to_v)
    check_targets_in_model(loaded, session.backend.unet)
    # the trained network is in the file: same output as the in-memory one
    emb = session.item_emb[:2]
    for (a1, b1), (a2, b2) in zip(loaded.hypernet(emb).values(), session.hypernet(emb).values()):
        assert torch.allclose(a1, a2) and torch.allclose(b1, b2)
    lines = [json.loads(x) for x in (tmp_path / "erase-loss.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == [1, 2, 3]
    assert {"remove", "retain", "esd_T", "delta_target", "delta_retain"} <= set(lines[0])
    grids = list((tmp_path / "samples").glob("dog-step*.png"))
    assert grids and (tmp_path / "samples" / "dog-prompts.txt").is_file()
    # training moved the LoRA off zero for the target
    assert lines[-1]["delta_target"] > 0


@pytest.mark.parametrize("schedule", ["constant", "cosine"])
def test_resume_after_crash_equals_uninterrupted(tiny_sd1, tmp_path, monkeypatch, schedule):
    straight = tmp_path / "straight"
    assert run_training(tiny_sd1, straight, save_every_n_steps=2,
                        lr_scheduler=schedule)[0] == 0
    crashed = tmp_path / "crashed"
    real = loop.draw_batch
    calls = {"n": 0}

    def dies_at_step_3(run, gen):
        calls["n"] += 1
        if calls["n"] == 3:
            raise SystemExit("killed")  # what kill -9 leaves: the step-2 checkpoint only
        return real(run, gen)

    monkeypatch.setattr(loop, "draw_batch", dies_at_step_3)
    with pytest.raises(SystemExit):
        run_training(tiny_sd1, crashed, save_every_n_steps=2, lr_scheduler=schedule)
    monkeypatch.setattr(loop, "draw_batch", real)
    assert [p.name for p in ckpt.list_checkpoints(crashed / "checkpoints")] == \
        ["step-0000002.safetensors"]
    assert not (crashed / "erase.safetensors").exists()
    code, session = run_training(tiny_sd1, crashed, save_every_n_steps=2, lr_scheduler=schedule,
                                 resume=str(crashed / "checkpoints"))
    assert code == 0
    lr = session.optimisers["remove"].param_groups[0]["lr"]  # the schedule went on, not restarted
    assert lr == pytest.approx(1e-3) if schedule == "constant" else lr == pytest.approx(0, abs=1e-12)
    a, b = net_state(straight), net_state(crashed)
    assert set(a) == set(b)
    for key in a:  # network and both Adam states, bit for bit
        assert torch.equal(a[key], b[key]), key
    steps = [json.loads(x)["step"] for x in (crashed / "erase-loss.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]


def test_ctrl_c_stops_after_the_step_and_resumes_exactly(tiny_sd1, tmp_path, monkeypatch,
                                                         capsys):
    """Ctrl-C (a real SIGINT) in the middle of step 2: the step completes, its checkpoint is
    what a 2-step run holds, and resuming to 3 steps gives the uninterrupted run's network, Adam
    states and RNGs bit for bit."""
    import os
    import signal

    straight = tmp_path / "straight"
    assert run_training(tiny_sd1, straight, max_train_steps=3)[0] == 0
    real = loop.retain_loss
    calls = {"n": 0}

    def interrupted(run, gen):
        calls["n"] += 1
        if calls["n"] == 2:
            os.kill(os.getpid(), signal.SIGINT)  # after step 2's removal update, before retention
        return real(run, gen)

    out = tmp_path / "interrupted"
    monkeypatch.setattr(loop, "retain_loss", interrupted)
    handler = signal.getsignal(signal.SIGINT)  # SIG_IGN when the suite runs in the background
    code, _ = run_training(tiny_sd1, out, max_train_steps=3)
    assert code == loop.EXIT_INTERRUPTED
    assert "stopping after this step" in capsys.readouterr().err
    saved = ckpt.list_checkpoints(out / "checkpoints")
    assert [p.name for p in saved] == ["step-0000002.safetensors"]  # the step completed
    assert signal.getsignal(signal.SIGINT) is handler  # the caller's handler restored
    monkeypatch.setattr(loop, "retain_loss", real)
    code, _ = run_training(tiny_sd1, out, max_train_steps=3, resume=str(saved[0]))
    assert code == 0
    a = load_file(str(ckpt.list_checkpoints(straight / "checkpoints")[-1]))
    b = load_file(str(ckpt.list_checkpoints(out / "checkpoints")[-1]))
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)  # rng.* included


def test_a_fresh_run_sets_an_earlier_runs_checkpoints_aside(tiny_sd1, tmp_path, capsys):
    """Checkpoints left by an earlier run in the output folder are moved aside at the start
    of a fresh run (not --resume): they no longer crowd this run's out of the kept ones, and
    --resume <folder> finds this run's latest."""
    assert run_training(tiny_sd1, tmp_path, max_train_steps=4, save_every_n_steps=2)[0] == 0
    folder = tmp_path / "checkpoints"
    assert [p.name for p in ckpt.list_checkpoints(folder)] == ["step-0000002.safetensors",
                                                               "step-0000004.safetensors"]
    assert run_training(tiny_sd1, tmp_path, max_train_steps=3, save_every_n_steps=1)[0] == 0
    assert "2 checkpoint(s) of an earlier run moved to" in capsys.readouterr().err
    assert [p.name for p in ckpt.list_checkpoints(folder)] == ["step-0000002.safetensors",
                                                               "step-0000003.safetensors"]
    (aside,) = [p for p in folder.iterdir() if p.is_dir()]
    assert sorted(p.name for p in aside.iterdir()) == ["step-0000002.safetensors",
                                                       "step-0000004.safetensors"]
    assert ckpt.find_checkpoint(str(tmp_path), folder).name == "step-0000003.safetensors"


def test_a_second_ctrl_c_stops_at_once_without_saving_the_half_step(tiny_sd1, tmp_path,
                                                                    monkeypatch, capsys):
    real = loop.retain_loss
    calls = {"n": 0}

    def interrupted(run, gen):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt  # what the second Ctrl-C raises, mid-step
        return real(run, gen)

    monkeypatch.setattr(loop, "retain_loss", interrupted)
    code, _ = run_training(tiny_sd1, tmp_path, max_train_steps=3, save_every_n_steps=1)
    assert code == loop.EXIT_INTERRUPTED
    assert "stopped during step 2, not saved; the last checkpoint is" in capsys.readouterr().err
    saved = ckpt.list_checkpoints(tmp_path / "checkpoints")
    assert [p.name for p in saved] == ["step-0000001.safetensors"]  # none for the half step


def test_nan_stops_and_keeps_last_good_checkpoint(tiny_sd1, tmp_path, monkeypatch, capsys):
    real = loop.losses.fields_loss
    calls = {"n": 0}

    def nan_at_3(*args):
        calls["n"] += 1
        value = real(*args)
        return value * float("nan") if calls["n"] == 3 else value

    monkeypatch.setattr(loop.losses, "fields_loss", nan_at_3)
    code, _ = run_training(tiny_sd1, tmp_path, save_every_n_steps=2)
    assert code == loop.EXIT_NAN
    assert "NaN" in capsys.readouterr().err or True
    saved = ckpt.list_checkpoints(tmp_path / "checkpoints")
    assert [p.name for p in saved] == ["step-0000002.safetensors"]
    assert not (tmp_path / "erase.safetensors").exists()
    state = load_file(str(saved[0]))
    assert all(torch.isfinite(v).all() for k, v in state.items() if v.is_floating_point())


def test_nan_in_the_base_models_weights_is_named_not_blamed_on_the_learning_rate(
        tiny_sd1, tmp_path, capsys):
    cfg = inline_cfg(tiny_sd1, tmp_path, max_train_steps=2)
    session = loop.prepare(cfg, quiet=True)
    unet = session.backend.unet
    name, weight = next((n, p) for n, p in unet.named_parameters()
                        if n.endswith("attn2.to_k.weight"))
    with torch.no_grad():
        weight[0, 0] = float("nan")
    assert loop.train(session, progress=False) == loop.EXIT_NAN
    err = capsys.readouterr().err
    assert f"UNet2DConditionModel.{name}" in err and "the checkpoint is damaged" in err
    assert "--learning_rate" not in err


def test_nan_message_names_checkpoint(tiny_sd1, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(loop.losses, "retention_loss", lambda a, b: torch.tensor(float("nan")))
    code, _ = run_training(tiny_sd1, tmp_path, max_train_steps=2)
    assert code == loop.EXIT_NAN
    err = capsys.readouterr().err
    assert "retention loss is nan at step 1" in err and "no checkpoint was saved yet" in err


@pytest.mark.parametrize("over", [
    {"mode": "direct"},
    {"variant": "shared", "latent_cache": 1},
    {"train_batch_size": 1, "network_dim": 2, "target_preset": "xattn_all"},
    {"variant": "shared", "mode": "direct", "target_preset": "attn_ff"},
])
def test_modes_variants_and_options_train(tiny_sd1, tmp_path, over):
    code, session = run_training(tiny_sd1, tmp_path, max_train_steps=2, **over)
    assert code == 0
    meta = load_hypernet(tmp_path / "erase.safetensors").meta
    for key, value in over.items():
        assert meta.training[key] == value
    assert session.log[-1]["delta_target"] > 0


@pytest.mark.parametrize("anchor", ["", "cat"])
def test_latent_cache_holds_the_frozen_models_predictions(tiny_sd1, tmp_path, anchor):
    cfg = inline_cfg(tiny_sd1, tmp_path, latent_cache=1)
    cfg.concept_entries = [{"target": "dog", "anchor": anchor, "templates": ["a {}"]}]
    session = loop.prepare(cfg, quiet=True)
    cache = loop.build_cache(session)
    assert len(cache["t"]) == cfg.ddim_steps  # one prompt x one trajectory x every DDIM step
    assert len(set(cache["t"].tolist())) == cfg.ddim_steps
    b = session.backend
    for row in (0, cfg.ddim_steps - 1):
        z, t = cache["z"][row:row + 1], cache["t"][row:row + 1]
        e_a = b.predict(z, t, session.cond_a.index([0]))
        e_p = b.predict(z, t, session.cond_t.index([0]))
        assert torch.allclose(cache["e_a"][row:row + 1], e_a, atol=1e-5)
        assert torch.allclose(cache["e_p"][row:row + 1], e_p, atol=1e-5)


@pytest.mark.parametrize("schedule, warmup, at, factor", [
    ("constant", 0, 7, 1.0), ("cosine", 0, 5, 0.5), ("cosine", 0, 10, 0.0),
    ("linear", 2, 1, 0.5), ("linear", 2, 6, 0.5), ("constant_with_warmup", 4, 2, 0.5)])
def test_lr_schedule_of_both_optimisers(schedule, warmup, at, factor):
    cfg = resolve({"pretrained_model_name_or_path": "toy", "lr_scheduler": schedule,
                   "lr_warmup_steps": warmup, "max_train_steps": 10, "learning_rate": 1e-3,
                   "retain_learning_rate": 1e-4})
    p = torch.nn.Parameter(torch.zeros(1))
    optimisers = {"remove": torch.optim.Adam([p], lr=5.0), "retain": torch.optim.Adam([p], lr=5.0)}
    loop.lr_schedules(cfg, optimisers, step=at)
    assert optimisers["remove"].param_groups[0]["lr"] == pytest.approx(1e-3 * factor)
    assert optimisers["retain"].param_groups[0]["lr"] == pytest.approx(1e-4 * factor)


def test_unknown_lr_schedule_is_refused():
    from unhype.errors import UnHypeError

    with pytest.raises(UnHypeError, match="lr_scheduler"):
        resolve({"pretrained_model_name_or_path": "toy", "lr_scheduler": "adafactor"})
    with pytest.raises(UnHypeError, match="constant has no warm-up .*constant_with_warmup"):
        resolve({"pretrained_model_name_or_path": "toy", "lr_warmup_steps": 10})
    for bad in ({"lr_scheduler_num_cycles": 0}, {"lr_scheduler_power": 0.0}):
        with pytest.raises(UnHypeError, match=list(bad)[0]):
            resolve({"pretrained_model_name_or_path": "toy", **bad})


@pytest.mark.parametrize("schedule, option, at, factor", [
    ("cosine_with_restarts", {"lr_scheduler_num_cycles": 2}, 5, 1.0),  # the second cycle's top
    ("cosine_with_restarts", {"lr_scheduler_num_cycles": 2}, 2, 0.5 * (1 + math.cos(0.4 * math.pi))),
    ("cosine_with_restarts", {}, 5, 0.5),
    ("polynomial", {"lr_scheduler_power": 2.0}, 5, 0.25), ("polynomial", {}, 5, 0.5)])
def test_lr_schedule_cycles_and_power(schedule, option, at, factor):
    cfg = resolve({"pretrained_model_name_or_path": "toy", "lr_scheduler": schedule,
                   "max_train_steps": 10, "learning_rate": 1e-3, **option})
    p = torch.nn.Parameter(torch.zeros(1))
    optimisers = {"remove": torch.optim.Adam([p], lr=5.0), "retain": torch.optim.Adam([p], lr=5.0)}
    loop.lr_schedules(cfg, optimisers, step=at)
    end = 1e-7 if schedule == "polynomial" else 0.0  # diffusers' polynomial ends at lr_end
    assert optimisers["remove"].param_groups[0]["lr"] == pytest.approx((1e-3 - end) * factor + end)


def test_deferred_interrupt_agrees_across_processes_and_ignores_the_launchers_echo(monkeypatch):
    """With several processes: a stop asked for by any process stops every one after the same
    step (the maximum over processes); a second SIGINT within 2 s of the first is the
    launcher's copy of the same Ctrl-C, a later one stops at once."""
    import signal
    from types import SimpleNamespace

    asked_elsewhere = {"flag": 0.0}
    dist = SimpleNamespace(world=2, max=lambda t: torch.maximum(
        t, torch.tensor([asked_elsewhere["flag"]])))
    clock = {"now": 100.0}
    monkeypatch.setattr(loop.time, "monotonic", lambda: clock["now"])
    said = []
    stop = loop.DeferredInterrupt(said.append, dist)
    with stop:
        stop.check()  # nobody asked
        asked_elsewhere["flag"] = 1.0  # the other process got the Ctrl-C first
        with pytest.raises(loop.StopAtStepEnd):
            stop.check()
        asked_elsewhere["flag"] = 0.0
        handler = signal.getsignal(signal.SIGINT)
        handler(signal.SIGINT, None)  # this process's own Ctrl-C: stop after the step
        assert said and stop.requested
        clock["now"] += 0.5
        handler(signal.SIGINT, None)  # the launcher's echo: ignored
        with pytest.raises(loop.StopAtStepEnd):
            stop.check()
        clock["now"] += 5
        with pytest.raises(KeyboardInterrupt):  # a real second Ctrl-C
            handler(signal.SIGINT, None)
    single = loop.DeferredInterrupt(said.append, None)  # one process: no echo to expect
    with single:
        handler = signal.getsignal(signal.SIGINT)
        handler(signal.SIGINT, None)
        with pytest.raises(KeyboardInterrupt):
            handler(signal.SIGINT, None)
