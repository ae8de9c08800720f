"""Crash-safe filesystem writes: a reader (or a rerun after SIGKILL) sees the old file or folder or the
whole new one, never a partial one. Every writer of checkpoints, model folders and run files goes
through these."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator


def fsync_dir(path: Path) -> None:
    """Persist a directory entry change (rename/create) on POSIX; a no-op where directories can't be opened."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def fsync_tree(root: Path) -> None:
    """fsync every file and directory under root (before renaming a freshly written folder into place)."""
    for dirpath, _, files in os.walk(root):
        for name in files:
            with open(os.path.join(dirpath, name), "rb") as f:
                os.fsync(f.fileno())
        fsync_dir(Path(dirpath))


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write text to path so readers see the old file or the whole new one, never a partial one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def _aside(final: Path) -> Path:
    return final.with_name(f".{final.name}.old")


def replace_dir(tmp: Path, final: Path) -> None:
    """Move the complete folder tmp to final (same filesystem). An existing final is renamed aside first and
    deleted only after tmp is in place, so a crash at any point leaves a whole folder under one of the two
    names; `recover_replaced_dirs` puts an aside copy left by a crash back."""
    tmp, final = Path(tmp), Path(final)
    if final.exists():
        old = _aside(final)
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)
    fsync_dir(final.parent)


@contextlib.contextmanager
def staged_dir(final: str | Path, *, shared: bool = True) -> Iterator[Path]:
    """`with staged_dir(final) as tmp:` write a folder's files into tmp (a fresh hidden folder beside final);
    when the block ends without an error, tmp becomes final (replace_dir: readers see the old folder or the
    whole new one); after an error tmp is deleted and final is untouched. shared: make the folder and its
    files world-readable (mkdtemp makes them private; a model folder is meant to be read like any other)."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=final.parent))
    try:
        yield tmp
        if shared:
            tmp.chmod(0o755)
            for f in tmp.iterdir():
                if f.is_file():
                    f.chmod(0o644)
        replace_dir(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def read_json_object(path: str | Path, error: type[Exception]) -> dict:
    """A JSON file that must hold an object; anything else raises `error` naming the file."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise error(f"{path}: invalid JSON: {e}") from None
    if not isinstance(data, dict):
        raise error(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def recover_replaced_dirs(parent: Path) -> None:
    """Finish the replace_dir calls in `parent` that a crash interrupted: an aside copy whose folder is
    missing (the crash fell between the two renames) is moved back, one whose folder exists is deleted.
    Safe to call from several processes at once."""
    for old in Path(parent).glob(".*.old"):
        final = old.with_name(old.name[1:-len(".old")])
        try:
            if final.exists():
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.replace(old, final)
        except FileNotFoundError:  # another process got there first
            pass
