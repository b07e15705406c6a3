"""What a run writes and how it fails to: disk errors at the end, periodic results, names."""

import errno
import os

import pytest
import torch
from safetensors import SafetensorError

from tests.trainer.conftest import inline_cfg
from unhype.errors import UnHypeError
from unhype.fileformat import load_hypernet
from unhype.trainer import checkpoint as ckpt
from unhype.trainer import loop


def run_training(model, out, **over):
    cfg = inline_cfg(model, out, **over)
    session = loop.prepare(cfg, quiet=True)
    return loop.train(session, progress=False), session


def disk_full(*args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def test_a_full_disk_at_the_final_checkpoint_keeps_the_result(tiny_sd1, tmp_path, monkeypatch):
    monkeypatch.setattr(ckpt, "save_checkpoint", disk_full)
    with pytest.raises(UnHypeError) as err:
        run_training(tiny_sd1, tmp_path, max_train_steps=2)
    message = str(err.value)
    assert "step-0000002.safetensors" in message and "No space left on device" in message
    assert "erase.safetensors was written" in message
    assert load_hypernet(tmp_path / "erase.safetensors").meta.training["steps_done"] == 2


def test_a_full_disk_at_the_result_names_it_and_the_last_checkpoint(tiny_sd1, tmp_path,
                                                                     monkeypatch):
    real = loop.save_hypernet

    def full(path, *args, **kwargs):  # the step results fit, the final one does not
        if path.name == "erase.safetensors":
            raise SafetensorError("Error while serializing: No space left on device")
        return real(path, *args, **kwargs)

    monkeypatch.setattr(loop, "save_hypernet", full)
    with pytest.raises(UnHypeError) as err:
        run_training(tiny_sd1, tmp_path, max_train_steps=4, save_every_n_steps=2)
    message = str(err.value)
    assert "the result" in message and "erase.safetensors" in message
    assert "No space left on device" in message and "step-0000002.safetensors" in message
    assert not (tmp_path / "erase.safetensors").exists()


def test_a_full_disk_at_a_periodic_checkpoint_is_named(tiny_sd1, tmp_path, monkeypatch):
    monkeypatch.setattr(ckpt, "save_checkpoint", disk_full)
    with pytest.raises(UnHypeError, match=r"step-0000002\.safetensors \(No space left on device\)"
                                          r"; no checkpoint was saved"):
        run_training(tiny_sd1, tmp_path, max_train_steps=4, save_every_n_steps=2)


def test_resume_takes_the_same_model_however_its_path_is_written(tiny_sd1, tmp_path,
                                                                  monkeypatch, capsys):
    assert run_training(tiny_sd1, tmp_path, max_train_steps=2)[0] == 0
    monkeypatch.chdir(tiny_sd1.parent)
    for steps, spelling in ((3, f"./{tiny_sd1.name}"), (4, f"{tiny_sd1}/")):
        code, session = run_training(spelling, tmp_path, max_train_steps=steps,
                                     resume=str(tmp_path / "checkpoints"))
        assert code == 0 and session.start_step == steps - 1
        assert session.log[-1]["step"] == steps


def test_resume_with_another_batch_size_goes_on_and_says_so(tiny_sd1, tmp_path, capsys):
    assert run_training(tiny_sd1, tmp_path, max_train_steps=2)[0] == 0
    cfg = inline_cfg(tiny_sd1, tmp_path, max_train_steps=3, train_batch_size=3,
                     resume=str(tmp_path / "checkpoints"))
    session = loop.prepare(cfg, quiet=True)
    assert session.start_step == 2 and loop.train(session, progress=False) == 0
    assert "train_batch_size 2 -> 3" in capsys.readouterr().err


def test_resume_names_the_options_that_differ(tiny_sd1, tmp_path):
    assert run_training(tiny_sd1, tmp_path, max_train_steps=2)[0] == 0
    cfg = inline_cfg(tiny_sd1, tmp_path, max_train_steps=3, network_dim=2, mode="direct",
                     resume=str(tmp_path / "checkpoints"))
    with pytest.raises(UnHypeError) as err:
        loop.prepare(cfg, quiet=True)
    message = str(err.value)
    assert "network_dim (1 in the checkpoint, 2 now)" in message
    assert "mode (fields in the checkpoint, direct now)" in message
    assert "seed" not in message and "concepts" not in message


def test_a_checkpoint_from_before_the_inputs_were_recorded_still_resumes(tiny_sd1, tmp_path):
    """Older checkpoints hold only the digest, which covered the model path as typed and the
    batch size."""
    from safetensors.torch import load_file, save_file

    assert run_training(tiny_sd1, tmp_path, max_train_steps=2)[0] == 0
    path = ckpt.list_checkpoints(tmp_path / "checkpoints")[-1]
    metadata, _ = ckpt.read_header(path)
    inputs = loop.prepare(inline_cfg(tiny_sd1, tmp_path), quiet=True).fingerprint
    del metadata["fingerprint_inputs"]
    metadata["fingerprint"] = ckpt.fingerprint({**inputs, "model": str(tiny_sd1), "batch": 2})
    save_file(load_file(str(path)), str(path), metadata=metadata)
    code, session = run_training(tiny_sd1, tmp_path, max_train_steps=3,
                                 resume=str(tmp_path / "checkpoints"))
    assert code == 0 and session.start_step == 2
    metadata["fingerprint"] = "0" * 16  # another run's: refused, without a list of options
    save_file(load_file(str(path)), str(path), metadata=metadata)
    with pytest.raises(UnHypeError, match="another model, targets"):
        run_training(tiny_sd1, tmp_path, max_train_steps=4, resume=str(path))


def test_periodic_saves_write_usable_hypernetworks_pruned_with_the_checkpoints(tiny_sd1,
                                                                               tmp_path):
    code, _ = run_training(tiny_sd1, tmp_path, max_train_steps=6, save_every_n_steps=2,
                           save_last_n_checkpoints=2)
    assert code == 0
    assert [p.name for p in ckpt.list_checkpoints(tmp_path / "checkpoints")] == \
        ["step-0000004.safetensors", "step-0000006.safetensors"]
    steps = sorted(p.name for p in tmp_path.glob("erase-step*.safetensors"))
    assert steps == ["erase-step00000004.safetensors"]  # step 2's went with its checkpoint
    at_4 = load_hypernet(tmp_path / steps[0])
    final = load_hypernet(tmp_path / "erase.safetensors")
    assert at_4.meta.training["steps_done"] == 4 and final.meta.training["steps_done"] == 6
    assert at_4.meta.concepts == final.meta.concepts
    assert at_4.meta.config.to_dict() == final.meta.config.to_dict()
    changed = [k for k, v in at_4.hypernet.state_dict().items()
               if not (v == final.hypernet.state_dict()[k]).all()]
    assert changed  # the step's own weights, not the final ones


def test_save_last_n_checkpoints_zero_keeps_all_and_negative_is_refused(tiny_sd1, tmp_path):
    from unhype.trainer.config import resolve

    with pytest.raises(UnHypeError, match="save_last_n_checkpoints must be >= 0, got -1"):
        resolve({"pretrained_model_name_or_path": "toy", "save_last_n_checkpoints": -1})
    assert run_training(tiny_sd1, tmp_path, max_train_steps=3, save_every_n_steps=1,
                        save_last_n_checkpoints=0)[0] == 0
    assert len(ckpt.list_checkpoints(tmp_path / "checkpoints")) == 3
    assert len(list(tmp_path.glob("erase-step*.safetensors"))) == 2


def test_the_result_records_no_local_folders(tiny_sd1, tmp_path):
    retain = tmp_path / "mine.txt"
    retain.write_text("a photo of a house\na bowl of soup\n")
    out = tmp_path / "deep" / "out"
    code, _ = run_training(tiny_sd1, out, max_train_steps=1, logging_dir=str(tmp_path / "logs"),
                           retain_prompts=f"{retain},cifar100")
    assert code == 0
    training = load_hypernet(out / "erase.safetensors").meta.training
    assert training["output_dir"] == "out" and training["logging_dir"] == "logs"
    assert training["pretrained_model_name_or_path"] == tiny_sd1.name
    assert training["retain_prompts"] == "mine.txt,cifar100"
    header = (out / "erase.safetensors").read_bytes()[:200_000]
    assert str(tmp_path).encode() not in header
    assert loop.public_options({"pretrained_model_name_or_path": "org/model",
                                "concepts": "dog,cat"}) == \
        {"pretrained_model_name_or_path": "org/model", "concepts": "dog,cat"}


def test_runs_of_one_seed_save_the_same_global_rng_state(tiny_sd1, tmp_path):
    from safetensors.torch import load_file

    states = []
    for name in ("a", "b"):
        torch.rand(7)  # whatever ran before in this process
        assert run_training(tiny_sd1, tmp_path / name, max_train_steps=1)[0] == 0
        states.append(load_file(str(ckpt.list_checkpoints(tmp_path / name / "checkpoints")[-1])))
    assert torch.equal(states[0]["rng.torch"], states[1]["rng.torch"])
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])


def test_resuming_a_finished_checkpoint_stops_before_loading_anything(tiny_sd1, tmp_path,
                                                                       monkeypatch):
    assert run_training(tiny_sd1, tmp_path, max_train_steps=2)[0] == 0
    from unhype.trainer import backends

    def no_model(cfg):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(backends, "load_backend", no_model)
    for steps in (2, 1):
        with pytest.raises(UnHypeError, match=f"at step 2, already at --max_train_steps {steps}"):
            run_training(tiny_sd1, tmp_path, max_train_steps=steps,
                         resume=str(tmp_path / "checkpoints"))


def test_kohya_sample_prompt_options_are_used_or_named(tiny_sd1, tmp_path, capsys):
    from unhype.trainer.samples import SamplePrompt, generate, parse_prompt

    ignored = set()
    assert parse_prompt("a red circle --n blurry, dark --w 512 --h 512 --d 42 --s 20 --l 7.5",
                        ignored) == SamplePrompt("a red circle", "blurry, dark", 42, 20, 7.5)
    assert ignored == {"--w", "--h"}
    with pytest.raises(UnHypeError, match="--d needs a number"):
        parse_prompt("a dog --d x")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a dog --d 3 --w 64 --ss euler\na cat --s 2\na dog --h 64\n")
    code, run = run_training(tiny_sd1, tmp_path / "out", max_train_steps=1,
                             sample_prompts=str(prompts))
    assert code == 0
    err = capsys.readouterr().err
    assert err.count("ignored per-prompt option(s) --h, --ss, --w") == 1
    rows = (tmp_path / "out" / "samples" / "custom-prompts.txt").read_text().splitlines()[1:]
    assert rows == ["a dog", "a cat", "a dog"]
    same = generate(run, [SamplePrompt("a dog", seed=3, steps=2)], 1, 5, True, 7)
    assert torch.equal(same, generate(run, [SamplePrompt("a dog")], 1, 2, True, 3))
    mixed = generate(run, [SamplePrompt("a dog", seed=3), SamplePrompt("a cat")], 1, 2, False, 7)
    assert torch.equal(mixed[:1], generate(run, [SamplePrompt("a dog")], 1, 2, False, 3))
    assert torch.equal(mixed[1:], generate(run, [SamplePrompt("a cat")], 1, 2, False, 7))
    negative = generate(run, [SamplePrompt("a dog", "a cat", scale=7.5)], 1, 2, False, 7)
    assert not torch.equal(negative, generate(run, [SamplePrompt("a dog", scale=7.5)], 1, 2,
                                              False, 7))
