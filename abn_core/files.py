"""Crash-safe files and directories: a reader never sees half of a file, nor a half-written checkpoint.

A directory counts as complete only when its COMPLETE marker exists; the marker is written (and
synced) after everything else, so a process killed at any moment leaves either the old or the new
complete copy, which :func:`recover_dir` puts back in place on the next start.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Callable

COMPLETE = "COMPLETE"


def fsync_dir(path: Path) -> None:
    """Make renames inside ``path`` durable (a no-op where directories cannot be opened, e.g. Windows)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``path`` through a temporary file in the same directory, synced, then renamed over it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def is_complete(directory: Path) -> bool:
    return (directory / COMPLETE).is_file()


def _siblings(final: Path) -> tuple[Path, Path]:
    return final.with_name(final.name + ".tmp"), final.with_name(final.name + ".old")


def write_dir(final: str | Path, fill: Callable[[Path], None], crash_hook: Callable[[str], None] = lambda _: None) -> None:
    """Replace directory ``final`` by a new one that ``fill(tmp_dir)`` populates, so that at every
    moment a complete copy exists under ``final``, ``final.tmp`` or ``final.old``.

    ``crash_hook(phase)`` is called between the steps (tests kill the process there).
    """
    final = Path(final)
    tmp, old = _siblings(final)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    fill(tmp)
    for file in tmp.iterdir():
        with open(file, "rb") as handle:
            os.fsync(handle.fileno())
    crash_hook("filled")
    atomic_write_text(tmp / COMPLETE, "")
    crash_hook("marked")
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():
        os.replace(final, old)
    crash_hook("moved_old")
    os.replace(tmp, final)
    fsync_dir(final.parent)
    crash_hook("swapped")
    shutil.rmtree(old, ignore_errors=True)


def recover_dir(final: str | Path) -> Path | None:
    """After a crash: put the newest complete copy back at ``final`` and delete incomplete leftovers.

    Returns ``final`` when a complete copy exists afterwards, else None.
    """
    final = Path(final)
    tmp, old = _siblings(final)
    if not is_complete(final):
        source = next((d for d in (tmp, old) if is_complete(d)), None)
        if source is not None:
            shutil.rmtree(final, ignore_errors=True)
            os.replace(source, final)
            fsync_dir(final.parent)
    for leftover in (tmp, old):
        shutil.rmtree(leftover, ignore_errors=True)
    return final if is_complete(final) else None
