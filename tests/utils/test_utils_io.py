"""`moshi_ttt.utils`: atomic writes leave the old content or the whole new one, and field errors survive
pickling (worker processes send them back)."""

from __future__ import annotations

import pickle

import pytest

from moshi_ttt.utils.io import atomic_dir, atomic_write
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
