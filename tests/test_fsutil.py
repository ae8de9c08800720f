"""replace_dir: a folder swap that leaves a whole folder under one of two names whatever step a crash hits."""

import os
from pathlib import Path

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


def test_checkpoint_put_back_after_a_crash_between_the_renames(tmp_path, monkeypatch):
    """Re-saving step 1 (after a resume) crashes between replace_dir's renames: the run's newest checkpoint
    exists only as the aside copy. Resuming must find it, not fall back to an older step."""
    import torch

    import r1lab.model as rm
    from r1lab.train.checkpoint import load_latest_checkpoint, save_checkpoint

    model = rm.build(rm.preset("tiny-dense"), seed=0)
    opt = torch.optim.AdamW(model.parameters())
    root = tmp_path / "checkpoints"
    save_checkpoint(tmp_path, 0, model, opt)
    save_checkpoint(tmp_path, 1, model, opt, extra_state={"first": True})
    real_replace = os.replace

    def crash_moving_new_in(src, dst):
        if Path(src).name.startswith(".tmp-step_000001"):
            raise OSError("killed")
        real_replace(src, dst)

    monkeypatch.setattr(fsutil.os, "replace", crash_moving_new_in)
    with pytest.raises(OSError, match="killed"):
        save_checkpoint(tmp_path, 1, model, opt, extra_state={"first": False})
    monkeypatch.undo()
    assert not (root / "step_000001").exists() and (root / ".step_000001.old").is_dir()

    assert load_latest_checkpoint(tmp_path) == (1, root / "step_000001")
    state = torch.load(root / "step_000001" / "trainer_state.pt", weights_only=False)
    assert state["extra"] == {"first": True}
    save_checkpoint(tmp_path, 2, model, opt)  # and the next save clears what the crash left
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step_000000", "step_000001", "step_000002"]


def test_recover_replaced_dirs_drops_an_aside_copy_whose_folder_exists(tmp_path):
    _folder(tmp_path / "model", "new")
    _folder(tmp_path / ".model.old", "old")
    fsutil.recover_replaced_dirs(tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == ["model"]
    assert (tmp_path / "model" / "weights").read_text() == "new"


def test_atomic_write_text_replaces_whole_file(tmp_path):
    path = tmp_path / "sub" / "summary.json"
    atomic_write_text(path, "a" * 1000)
    atomic_write_text(path, "b")
    assert path.read_text() == "b"
    assert [p.name for p in path.parent.iterdir()] == ["summary.json"]
