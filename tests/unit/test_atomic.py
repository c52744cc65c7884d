"""rl_lora/atomic.py: a directory or file is the old version or the new one, never half of one."""

import pytest

from rl_lora import atomic


def _fill(files: dict):
    def fill(tmp):
        for name, text in files.items():
            (tmp / name).parent.mkdir(parents=True, exist_ok=True)
            (tmp / name).write_text(text)
    return fill


def test_write_dir_replaces_an_existing_directory_whole(tmp_path):
    target = tmp_path / "out" / "adapter"
    atomic.write_dir(target, _fill({"a.txt": "1", "sub/b.txt": "2"}))
    atomic.write_dir(target, _fill({"c.txt": "3"}), durable=False)
    assert sorted(p.relative_to(target).as_posix() for p in target.rglob("*")) == ["c.txt"]  # no file of the old
    assert sorted(p.name for p in target.parent.iterdir()) == ["adapter"]  # no temp dir, no old copy left


def test_a_failed_fill_leaves_the_old_directory_and_no_temp(tmp_path):
    target = tmp_path / "model"
    atomic.write_dir(target, _fill({"config.json": "old"}))

    def broken(tmp):
        (tmp / "config.json").write_text("half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic.write_dir(target, broken, prefix=".convert-")
    assert (target / "config.json").read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["model"]


def test_write_text_replaces_the_file_through_a_hidden_temp(tmp_path):
    path = tmp_path / "latest"
    atomic.write_text(path, "step_000001")
    atomic.write_text(path, "step_000002")
    assert path.read_text() == "step_000002" and [p.name for p in tmp_path.iterdir()] == ["latest"]
