"""Crash-safe writes: a file or a whole directory is written beside its old version, fsynced, and swapped in
by rename, so a reader always finds a complete version (the old or the new one, never a mix). Pure Python.

A file ``f`` (``write_file``):

    1. remove ``f.tmp-*`` left by a killed save
    2. write ``f.tmp-<id>``, fsync it
    3. ``os.replace(f.tmp-<id>, f)`` (atomic on POSIX), fsync the folder

A directory ``d`` (``write_directory``: adapter weights + config, or several adapters, as one unit).
``os.replace`` cannot put a directory over a non-empty one, so the swap takes two renames:

    1. settle what a killed save left (``recover_directory``)
    2. write every file into ``d.tmp-<id>/``, fsync each file and folder
    3. rename ``d.tmp-<id>`` → ``d.new-<id>``   (from here on the new version is known to be complete)
    4. rename ``d`` → ``d.old-<id>``            (when ``d`` exists)
    5. rename ``d.new-<id>`` → ``d``, fsync the parent folder
    6. remove ``d.old-<id>``

What a kill leaves, and what readers (``complete_directory``) and the next save (``recover_directory``) do:

    killed during 2          ``d`` (old) + ``d.tmp-<id>`` (partial)   read ``d``; the next save removes the tmp
    killed between 3 and 4   ``d`` (old) + ``d.new-<id>``             read ``d``; the next save removes d.new
    killed between 4 and 5   ``d.old-<id>`` + ``d.new-<id>``, no ``d``  read ``d.new-<id>`` (the newest complete
                                                                     version); the next save renames it to ``d``
    killed during 6          ``d`` (new) + ``d.old-<id>``             read ``d``; the next save removes d.old

A failed write (``OSError``: a full disk, a quota, permissions) removes its temporaries, leaves the old version
in place, and raises an ``OSError`` with the same errno that names the file, the bytes it needed and the
space that was free.
"""

from __future__ import annotations

import os
import shutil
import time
import warnings
from pathlib import Path
from typing import Mapping, Union

PathLike = Union[str, Path]
TMP, NEW, OLD = ".tmp-", ".new-", ".old-"


def _unique_suffix() -> str:
    return f"{time.time_ns():x}{os.getpid():x}"  # sortable by time: the newest leftover is the last one


def _siblings(path: Path, marker: str) -> list[Path]:
    """``path<marker>*`` beside ``path``, oldest first."""
    if not path.parent.is_dir():
        return []
    prefix = path.name + marker
    return sorted(p for p in path.parent.iterdir() if p.name.startswith(prefix))


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"


def _free_bytes(path: Path) -> str:
    for p in (path, *path.parents):
        if p.exists():
            try:
                return _human(shutil.disk_usage(p).free)
            except OSError:
                break
    return "unknown"


def _write_error(err: OSError, file: Path, needed: int, target: Path) -> OSError:
    reason = err.strerror or str(err)
    new = OSError(
        err.errno,
        f"could not write {file} ({reason}): {_human(needed)} to write, {_free_bytes(file.parent)} free there; "
        f"nothing was replaced, {target} still holds its previous version (if it had one)",
    )
    new.filename = str(file)
    return new


def fsync_directory(path: PathLike) -> None:
    """Make the entries of folder ``path`` (new names, renames) durable. A no-op where folders cannot be opened."""
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


def _write_and_fsync(file: Path, data: bytes) -> None:
    with open(file, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        try:
            path.unlink()
        except FileNotFoundError:
            pass


def write_file(path: PathLike, data: bytes) -> Path:
    """Replace file ``path`` with ``data`` crash-safely (module docstring). Returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    for stale in _siblings(path, TMP):
        _remove(stale)
    tmp = path.with_name(path.name + TMP + _unique_suffix())
    try:
        _write_and_fsync(tmp, data)
        os.replace(tmp, path)
    except OSError as err:
        _remove(tmp)
        raise _write_error(err, tmp, len(data), path) from err
    fsync_directory(path.parent)
    return path


def recover_directory(path: PathLike) -> None:
    """Settle what a killed ``write_directory`` left beside ``path`` (module docstring): remove partial and
    superseded versions; if ``path`` itself is missing, rename the newest complete version back to it."""
    path = Path(path)
    for stale in _siblings(path, TMP):
        _remove(stale)
    new, old = _siblings(path, NEW), _siblings(path, OLD)
    if not path.exists() and (new or old):
        os.rename((new or old)[-1], path)
        fsync_directory(path.parent)
    for stale in _siblings(path, NEW) + _siblings(path, OLD):
        _remove(stale)


def complete_directory(path: PathLike) -> Path:
    """The folder to read for ``path``: ``path`` itself, or, when a save was killed between its two renames,
    the newest complete version beside it (``path.new-*``, else ``path.old-*``), with a warning. Reads only:
    the next save puts it back in place. Raises FileNotFoundError when there is none."""
    path = Path(path)
    if path.is_dir():
        return path
    for candidates in (_siblings(path, NEW), _siblings(path, OLD)):
        if candidates:
            found = candidates[-1]
            warnings.warn(
                f"{path} is missing: a save was interrupted between its renames; reading the complete version "
                f"{found.name} beside it (the next save to {path} puts it back in place)",
                stacklevel=2,
            )
            return found
    raise FileNotFoundError(f"{path} not found")


def write_directory(path: PathLike, files: Mapping[str, bytes]) -> Path:
    """Replace folder ``path`` with exactly ``files`` (relative name → bytes; names may contain ``/``) as one
    unit, crash-safely (module docstring). Returns ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    recover_directory(path)
    suffix = _unique_suffix()
    tmp, new, old = (path.with_name(path.name + marker + suffix) for marker in (TMP, NEW, OLD))
    needed = sum(len(b) for b in files.values())
    file = tmp
    try:
        tmp.mkdir()
        folders = {tmp}
        for name, data in files.items():
            file = tmp / name
            if file.parent not in folders:
                file.parent.mkdir(parents=True, exist_ok=True)
                folders.add(file.parent)
            _write_and_fsync(file, data)
        for folder in sorted(folders, key=lambda p: len(p.parts), reverse=True):
            fsync_directory(folder)
        file = new
        os.rename(tmp, new)
    except OSError as err:
        _remove(tmp)
        raise _write_error(err, file, needed, path) from err
    fsync_directory(path.parent)
    if path.exists():
        os.rename(path, old)
    os.rename(new, path)
    fsync_directory(path.parent)
    _remove(old)
    return path


__all__ = ["complete_directory", "fsync_directory", "recover_directory", "write_directory", "write_file"]
