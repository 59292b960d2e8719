"""Atomic writes: whole or absent, with ordinary permissions."""

import os
import stat

import pytest

from foundry.core.files import atomic_dir, atomic_file, write_json


def test_atomic_file_replaces_whole_or_not_at_all(tmp_path):
    target = tmp_path / "a.json"
    write_json(target, {"v": 1})
    with pytest.raises(RuntimeError):
        with atomic_file(target, "w") as handle:
            handle.write("half")
            raise RuntimeError("crash")
    assert target.read_text().strip().startswith("{") and list(tmp_path.iterdir()) == [target]


def test_atomic_dir_appears_complete_with_plain_permissions(tmp_path):
    old = os.umask(0o022)
    try:
        with atomic_dir(tmp_path / "d") as tmp:
            (tmp / "x").write_text("x")
            assert not (tmp_path / "d").exists()
        with atomic_file(tmp_path / "f") as handle:
            handle.write(b"1")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "d").stat().st_mode) == 0o755
    assert stat.S_IMODE((tmp_path / "f").stat().st_mode) == 0o644
    with pytest.raises(RuntimeError):
        with atomic_dir(tmp_path / "e"):
            raise RuntimeError("crash")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d", "f"]
