"""Benchmarks of fastdiff (docs/design.md §5): the runner behind `fastdiff bench` and the case builders that the
pytest-benchmark suite in benchmarks/ reuses.

Sections
  step   the reverse step alone: fused op vs the eager step written as diffusers' DDIMScheduler.step
         (separate tensor ops + torch.randn) vs torch.compile of that eager step, beside the
         device-to-device copy of the same size (the roofline: bytes that must move = read x and m,
         write out = 3 tensors; GB/s over the copy's GB/s is the fraction of copy bandwidth).
  model  one forward of the network: eager torch vs the engine's ONNX Runtime model, fp32 and INT8 (CPU).
  peers  one network, one set of weights: the fastdiff Engine (each runtime: auto = cuda-graph / ort,
         torch, int8) vs the torch-free ONNX sampler (fp32, INT8) vs the eager loop (our U-Net +
         diffusers-style step) vs torch.compile(mode="max-autotune") of that loop vs diffusers'
         DDIMPipeline/DDPMPipeline with a UNet2DModel of the same architecture and the same weights.
  e2e    the Engine over DDPM-1000 and DDIM-{10,20,50,100}, batch {1,16,128}, cifar-ddpm and digits.

Timing: medians of repeated runs after warm-up, in one process; torch.cuda.Event on GPU,
time.perf_counter on CPU; the peers of one setting are timed interleaved, round by round, and compared by
same-round ratios (timing.measure_interleaved, report.speedup). Weights are random (seed 0): latency does not depend on them.

Modules: timing (measure), baselines (the diffusers-style eager steps and loop), models (shared networks,
engines, compiled loops, pipelines), cases (Case builders, run_case, run_group), suite (what a mode measures), report
(results.json, results.md, plots), runner (run_bench).
"""
from __future__ import annotations

from ..interop.diffusers import diffusers_available, diffusers_scheduler_kwargs, to_diffusers_unet
from .baselines import alpha_table, compiled_step, diffusers_ddim_step, diffusers_ddpm_step, eager_loop
from .cases import Case, e2e_case, model_case, run_case, run_group, step_case, step_coefs_example, step_shape
from .constants import DTYPE_NAMES, KIB, MIB, MODEL_IMPLS, NETS, PEER_IMPLS, SECTIONS, STEP_IMPLS
from .models import get_compiled, get_engine, get_model, get_onnx_sampler, get_ort_model, get_pipeline, image_shape
from .report import add_derived, markdown, speedup, targets, write_markdown, write_plots, write_results
from .runner import default_out, describe_machine, run_bench
from .suite import Suite, make_suite
from .timing import calibrate_inner, measure, measure_interleaved, paired_speedup, sync

__all__ = [
    "Case", "DTYPE_NAMES", "KIB", "MIB", "MODEL_IMPLS", "NETS", "PEER_IMPLS", "SECTIONS", "STEP_IMPLS", "Suite", "add_derived",
    "alpha_table", "calibrate_inner", "compiled_step", "default_out", "describe_machine",
    "diffusers_available", "diffusers_ddim_step", "diffusers_ddpm_step", "diffusers_scheduler_kwargs", "e2e_case",
    "eager_loop", "get_compiled", "get_engine", "get_model", "get_onnx_sampler", "get_ort_model", "get_pipeline", "image_shape", "make_suite", "markdown",
    "measure", "measure_interleaved", "model_case", "paired_speedup", "run_bench", "run_case", "run_group", "speedup", "step_case", "step_coefs_example", "step_shape", "sync", "targets",
    "to_diffusers_unet", "write_markdown", "write_plots", "write_results",
]
