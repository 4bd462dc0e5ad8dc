"""One atomic writer for checkpoints, states and command files: complete at the name or absent."""

from __future__ import annotations

import os
import stat

import pytest

import engine.io.atomic as atomic
from engine.run.channel import CONTROL_DIRNAME, send_command
from engine.checkpoint import cleanup_temp_files
from engine.state import cleanup_temp_dirs


def test_a_command_file_goes_through_a_temp_name_the_leftover_cleanup_removes(tmp_path, monkeypatch):
    (tmp_path / CONTROL_DIRNAME).mkdir()
    renames = []
    real_replace = os.replace

    monkeypatch.setattr(atomic.os, "replace", lambda src, dst: renames.append((src, dst)) or real_replace(src, dst))
    final = send_command(tmp_path, "pause", sender="test")
    [(src, dst)] = renames
    assert dst == final and final.name.endswith(".json")
    assert atomic.is_temp_name(os.path.basename(src))
    assert stat.S_IMODE(final.stat().st_mode) & 0o077 == 0        # only the owner reads commands
    leftover = final.parent / os.path.basename(src)
    leftover.write_bytes(b"{}")
    assert cleanup_temp_files(final.parent) == [leftover]
    assert sorted(p.name for p in final.parent.iterdir()) == [final.name]


def test_a_folder_whose_filling_fails_leaves_the_old_one_and_no_temp(tmp_path):
    dest = tmp_path / "run-state"
    dest.mkdir()
    (dest / "progress.json").write_text("old")

    def fill(tmp):
        (tmp / "progress.json").write_text("new")
        raise OSError(28, os.strerror(28))

    with pytest.raises(OSError):
        atomic.replace_folder(dest, fill)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run-state"]
    assert (dest / "progress.json").read_text() == "old"


def test_a_replaced_folder_moved_aside_by_a_killed_run_is_put_back(tmp_path):
    dest = tmp_path / "run-state"
    aside = tmp_path / atomic.aside_name(dest.name)
    aside.mkdir()
    (aside / "progress.json").write_text("{}")
    partial = tmp_path / atomic.temp_name(dest.name)
    partial.mkdir()
    assert cleanup_temp_dirs(tmp_path) == [partial]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run-state"]
