"""The output folder of a server: every run as a SampleSet (PNGs, grid, JSON sidecar, written atomically),
its history, and the one gate through which files are served (nothing outside the folder, no symlink)."""
from __future__ import annotations

import json
import re
import secrets
import time
from pathlib import Path

import torch

from ..images import SampleSet

RUN_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,127}$")  # no dot: no '..', no hidden name, no suffix
IMAGE_FILE = re.compile(r"^[0-9]{4,9}\.png$")
SIDECAR, GRID = "run.json", "grid.png"  # the public names of <run>.json and <run>_grid.png
HISTORY_SCAN = 2000  # newest sidecars looked at by history()


class Gallery:
    """out/<run>/NNNN.png, out/<run>_grid.png and out/<run>.json for every run (images.SampleSet's layout)."""

    def __init__(self, out: Path):
        out = Path(out)
        if out.exists() and not out.is_dir():
            raise ValueError(f"--out {out}: exists and is not a folder")
        out.mkdir(parents=True, exist_ok=True)
        self.root = out.resolve()

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
        """The public record of a run: its sidecar without server paths, plus the URLs of its files."""
        path = self.file(run, SIDECAR)
        if path is None:
            return None
        try:
            info = json.loads(path.read_text())
        except (OSError, ValueError):
            return None
        if not isinstance(info, dict) or not isinstance(info.get("count"), int):
            return None
        info = {k: v for k, v in info.items() if k not in ("images", "grid")}
        return {**info, "run": run, "mtime": path.stat().st_mtime, **self.urls(run, info["count"])}

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
