"""Files that are never half-written: every result, checkpoint and export goes through atomic_write."""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable


def atomic_write(path: Path, write: Callable[[str], object]) -> None:
    """Call write(tmp_path), fsync, then rename over path: a crash leaves the old file (or none) intact."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o644)  # mkstemp (and some writers) create 0600; results are meant to be shared
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_json(path: Path, obj: dict) -> None:
    atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(obj, indent=2) + "\n"))


def write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda tmp: Path(tmp).write_text(text))


def atomic_folder(path: Path, write: Callable[[Path], object],
                  replaceable: Callable[[Path], bool] = lambda p: False) -> None:
    """Call write(tmp_folder), fsync its files, then rename it to path: never a half-written folder at path.

    An existing path is replaced only if it is an empty folder or replaceable(path) is true (then the old one
    is renamed aside, the new one renamed in, the old one removed); otherwise FileExistsError naming it."""
    path = Path(path)
    if path.exists() and not (path.is_dir() and (not any(path.iterdir()) or replaceable(path))):
        raise FileExistsError(f"{path} exists and is not a folder this writer made; remove it or choose another")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    old = None
    try:
        write(tmp)
        for f in sorted(tmp.rglob("*")):
            if f.is_file():
                with open(f, "rb+") as handle:
                    os.fsync(handle.fileno())
        os.chmod(tmp, 0o755)  # mkdtemp makes 0700; results are meant to be shared
        if path.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".old", dir=path.parent))
            os.replace(path, old)  # onto the empty placeholder folder
        try:
            os.replace(tmp, path)
        except OSError:
            if old is not None:  # put the old folder back
                os.replace(old, path)
                old = None
            raise
    finally:
        for leftover in (tmp, old):
            if leftover is not None and leftover.exists():
                shutil.rmtree(leftover, ignore_errors=True)


def ensure_writable(folder: Path, flag: str = "--out") -> Path:
    """Create folder if needed and prove a file can be written there — before any long work starts."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise ValueError(f"{flag} {folder}: exists and is not a folder")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".write-test.", dir=folder)
        os.close(fd)
        os.remove(probe)
    except OSError as e:
        raise ValueError(f"{flag} {folder}: not writable ({e.strerror or e})") from None
    return folder


def remove_stale_temps(folder: Path) -> list[Path]:
    """Remove the hidden .*.tmp files and folders atomic writers left behind when a process was killed."""
    removed = []
    for leftover in Path(folder).glob(".*.tmp"):
        if leftover.is_dir():
            shutil.rmtree(leftover, ignore_errors=True)
        else:
            leftover.unlink(missing_ok=True)
        removed.append(leftover)
    return removed


class FolderLock:
    """An exclusive advisory lock (flock) on folder/.lock, held while one process writes the folder; a second
    writer is refused at once with a clear error. The kernel drops the lock when the process dies."""

    def __init__(self, folder: Path, what: str = "run folder"):
        self.path, self.what, self._fd = Path(folder) / ".lock", what, None

    def __enter__(self) -> "FolderLock":
        import fcntl

        self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self._fd)
            self._fd = None
            raise ValueError(f"{self.path.parent}: another process is writing this {self.what} (locked); wait for it "
                             "or choose another --out") from None
        os.ftruncate(self._fd, 0)
        os.write(self._fd, str(os.getpid()).encode())
        return self

    def __exit__(self, *exc) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing releases the flock
            self._fd = None
