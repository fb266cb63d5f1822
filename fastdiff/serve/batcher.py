"""Jobs and dynamic batching: one worker thread runs every Engine call, off the event loop.

Requests with the same model and sampling options (sampler, steps, options, guidance, conditional or not)
that wait together — arriving within `window_s` of the oldest, or queued while a batch runs — are run as
ONE batch: their seeds (and class ids) are concatenated and the result split. Each sample's noise depends on
its own seed only, so a request's images do not depend on who shared its batch (the same noise bit for bit,
the images equal to the model's float tolerance).
"""
from __future__ import annotations

import logging
import secrets
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch

from ..request import SampleRequest
from ..schedule import SAMPLER_OPTIONS
from .models import Cancelled, ServedModel

log = logging.getLogger("fastdiff.serve")

QUEUED, RUNNING, DONE, ERROR, CANCELLED = "queued", "running", "done", "error", "cancelled"
FINISHED = (DONE, ERROR, CANCELLED)


class QueueFull(Exception):
    """More jobs wait than the server's --max-queue."""


class Stopped(Exception):
    """The server is shutting down and takes no new job."""


@dataclass
class Job:
    """One POST /api/generate: a checked request for one model, and what became of it."""

    model: ServedModel
    request: SampleRequest
    params: dict  # the request as the client should resend it to reproduce the run (model, seed, ...)
    id: str = field(default_factory=lambda: secrets.token_urlsafe(16))
    created: float = field(default_factory=time.time)
    arrived: float = field(default_factory=time.monotonic)
    status: str = QUEUED
    steps_done: int = 0
    batch_images: int = 0  # images of the batch it ran in (padding excluded)
    batch_jobs: int = 0
    run: str | None = None
    error: str | None = None
    seconds: float | None = None
    saving: bool = False  # its files are being written: a shutdown lets it finish

    @property
    def key(self) -> tuple:
        """What must be equal for two jobs to share a batch."""
        r = self.request
        options = {**SAMPLER_OPTIONS[r.sampler], **r.options}  # a default sent or left out: the same run
        return (self.model.name, r.sampler, r.steps, tuple(sorted(options.items())), r.guidance,
                r.classes is not None)

    def seeds(self) -> np.ndarray:
        return self.request.seeds(0, self.request.n)

    def class_ids(self) -> np.ndarray | None:
        return self.request.class_ids(0, self.request.n)


class Batcher:
    """The job queue, the job table and the worker thread. `save(job, images)` writes a finished job's files
    and returns its run name."""

    def __init__(self, save: Callable[[Job, torch.Tensor], str], window_s: float = 0.02, max_batch: int = 64,
                 max_queue: int = 64, keep: int = 1000):
        self.save, self.window_s, self.max_batch, self.max_queue, self.keep = save, window_s, max_batch, max_queue, keep
        self._cond = threading.Condition()
        self._pending: list[Job] = []
        self._running: list[Job] = []
        self._jobs: dict[str, Job] = {}
        self._stopping = False
        self._cancel = False
        self._thread: threading.Thread | None = None
        self.stats = {"batches": 0, "jobs": 0, "images": 0, "errors": 0}

    # --- the event loop's side ----------------------------------------------------------------------------
    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="fastdiff-serve-worker", daemon=True)
            self._thread.start()

    def cancel(self) -> None:
        """Take no new job and finish every queued and running job as cancelled, at once (a job being saved
        ends as it is); the worker stops at its next step and removes the partial files. Never blocks: the
        server calls it as shutdown begins, so long polls answer before uvicorn waits for connections."""
        with self._cond:
            self._stopping = self._cancel = True
            for job in [*self._pending, *self._running]:
                if not job.saving and job.status not in FINISHED:
                    job.status, job.error = CANCELLED, "the server shut down"
            self._pending.clear()
            self._cond.notify_all()

    def stop(self, timeout: float = 30.0) -> None:
        """cancel(), then wait (at most timeout seconds) for the worker."""
        self.cancel()
        if self._thread is not None:
            self._thread.join(timeout)

    def submit(self, job: Job) -> Job:
        with self._cond:
            if self._stopping:
                raise Stopped("the server is shutting down")
            if len(self._pending) >= self.max_queue:
                raise QueueFull(f"{len(self._pending)} jobs are waiting (this server's --max-queue is "
                                f"{self.max_queue}); retry in a moment")
            self._pending.append(job)
            self._jobs[job.id] = job
            self._evict()
            self._cond.notify_all()
        return job

    def get(self, job_id: str) -> dict | None:
        """A consistent snapshot of a job (None: unknown id)."""
        with self._cond:
            job = self._jobs.get(job_id)
            if job is None:
                return None
            position = self._pending.index(job) if job.status == QUEUED and job in self._pending else None
            return {"id": job.id, "status": job.status, "model": job.model.name, "steps_done": job.steps_done,
                    "steps_total": job.request.steps, "live_progress": job.model.live_progress,
                    "n": job.request.n, "queue_position": position,
                    "batch_images": job.batch_images, "batch_jobs": job.batch_jobs, "run": job.run,
                    "error": job.error, "seconds": job.seconds, "params": job.params}

    @property
    def queued(self) -> int:
        with self._cond:
            return len(self._pending)

    def _evict(self) -> None:
        if len(self._jobs) <= self.keep:
            return
        for job_id in [i for i, j in self._jobs.items() if j.status in FINISHED][: len(self._jobs) - self.keep]:
            del self._jobs[job_id]

    # --- the worker ---------------------------------------------------------------------------------------
    def _take(self) -> list[Job] | None:
        """Wait for a job, then for the window of the oldest; take it and every compatible job (in order) that
        fits max_batch images. None when stopping."""
        with self._cond:
            while not self._pending and not self._stopping:
                self._cond.wait(0.5)
            if self._stopping:
                return None
            first = self._pending[0]
            while not self._stopping:
                left = first.arrived + self.window_s - time.monotonic()
                if left <= 0:
                    break
                self._cond.wait(left)
            if self._stopping:
                return None
            batch, images = [], 0
            for job in list(self._pending):
                if job.key == first.key and images + job.request.n <= self.max_batch:
                    batch.append(job)
                    images += job.request.n
            for job in batch:
                self._pending.remove(job)
                job.status, job.batch_images, job.batch_jobs = RUNNING, images, len(batch)
            self._running = batch
            return batch

    def _loop(self) -> None:
        while True:
            batch = self._take()
            if batch is None:
                return
            try:
                self._run(batch)
            except Exception:  # noqa: BLE001 - never let one batch kill the worker
                log.exception("batch failed")
            finally:
                with self._cond:
                    self._running = []

    def _progress(self, batch: list[Job]) -> Callable[[int], None]:
        total = batch[0].request.steps

        def hook(done: int) -> None:
            if self._cancel:
                raise Cancelled()
            for job in batch:
                job.steps_done = min(done, total)

        return hook

    def _run(self, batch: list[Job]) -> None:
        first, start = batch[0], time.perf_counter()
        seeds = np.concatenate([job.seeds() for job in batch])
        ids = [job.class_ids() for job in batch]
        classes = None if ids[0] is None else np.concatenate(ids)
        try:
            images = first.model.sample(seeds, classes, first.request, self._progress(batch))
        except Cancelled:
            self._finish(batch, CANCELLED, "the server shut down")
            return
        except Exception as e:  # noqa: BLE001 - a failed batch is reported on each of its jobs
            log.exception("sampling failed")
            self._finish(batch, ERROR, f"sampling failed: {type(e).__name__}: {e}")
            return
        seconds = round(time.perf_counter() - start, 3)
        self.stats["batches"] += 1
        offset = 0
        for job in batch:
            part, offset = images[offset:offset + job.request.n], offset + job.request.n
            with self._cond:
                if self._cancel:
                    job.status, job.error = CANCELLED, "the server shut down"
                    continue
                job.saving, job.seconds = True, seconds
            try:
                run = self.save(job, part)
            except Exception as e:  # noqa: BLE001 - a disk error fails that job only
                log.exception("saving failed")
                self._finish([job], ERROR, f"saving failed: {type(e).__name__}: {e}")
                continue
            finally:
                job.saving = False
            self.stats["jobs"] += 1
            self.stats["images"] += job.request.n
            with self._cond:
                job.run, job.steps_done, job.status = run, job.request.steps, DONE

    def _finish(self, jobs: list[Job], status: str, error: str) -> None:
        """Finish jobs (one already finished, e.g. cancelled by a shutdown, keeps its status)."""
        with self._cond:
            for job in jobs:
                if job.status in FINISHED:
                    continue
                job.status, job.error = status, error
                if status == ERROR:
                    self.stats["errors"] += 1
