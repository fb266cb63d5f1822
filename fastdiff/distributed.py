"""Scale-out under `torchrun` (docs/scaling.md): the process group, rank helpers, and the sharding of
training batches and sample seeds, chosen so that N processes compute what one process computes.

* `init(device)` joins the group that torchrun's environment describes (RANK, WORLD_SIZE, LOCAL_RANK,
  MASTER_ADDR, MASTER_PORT): NCCL on CUDA (each rank on cuda:LOCAL_RANK), gloo on the CPU. Without
  torchrun (or with one process) it does nothing, and every helper here acts as world size 1.
* Collectives time out after FASTDIFF_DIST_TIMEOUT seconds (default 600). Waiting for the other ranks
  to finish their share of sampling uses a separate gloo group with a long timeout (a rank may have a
  batch more to do); a rank that dies closes its sockets, so the others fail at once either way.
* Training: every rank draws the whole global batch from the same generator and keeps its contiguous
  slice (`split`); sampling: each rank takes a contiguous block of the single process's batches
  (`batch_share`), so it draws the same noise and writes the same file names.
"""
from __future__ import annotations

import hashlib
import os
import re
import warnings
from datetime import timedelta
from pathlib import Path
from typing import Any, Callable, Iterable

import torch
import torch.distributed as dist

from .images import SampleSet
from .request import check_int

TIMEOUT_ENV = "FASTDIFF_DIST_TIMEOUT"
DEFAULT_TIMEOUT_S = 600.0
WAIT_TIMEOUT_S = 24 * 3600.0  # waiting for another rank's share of the work (not a hung collective)

_wait_group = None  # the gloo group for long waits, barriers and object collectives of sampling / eval


# --- the environment --------------------------------------------------------------------------------
def _env_int(name: str, default: int, low: int) -> int:
    text = os.environ.get(name, "").strip()
    if not text:
        return default
    try:
        value = int(text)
    except ValueError:
        raise ValueError(f"{name} must be an integer; got {text!r}") from None
    return check_int(name, value, low)


def env_world() -> tuple[int, int, int]:
    """(rank, local rank, world size) from torchrun's environment; (0, 0, 1) outside torchrun."""
    world = _env_int("WORLD_SIZE", 1, 1)
    rank, local = _env_int("RANK", 0, 0), _env_int("LOCAL_RANK", 0, 0)
    if rank >= world:
        raise ValueError(f"RANK must be in [0, WORLD_SIZE - 1 = {world - 1}]; got {rank}")
    return rank, local, world


def timeout_s() -> float:
    """FASTDIFF_DIST_TIMEOUT in seconds (default 600): how long one collective may wait."""
    text = os.environ.get(TIMEOUT_ENV, "").strip()
    if not text:
        return DEFAULT_TIMEOUT_S
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not value > 0 or value == float("inf"):
        raise ValueError(f"{TIMEOUT_ENV} must be a positive number of seconds; got {text!r}")
    return value


def init(device: torch.device | str = "cpu") -> torch.device:
    """Join torchrun's process group (once); returns the device this rank uses (cuda:LOCAL_RANK on CUDA)."""
    global _wait_group
    device = torch.device(device)
    rank, local, world = env_world()
    if world == 1:
        return device
    if device.type == "cuda":
        if device.index not in (None, local):
            raise ValueError(f"--device {device}: under torchrun each process uses cuda:LOCAL_RANK (here cuda:{local}); "
                             "pass --device cuda or auto")
        if local >= torch.cuda.device_count():
            raise ValueError(f"LOCAL_RANK {local} has no GPU: {torch.cuda.device_count()} visible; lower --nproc-per-node")
        device = torch.device("cuda", local)
    if dist.is_initialized():
        return device
    if not dist.is_available():
        raise ValueError("WORLD_SIZE > 1 but this torch build has no torch.distributed")
    missing = [v for v in ("MASTER_ADDR", "MASTER_PORT") if not os.environ.get(v)]
    if missing:
        raise ValueError(f"WORLD_SIZE > 1 needs {' and '.join(missing)} (launch with torchrun)")
    timeout = timedelta(seconds=timeout_s())
    if device.type == "cuda":
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", init_method="env://", timeout=timeout, device_id=device)
    else:
        dist.init_process_group("gloo", init_method="env://", timeout=timeout)
    _wait_group = dist.new_group(backend="gloo", timeout=timedelta(seconds=max(WAIT_TIMEOUT_S, timeout_s())))
    return device


def shutdown() -> None:
    """Leave the process group (after a successful command; a failed one just exits)."""
    global _wait_group
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    _wait_group = None


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def is_main() -> bool:
    return rank() == 0


def explain(e: BaseException, text: str) -> str:
    """The CLI's one-line error under torchrun: 'rank N: ...', saying when a peer was lost or a collective
    timed out; the text unchanged outside torchrun."""
    try:
        rank_, _, world = env_world()
    except ValueError:
        return text
    if world == 1:
        return text
    if isinstance(e, dist.DistError) or any(w in text.lower() for w in ("gloo", "nccl", "connection")):
        text = re.sub(r"\[[^\]]*\.(?:cc|cpp|h):\d+\]\s*", "", text).split(" This is typically")[0]
        try:
            limit = f"{timeout_s():g}"
        except ValueError:
            limit = "?"
        text = (f"lost contact with the other processes (one exited, or a collective waited longer than "
                f"{TIMEOUT_ENV}={limit} s): {text}")
    return f"rank {rank_}: {text}"


# --- collectives (each a no-op at world size 1) -----------------------------------------------------
def barrier(wait: bool = False) -> None:
    """All ranks meet; wait=True: on the long-timeout gloo group (one rank may still be working)."""
    if world_size() > 1:
        dist.barrier(group=_wait_group if wait else None)


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """t summed over ranks (in place; returned)."""
    if world_size() > 1:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def all_gather_objects(obj: Any, wait: bool = False) -> list:
    """[obj of rank 0, obj of rank 1, ...] on every rank (picklable objects)."""
    if world_size() == 1:
        return [obj]
    out: list = [None] * world_size()
    dist.all_gather_object(out, obj, group=_wait_group if wait else None)
    return out


def gather_objects(obj: Any) -> list | None:
    """[obj of every rank] on rank 0, None elsewhere (over the long-timeout gloo group)."""
    if world_size() == 1:
        return [obj]
    out: list | None = [None] * world_size() if is_main() else None
    dist.gather_object(obj, out, dst=0, group=_wait_group)
    return out


def broadcast_object(obj: Any) -> Any:
    """Rank 0's obj on every rank."""
    if world_size() == 1:
        return obj
    box = [obj if is_main() else None]
    dist.broadcast_object_list(box, src=0, group=_wait_group)
    return box[0]


def fingerprint(tensors: Iterable[torch.Tensor]) -> str:
    """A hash of the tensors' bytes (bit-exact comparison)."""
    h = hashlib.sha256()
    for t in tensors:
        h.update(t.detach().contiguous().cpu().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def check_same(what: str, tensors: Iterable[torch.Tensor]) -> None:
    """Raise RuntimeError on every rank if the tensors are not bit-identical across ranks."""
    if world_size() == 1:
        return
    digests = all_gather_objects(fingerprint(tensors))
    bad = [r for r, d in enumerate(digests) if d != digests[0]]
    if bad:
        raise RuntimeError(f"{what} differ between ranks {bad} and rank 0: the replicas diverged")


# --- sharding ---------------------------------------------------------------------------------------
def split(n: int, parts: int, index: int) -> tuple[int, int]:
    """[lo, hi) of part `index` when n items are split into `parts` contiguous parts, sizes differing by <= 1."""
    n, parts = check_int("n", n, 0), check_int("parts", parts, 1)
    index = check_int("index", index, 0, parts - 1)
    base, extra = divmod(n, parts)
    lo = index * base + min(index, extra)
    return lo, lo + base + (index < extra)


def batch_share(n: int, batch_size: int, rank_: int | None = None, world: int | None = None) -> tuple[int, int]:
    """[lo, hi) of the images this rank samples: a contiguous block of the single process's batches of
    batch_size, so that each rank runs exactly the batches (seeds, sizes) a single process runs."""
    n, batch_size = check_int("n", n, 0), check_int("batch_size", batch_size, 1)
    rank_ = rank() if rank_ is None else rank_
    world = world_size() if world is None else world
    lo, hi = split(-(-n // batch_size), world, rank_)
    return min(lo * batch_size, n), min(hi * batch_size, n)


def idle_ranks(n: int, batch_size: int, world: int | None = None) -> int:
    """How many ranks get no batch (when n needs fewer batches than there are ranks)."""
    world = world_size() if world is None else world
    return max(0, world - -(-n // batch_size))


def idle_note(n: int, batch_size: int, world: int | None = None) -> str | None:
    """Why some ranks get no batch of sampling (None when every rank has one): too few images for the processes,
    or too large a --batch-size."""
    world = world_size() if world is None else world
    idle = idle_ranks(n, batch_size, world)
    if not idle:
        return None
    if n < world:
        return (f"-n {n} is below the {world} processes: {idle} process(es) get no image; raise -n or launch fewer "
                "processes")
    return f"{idle} process(es) get no batch of --batch-size {batch_size}; lower it to use them"


def rank_seed(seed: int, rank_: int) -> int:
    """The seed of rank r's own stream (dropout and any other draw of the global torch RNG); rank 0: seed."""
    if rank_ == 0:
        return seed
    return int.from_bytes(hashlib.sha256(f"fastdiff/{seed}/{rank_}".encode()).digest()[:8], "little") >> 1


def gather_shards(make: Callable[[int, int], torch.Tensor], n: int, batch_size: int) -> torch.Tensor | None:
    """Rank r computes make(lo, hi) for its batch_share of n items; rank 0 gets all n in order, others None."""
    lo, hi = batch_share(n, batch_size)
    if world_size() == 1:
        return make(lo, hi)
    parts = gather_objects(make(lo, hi) if hi > lo else None)
    return None if parts is None else torch.cat([p for p in parts if p is not None])


def wrap(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """The model in DistributedDataParallel when world size > 1, else the model itself."""
    if world_size() == 1:
        return model
    from torch.nn.parallel import DistributedDataParallel

    # 1x1 convolutions' weight gradients come with arbitrary strides on their size-1 dimensions; DDP warns
    # that they differ from its bucket's (a copy either way, the values are the same)
    warnings.filterwarnings("ignore", message=".*Grad strides do not match bucket view strides.*")
    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)


class SharedSampleSet:
    """One images.SampleSet written by every rank: rank 0 owns the hidden folder and tells the others its
    path; each rank writes its images under their global index; `close` waits for every rank, then rank 0
    publishes (grid from the files, sidecar last). At world size 1 it is exactly a SampleSet."""

    def __init__(self, out: Path, name: str, scale: int = 4):
        self.world = world_size()
        self.owner = is_main()
        self.set = SampleSet(out, name, scale) if self.owner else None
        folder = broadcast_object(str(self.set.folder_in_progress) if self.owner else None)
        if not self.owner:
            self.set = SampleSet(out, name, scale, folder=Path(folder))

    def add(self, images: torch.Tensor, start: int) -> None:
        self.set.add(images, start=start if self.world > 1 else None)

    def close(self, info: dict, n: int) -> Path | None:
        """Wait for every rank; rank 0 publishes the n images and returns the grid path (others: None)."""
        if self.world == 1:
            return self.set.close(info)
        barrier(wait=True)
        path = self.set.close({**info, "processes": self.world}, count=n) if self.owner else None
        barrier(wait=True)  # nobody reports success before the set is published
        return path

    def __enter__(self) -> "SharedSampleSet":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.set.__exit__(exc_type, exc, tb)
