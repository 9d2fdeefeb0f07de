"""`moshi_ttt.utils`: atomic writes leave the old content or the whole new one, through unpredictable
temporaries that never follow a planted link, with the folder fsynced after the rename; field errors survive
pickling (worker processes send them back)."""

from __future__ import annotations

import os
import pickle

import pytest

from moshi_ttt.utils import io
from moshi_ttt.utils.io import atomic_dir, atomic_write, atomic_write_parts
from moshi_ttt.utils.validate import Checks, InvalidField


def test_atomic_write_replaces_whole_or_not_at_all(tmp_path):
    path = tmp_path / "f.txt"
    path.write_text("old")

    def half(tmp):
        tmp.write_text("ne")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write(path, half)
    assert path.read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["f.txt"]
    assert atomic_write(path, lambda tmp: tmp.write_text("new")) == path
    assert path.read_text() == "new" and sorted(p.name for p in tmp_path.iterdir()) == ["f.txt"]


def test_temporaries_are_unpredictable_and_never_follow_a_planted_link(tmp_path, monkeypatch):
    path, victim = tmp_path / "m.mem", tmp_path / "victim"
    victim.write_bytes(b"precious")
    names = iter(["aaaa", "bbbb"])
    monkeypatch.setattr(io.secrets, "token_hex", lambda n: next(names))
    (tmp_path / "m.mem.aaaa.tmp").symlink_to(victim)  # planted at the name the writer picks first
    st = atomic_write_parts(path, [b"new ", b"content"], mode=0o600, mtime=123.0)
    assert victim.read_bytes() == b"precious" and path.read_bytes() == b"new content"
    assert (path.stat().st_mode & 0o777, path.stat().st_mtime, st.st_ino) == (0o600, 123.0, path.stat().st_ino)
    monkeypatch.undo()
    names = {io.temporary(tmp_path / "x")[0].name for _ in range(20)}
    assert len(names) == 20  # not `<name>.<pid>.<thread>.tmp`


def test_the_folder_is_fsynced_after_the_rename(tmp_path, monkeypatch):
    synced = []
    real = os.fsync

    def spy(fd):
        synced.append(os.path.isdir(f"/proc/self/fd/{fd}") and os.readlink(f"/proc/self/fd/{fd}"))
        real(fd)

    monkeypatch.setattr(os, "fsync", spy)
    atomic_write(tmp_path / "a", lambda tmp: tmp.write_text("x"))
    atomic_write_parts(tmp_path / "b", [b"y"])
    assert synced.count(str(tmp_path)) == 2, synced


def test_atomic_dir_publishes_only_a_finished_folder(tmp_path):
    final = tmp_path / "sub" / "repo"
    with pytest.raises(RuntimeError):
        with atomic_dir(final) as tmp:
            (tmp / "a").write_text("1")
            raise RuntimeError("build failed")
    assert not final.exists() and list(final.parent.iterdir()) == []
    with atomic_dir(final) as tmp:
        (tmp / "a").write_text("mine")
        final.mkdir()
        (final / "a").write_text("theirs")  # another process finished first
    assert (final / "a").read_text() == "theirs" and list(final.parent.iterdir()) == [final]


def test_field_errors_name_the_field_and_pickle():
    e = Checks("demo config").error("x.y", [1], "must be a number")
    assert isinstance(e, ValueError) and str(e) == "invalid demo config: x.y=[1]: must be a number"
    again = pickle.loads(pickle.dumps(e))
    assert type(again) is InvalidField and str(again) == str(e) and again.field == "x.y"
