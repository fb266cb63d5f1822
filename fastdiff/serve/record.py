"""The JSON sidecar of a served run: every parameter, the model's weights hash and each image's seed, so any
image can be regenerated exactly (by the API, the page's "reproduce", or `fastdiff sample`)."""
from __future__ import annotations

import datetime as _dt
import shlex

from .. import __version__
from .batcher import Job


def cli_command(job: Job) -> str:
    """The `fastdiff sample` line that writes the same images (image i: seed + i)."""
    r, m = job.request, job.model
    src = {"onnx": "--onnx", "diffusers": "--diffusers"}.get(m.kind, "--ckpt")
    args = ["fastdiff", "sample", src, str(m.source), "--sampler", r.sampler, "--steps", str(r.steps),
            "--n", str(r.n), "--seed", str(r.seed)]
    o = r.options
    if "eta" in o:
        args += ["--eta", repr(float(o["eta"]))]
    if "spacing" in o:
        args += ["--spacing", o["spacing"]]
    if "variance_type" in o:
        args += ["--variance", o["variance_type"]]
    if o.get("solver_order", 2) != 2:
        args += ["--solver-order", str(o["solver_order"])]
    if o.get("final_sigmas_type", "zero") != "zero":
        args += ["--final-sigmas", o["final_sigmas_type"]]
    if o.get("lower_order_final") is False:
        args.append("--no-lower-order-final")
    if o.get("clip_sample") is False:
        args.append("--no-clip")
    elif r.sampler == "ddim":
        args.append("--clipped-eps" if o.get("use_clipped_model_output") else "--unclipped-eps")
    if job.params.get("class_id") is not None:
        args += ["--class", str(job.params["class_id"]), "--guidance", repr(r.guidance)]
    return " ".join(shlex.quote(a) for a in args)


def run_info(job: Job, run: str) -> dict:
    """The sidecar of job's run (images.SampleSet adds count, images and grid)."""
    r, m = job.request, job.model
    seeds = [int(s) for s in job.seeds()]
    return {
        "fastdiff": __version__, "run": run, "job": job.id,
        "created": _dt.datetime.fromtimestamp(job.created).astimezone().isoformat(timespec="seconds"),
        "model": m.name, "model_kind": m.kind, "model_source": str(m.source), "model_sha256": m.sha256,
        "model_file": m.weights.name, "image_shape": list(m.image_shape), "num_classes": m.num_classes,
        "sampler": r.sampler, "steps": r.steps, "n": r.n, "seed": r.seed, "seeds": seeds,
        "class_id": job.params.get("class_id"), "guidance": r.guidance, "options": dict(r.options),
        "backend": m.backend, "device": m.device, "batch_images": job.batch_images, "batch_jobs": job.batch_jobs,
        "seconds": job.seconds,
        "reproduce": {"api": dict(job.params), "cli": cli_command(job)},
    }
