"""What a run writes and how it fails to: disk errors at the end, periodic results, names."""

import errno
import os

import pytest
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
    def full(*args, **kwargs):
        raise SafetensorError("Error while serializing: No space left on device (os error 28)")

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
