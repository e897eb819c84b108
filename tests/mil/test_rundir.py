"""The one rule for outputs that exist already (`mil.rundir`) and the atomic folder writer (`mil.atomic`)."""

from __future__ import annotations

import json
import os

import pytest

from mil.atomic import atomic_folder, remove_stale_temporaries, write_json
from mil.errors import SettingsMismatchError
from mil.rundir import changed_settings, read_settings, refuse_other_settings


def test_changed_settings_sees_both_sides_and_ignores_how_a_run_ran():
    old = {"lr": 1e-3, "head": "abmil", "mil_version": "0.1", "gone": 1}
    new = {"lr": 1e-4, "head": "abmil", "mil_version": "0.2", "added": 2}
    assert changed_settings(old, new) == ["lr", "added", "gone"]
    assert changed_settings(old, new, ignore=()) == ["lr", "mil_version", "added", "gone"]
    assert changed_settings(new, new) == []


def test_refusal_names_the_first_setting_both_values_and_the_others(tmp_path):
    with pytest.raises(SettingsMismatchError) as e:
        refuse_other_settings(tmp_path, {"lr": 0.001, "seed": 0, "epochs": 3}, {"lr": 0.0001, "seed": 1, "epochs": 3})
    msg = str(e.value)
    assert msg.startswith(f"{tmp_path}: holds a run with a different 'lr' (lr=0.001 there, lr=0.0001 asked for; 'seed' differ too)")
    assert "--overwrite" in msg and "\n" not in msg
    refuse_other_settings(tmp_path, {"lr": 1, "runtime": {"workers": 2}}, {"lr": 1, "runtime": {"workers": 4}})  # not compared


def test_long_values_are_shortened(tmp_path):
    with pytest.raises(SettingsMismatchError, match="…") as e:
        refuse_other_settings(tmp_path, {"train": {"x": "a" * 200}}, {"train": {"x": "b" * 200}})
    assert len(str(e.value)) < 400


@pytest.mark.parametrize("text", ["{", "[1, 2]", '{"other": 1}'])
def test_a_file_not_written_by_the_stage_is_refused_as_such(tmp_path, text):
    p = tmp_path / "config.json"
    p.write_text(text)
    with pytest.raises(SettingsMismatchError, match="not written by `mil train features`"):
        read_settings(p, "`mil train features`", key="settings" if text.startswith('{"') else None)
    write_json(p, {"settings": {"a": 1}})
    assert read_settings(p, "x", key="settings") == {"a": 1} and json.loads(p.read_text()) == {"settings": {"a": 1}}


def test_atomic_folder_replaces_whole_or_not_at_all(tmp_path):
    final = tmp_path / "eval" / "test"
    with atomic_folder(final) as tmp:
        (tmp / "a.txt").write_text("old")
    with pytest.raises(RuntimeError), atomic_folder(final) as tmp:
        (tmp / "a.txt").write_text("new, half-written")
        raise RuntimeError("killed")
    assert (final / "a.txt").read_text() == "old" and os.listdir(final.parent) == ["test"]
    with atomic_folder(final) as tmp:
        (tmp / "b.txt").write_text("new")
    assert sorted(os.listdir(final)) == ["b.txt"]


def test_a_dead_writers_temporary_folder_is_removed(tmp_path):
    stale = tmp_path / ".test.tmp-999999999"  # no such process
    stale.mkdir()
    (stale / "metrics.json").write_text("{")
    assert remove_stale_temporaries(tmp_path) == [stale] and not stale.exists()
