"""The output folder of a server: every run as a SampleSet (PNGs, grid, JSON sidecar, written atomically),
its history, and the one gate through which files are served (nothing outside the folder, no symlink)."""
from __future__ import annotations

import json
import os
import re
import secrets
import shlex
import shutil
import time
from pathlib import Path

import torch

from ..images import SampleSet

RUN_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,127}$")  # no dot: no '..', no hidden name, no suffix
IMAGE_FILE = re.compile(r"^[0-9]{4,9}\.png$")
SIDECAR, GRID = "run.json", "grid.png"  # the public names of <run>.json and <run>_grid.png
HISTORY_SCAN = 2000  # newest sidecars looked at by history()
# SampleSet's hidden folder of a served run in progress: .<new_name()>.<mkdtemp's 8 characters>.partial
PARTIAL = re.compile(r"^\.[0-9]{8}-[0-9]{6}-[0-9a-f]{6}\.[a-z0-9_]{8}\.partial$")


class Gallery:
    """out/<run>/NNNN.png, out/<run>_grid.png and out/<run>.json for every run (images.SampleSet's layout)."""

    def __init__(self, out: Path):
        out = Path(out)
        if out.exists() and not out.is_dir():
            raise ValueError(f"--out {out}: exists and is not a folder")
        out.mkdir(parents=True, exist_ok=True)
        self.root = out.resolve()
        self._lock = _Lock(self.root)  # held until close(): servers sharing a folder never sweep each other
        self.swept = sweep_partials(self.root) if self._lock.exclusive else 0
        self._lock.share()

    def close(self) -> None:
        """Release the folder's lock (the server stops)."""
        self._lock.close()

    def new_name(self) -> str:
        """A fresh run name: the local time and 6 random hex digits (never derived from a job id), unused in the
        folder (the one worker thread is the only writer, so it stays unused until saved)."""
        while True:
            name = f"{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(3)}"
            if not (self.root / f"{name}.json").exists() and not (self.root / name).exists():
                return name

    def save(self, name: str, images: torch.Tensor, info: dict) -> None:
        """Write one run; an exception (or a kill) leaves no new file behind (SampleSet)."""
        with SampleSet(self.root, name) as samples:
            samples.add(images)
            samples.close(info)

    # --- reading ----------------------------------------------------------------------------------------
    def file(self, run: str, file: str) -> Path | None:
        """The file `file` of run `run`, or None when the names are not a run's file, it does not exist, or
        the path leaves the output folder or passes through a symlink."""
        if not isinstance(run, str) or not isinstance(file, str) or not RUN_NAME.match(run):
            return None
        if file == GRID:
            path = self.root / f"{run}_grid.png"
        elif file == SIDECAR:
            path = self.root / f"{run}.json"
        elif IMAGE_FILE.match(file):
            path = self.root / run / file
        else:
            return None
        try:
            real = path.resolve(strict=True)
        except (OSError, RuntimeError):
            return None
        # resolve() follows every link: equal to the plain path means no symlink on the way, inside root
        if real != path or self.root not in real.parents or not real.is_file():
            return None
        return real

    def urls(self, run: str, count: int) -> dict:
        base = f"/api/runs/{run}"
        return {"grid": f"{base}/{GRID}", "sidecar": f"{base}/{SIDECAR}",
                "images": [f"{base}/{i:04d}.png" for i in range(count)]}

    def read(self, run: str) -> dict | None:
        """The public record of a run: its sidecar without server paths (see `public`), plus its files' URLs."""
        path = self.file(run, SIDECAR)
        if path is None:
            return None
        try:
            info = json.loads(path.read_text())
        except (OSError, ValueError):
            return None
        if not isinstance(info, dict) or not isinstance(info.get("count"), int):
            return None
        return {**public(info), "run": run, "mtime": path.stat().st_mtime, **self.urls(run, info["count"])}

    def sidecar(self, run: str) -> dict | None:
        """A run's sidecar as the API serves it (run.json): without server paths."""
        path = self.file(run, SIDECAR)
        try:
            info = json.loads(path.read_text()) if path is not None else None
        except (OSError, ValueError):
            return None
        return public(info) if isinstance(info, dict) else None

    def history(self, limit: int = 50) -> list[dict]:
        """The newest runs first (at most limit), each as `read` gives it; foreign or broken JSON skipped."""
        entries = []
        for p in self.root.glob("*.json"):
            if RUN_NAME.match(p.stem) and p.is_file() and not p.is_symlink():
                try:
                    entries.append((p.stat().st_mtime, p.stem))
                except OSError:
                    continue
        entries.sort(reverse=True)
        out = []
        for _, run in entries[:HISTORY_SCAN]:
            record = self.read(run)
            if record is not None:
                out.append(record)
                if len(out) >= limit:
                    break
        return out


def public(info: dict) -> dict:
    """A sidecar without this machine's paths: no `images`/`grid` paths, the model's source as its file or
    folder name only (in `model_source` and in the `fastdiff sample` line). The file on disk keeps them."""
    info = {k: v for k, v in info.items() if k not in ("images", "grid")}
    source = info.get("model_source")
    if isinstance(source, str) and source:
        name = Path(source).name or source
        info["model_source"] = name
        reproduce = info.get("reproduce")
        if isinstance(reproduce, dict) and isinstance(reproduce.get("cli"), str):
            cli = reproduce["cli"].replace(f" {shlex.quote(source)} ", f" {shlex.quote(name)} ")
            info["reproduce"] = {**reproduce, "cli": cli}
    return info


def sweep_partials(root: Path) -> int:
    """Remove the hidden partial folders a killed server left in root (SampleSet's, named as served runs are,
    holding nothing but NNNN.png files; anything else is left alone). Returns how many were removed."""
    removed = 0
    for path in root.iterdir():
        if not PARTIAL.match(path.name) or path.is_symlink() or not path.is_dir():
            continue
        try:
            if all(f.is_file() and not f.is_symlink() and IMAGE_FILE.match(f.name) for f in path.iterdir()):
                shutil.rmtree(path)
                removed += 1
        except OSError:
            continue
    return removed


class _Lock:
    """An flock on the folder itself (no file is made): exclusive when no other server uses the folder (then the
    partial folders in it are a dead server's), shared while serving. Where flock is missing: never exclusive."""

    def __init__(self, folder: Path):
        self.exclusive, self._fd = False, None
        try:
            import fcntl

            self._fd = os.open(folder, os.O_RDONLY)
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            self.exclusive = True
        except (ImportError, OSError):  # no fcntl (Windows), or another server holds the lock
            pass

    def share(self) -> None:
        if self._fd is not None:
            import fcntl

            fcntl.flock(self._fd, fcntl.LOCK_SH)

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    __del__ = close
