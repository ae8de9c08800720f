"""replace_dir: a folder swap that leaves a whole folder under one of two names whatever step a crash hits."""

import os

import pytest

import r1lab.fsutil as fsutil
from r1lab.fsutil import atomic_write_text, replace_dir


def _folder(path, text):
    path.mkdir(parents=True)
    (path / "weights").write_text(text)
    return path


def test_replace_dir_swaps_an_existing_folder(tmp_path):
    final = _folder(tmp_path / "model", "old")
    (final / "stale_file").write_text("x")  # not in the new folder: must not survive the swap
    replace_dir(_folder(tmp_path / ".tmp-model", "new"), final)
    assert sorted(p.name for p in final.iterdir()) == ["weights"]
    assert (final / "weights").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]  # no temp or aside copy left
    replace_dir(_folder(tmp_path / ".tmp-2", "fresh"), tmp_path / "other")  # no previous folder
    assert (tmp_path / "other" / "weights").read_text() == "fresh"


def test_crash_between_the_renames_keeps_the_old_folder_whole(tmp_path, monkeypatch):
    final = _folder(tmp_path / "step_000003", "old")
    tmp = _folder(tmp_path / ".tmp-step_000003-x", "new")
    real_replace, calls = os.replace, []

    def crash_on_second(src, dst):
        calls.append((src, dst))
        if len(calls) == 2:
            raise OSError("killed")
        real_replace(src, dst)

    monkeypatch.setattr(fsutil.os, "replace", crash_on_second)
    with pytest.raises(OSError, match="killed"):
        replace_dir(tmp, final)
    monkeypatch.undo()
    assert not final.exists()
    assert (tmp_path / ".step_000003.old" / "weights").read_text() == "old"
    assert (tmp / "weights").read_text() == "new"


def test_checkpoint_save_cleans_an_aside_copy_left_by_a_crash(tmp_path):
    import torch

    import r1lab.model as rm
    from r1lab.train.checkpoint import load_latest_checkpoint, save_checkpoint

    model = rm.build(rm.preset("tiny-dense"), seed=0)
    opt = torch.optim.AdamW(model.parameters())
    root = tmp_path / "checkpoints"
    _folder(root / ".step_000001.old", "old")
    save_checkpoint(tmp_path, 2, model, opt)
    assert not (root / ".step_000001.old").exists()
    save_checkpoint(tmp_path, 2, model, opt, extra_state={"again": True})  # re-saving a step swaps it in place
    assert load_latest_checkpoint(tmp_path) == (2, root / "step_000002")
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step_000002"]


def test_atomic_write_text_replaces_whole_file(tmp_path):
    path = tmp_path / "sub" / "summary.json"
    atomic_write_text(path, "a" * 1000)
    atomic_write_text(path, "b")
    assert path.read_text() == "b"
    assert [p.name for p in path.parent.iterdir()] == ["summary.json"]
