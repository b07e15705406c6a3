"""unhype/atomic.py: the target holds the old or the complete new content, never a temp file."""

import pytest

from unhype.atomic import atomic_path, atomic_write_bytes, atomic_write_text


def test_writes_replace_the_target_and_leave_only_it(tmp_path):
    path = tmp_path / "report.md"
    atomic_write_text(path, "first\n")
    atomic_write_text(path, "second é\n")
    assert path.read_text(encoding="utf-8") == "second é\n"
    atomic_write_bytes(tmp_path / "blob.bin", b"\x00\x01")
    assert (tmp_path / "blob.bin").read_bytes() == b"\x00\x01"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["blob.bin", "report.md"]


def test_failed_write_keeps_the_old_content_and_no_temp_file(tmp_path):
    path = tmp_path / "weights.safetensors"
    path.write_bytes(b"old")
    with pytest.raises(RuntimeError, match="disk full"):
        with atomic_path(path) as tmp:
            assert tmp.parent == tmp_path and tmp != path and not tmp.exists()
            tmp.write_bytes(b"half a fi")  # the writer got this far, then failed
            raise RuntimeError("disk full")
    assert path.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["weights.safetensors"]


def test_failed_text_write_before_any_byte_leaves_no_target(tmp_path):
    path = tmp_path / "new.json"
    with pytest.raises(TypeError):
        atomic_write_text(path, None)
    assert not list(tmp_path.iterdir())


def test_temp_paths_are_unique_per_write(tmp_path):
    path = tmp_path / "x.txt"
    with atomic_path(path) as a, atomic_path(path) as b:
        assert a != b
        a.write_text("a")
        b.write_text("b")
    assert path.read_text() == "a"  # the outer block finished last
    assert [p.name for p in tmp_path.iterdir()] == ["x.txt"]


def test_written_files_get_the_usual_mode_and_a_rewrite_keeps_the_old_one(tmp_path):
    import os

    import torch

    from unhype.fileformat import atomic_save_safetensors

    path = tmp_path / "lora.safetensors"
    old = os.umask(0o027)
    try:
        atomic_save_safetensors({"w": torch.ones(2)}, path, {})  # safetensors makes it 0600
        assert path.stat().st_mode & 0o777 == 0o640
        os.chmod(path, 0o604)
        atomic_save_safetensors({"w": torch.zeros(2)}, path, {})
        assert path.stat().st_mode & 0o777 == 0o604
        atomic_write_text(tmp_path / "notes.md", "x")
        assert (tmp_path / "notes.md").stat().st_mode & 0o777 == 0o640
    finally:
        os.umask(old)


def test_check_output_refuses_folders_inputs_and_unwritable_places(tmp_path):
    from unhype.atomic import check_output, check_output_folder
    from unhype.errors import UnHypeError

    source = tmp_path / "in.safetensors"
    source.write_bytes(b"x")
    with pytest.raises(UnHypeError, match="is a folder"):
        check_output(tmp_path)
    (tmp_path / "link.safetensors").symlink_to(source)
    with pytest.raises(UnHypeError, match="is an input"):
        check_output(tmp_path / "link.safetensors", [None, source])
    with pytest.raises(UnHypeError, match="does not exist"):
        check_output(tmp_path / "missing" / "out.safetensors")
    with pytest.raises(UnHypeError, match="cannot write"):
        check_output("/proc/out.safetensors")
    assert check_output(tmp_path / "out.safetensors") == tmp_path / "out.safetensors"
    with pytest.raises(UnHypeError, match="is a file, not a folder"):
        check_output_folder(source)
    with pytest.raises(UnHypeError, match="is a file, not a folder"):
        check_output_folder(source / "deeper")
    check_output_folder(tmp_path / "new" / "folder")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.safetensors", "link.safetensors"]


def test_a_safetensors_write_with_inf_is_refused(tmp_path):
    import torch

    from unhype.errors import UnHypeError
    from unhype.fileformat import atomic_save_safetensors

    with pytest.raises(UnHypeError, match="NaN/Inf"):
        atomic_save_safetensors({"w": torch.tensor([1.0, float("inf")])},
                                tmp_path / "x.safetensors", {})
    assert not list(tmp_path.iterdir())


def test_a_symlinked_target_updates_the_file_it_points_to(tmp_path):
    # model folders shared between UIs by symlinks: the link stays a link, the file it names
    # gets the new content (before, the link was replaced by a regular file of its own)
    real = tmp_path / "shared" / "erase_cat.safetensors"
    real.parent.mkdir()
    real.write_bytes(b"old")
    link = tmp_path / "erase_cat.safetensors"
    link.symlink_to(real)
    atomic_write_bytes(link, b"new")
    assert link.is_symlink() and real.read_bytes() == b"new"
    assert sorted(p.name for p in real.parent.iterdir()) == ["erase_cat.safetensors"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["erase_cat.safetensors", "shared"]
