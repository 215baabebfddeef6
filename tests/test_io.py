import os
import stat

import pytest

from etrm.io import atomic_dir, atomic_write_bytes, atomic_write_json


def test_atomic_dir_renames_on_success_with_ordinary_permissions(tmp_path):
    old = os.umask(0o022)
    try:
        with atomic_dir(tmp_path / "out") as tmp:
            (tmp / "a.txt").write_text("x")
            assert not (tmp_path / "out").exists()
        atomic_write_bytes(tmp_path / "f.bin", b"abc")
    finally:
        os.umask(old)
    assert (tmp_path / "out" / "a.txt").read_text() == "x"
    assert stat.S_IMODE((tmp_path / "out").stat().st_mode) == 0o755
    assert stat.S_IMODE((tmp_path / "f.bin").stat().st_mode) == 0o644
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f.bin", "out"]


def test_atomic_dir_leaves_nothing_on_failure(tmp_path):
    with pytest.raises(RuntimeError), atomic_dir(tmp_path / "out") as tmp:
        (tmp / "a.txt").write_text("x")
        raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []


def test_atomic_dir_refuses_or_replaces_an_existing_folder(tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "old.txt").write_text("old")
    with pytest.raises(FileExistsError), atomic_dir(tmp_path / "out"):
        pass
    assert (tmp_path / "out" / "old.txt").exists()
    with atomic_dir(tmp_path / "out", overwrite=True) as tmp:
        (tmp / "new.txt").write_text("new")
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["new.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_atomic_write_json_replaces_whole_file(tmp_path):
    atomic_write_json(tmp_path / "x.json", {"a": 1})
    atomic_write_json(tmp_path / "x.json", {"b": 2})
    assert (tmp_path / "x.json").read_text() == '{\n "b": 2\n}\n'
    assert [p.name for p in tmp_path.iterdir()] == ["x.json"]
