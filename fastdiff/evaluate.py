"""The quality table behind `fastdiff eval`: FID / KID vs sampling steps in the shape of the DDIM paper's Table 1 (rows η, columns S),
with DDPM beside it and, when given, the exported ONNX FP32 and INT8 models beside the PyTorch ones."""
from __future__ import annotations

import argparse
import time
from pathlib import Path

STEPS, ETAS, DDPM_STEPS, N = [10, 20, 50, 100, 1000], [0.0, 0.5, 1.0], [1000], 297  # N: the held-out set
QUICK_STEPS, QUICK_ETAS, QUICK_DDPM_STEPS, QUICK_N = [10, 20], [0.0, 1.0], [20], 64
ONNX_STEPS, ONNX_ETA = 50, 0.0


def table_rows(a: argparse.Namespace, timesteps: int) -> list[dict]:
    """The rows to run: DDIM for every eta x S, then DDPM for every S."""
    steps = a.steps if a.steps is not None else (QUICK_STEPS if a.quick else STEPS)
    etas = a.etas if a.etas is not None else (QUICK_ETAS if a.quick else ETAS)
    ddpm = a.ddpm_steps if a.ddpm_steps is not None else (QUICK_DDPM_STEPS if a.quick else DDPM_STEPS)
    bad = [s for s in steps + ddpm if not 1 <= s <= timesteps]
    if bad:
        raise ValueError(f"steps must be in [1, {timesteps}] (the model's training timesteps); got {bad}")
    if any(not 0 <= e <= 10 for e in etas):
        raise ValueError(f"--etas must be in [0, 10]; got {etas}")
    rows = [{"name": f"ddim-{s}-eta{e:g}", "source": "torch", "sampler": "ddim", "steps": s, "eta": e}
            for e in etas for s in steps]
    return rows + [{"name": f"ddpm-{s}", "source": "torch", "sampler": "ddpm", "steps": s, "eta": None} for s in ddpm]


def ddim_options(eta: float, unclipped_eps: bool) -> dict:
    return {"eta": eta} | ({"use_clipped_model_output": False} if unclipped_eps else {})


def check_rows(rows: list[dict], schedule, n: int, seed: int, unclipped_eps: bool) -> None:
    """Refuse any row its sampler would refuse (e.g. an eta too large for its steps) before the first is sampled."""
    from .request import MAX_SEED, SampleRequest, check_int

    check_int("--seed", seed, 0, MAX_SEED - (n - 1))
    for row in rows:
        ddim = row["sampler"] == "ddim"
        try:
            SampleRequest.checked(schedule, 0, n, sampler=row["sampler"], steps=row["steps"], seed=seed,
                                  **(ddim_options(row["eta"], unclipped_eps) if ddim else {}))
        except ValueError as e:
            flag = f"--etas {row['eta']:g} with --steps {row['steps']}" if ddim else f"--ddpm-steps {row['steps']}"
            raise ValueError(f"{flag}: {e}" + ("; etas in [0, 1] always work" if ddim else "")) from None


def open_onnx(path: Path, flag: str, precision: str):
    """An OnnxSampler for path, with a clear error if it is missing, unreadable or not of `precision` (its
    fastdiff.precision metadata)."""
    try:
        from .export.runtime import OnnxSampler, check_model_file
    except ImportError as e:
        raise RuntimeError(f"{flag} needs fastdiff.export.runtime and onnxruntime ({e})") from None
    check_model_file(path, flag)
    try:
        runner = OnnxSampler(path)
    except Exception as e:  # noqa: BLE001 - onnxruntime raises its own exception types
        raise ValueError(f"{flag} {path}: not a readable fastdiff ONNX model ({type(e).__name__}: {e})") from None
    if runner.precision != precision:
        raise ValueError(f"{flag} {path}: an {runner.precision} model (its fastdiff.precision metadata); expected "
                         f"an {precision} one" + (" (--onnx and --onnx-int8 swapped?)" if {runner.precision, precision}
                                                  == {"fp32", "int8"} else ""))
    return runner


def _json(text: str):
    """text parsed as JSON, or None if it is not JSON."""
    import json

    try:
        return json.loads(text)
    except ValueError:
        return None


def check_onnx_matches(runner, flag: str, model, schedule) -> None:
    """ValueError naming `flag` unless the ONNX file of `runner` was exported from `model` (its weights digest, when
    the file records one; else its image shape, class count, schedule and model config); a file without a digest
    gets a note on stderr, as its weights cannot be told apart from another model's of the same config."""
    import json
    import sys

    from .onnx_export import describe, weights_digest

    shape, num_classes, config = describe(model)
    where = f"{flag} {runner.path}"
    if tuple(runner.image_shape) != tuple(shape):
        raise ValueError(f"{where}: a model of {list(runner.image_shape)} images; the checkpoint's are {list(shape)}")
    if runner.num_classes != num_classes:
        raise ValueError(f"{where}: a model of {runner.num_classes} classes; the checkpoint has {num_classes} "
                         "(0: unconditional)")
    ours, theirs = schedule.to_dict(), runner.schedule.to_dict()
    if ours != theirs:
        keys = sorted(k for k in set(ours) | set(theirs) if ours.get(k) != theirs.get(k))
        raise ValueError(f"{where}: its noise schedule differs from the checkpoint's (in {', '.join(keys)})")
    if runner.model_config is not None and _json(runner.model_config) != json.loads(json.dumps(config)):
        raise ValueError(f"{where}: exported from another model config (fastdiff.model_config) than the checkpoint's")
    if runner.weights_sha256 is None:
        print(f"fastdiff eval: note: {where} records no weights digest (an older export); only its shape, classes, "
              "schedule and config were checked against the checkpoint", file=sys.stderr)
    elif runner.weights_sha256 != weights_digest(model):
        raise ValueError(f"{where}: exported from other weights than the checkpoint's (fastdiff.weights_sha256 "
                         "differs); export this checkpoint with `fastdiff export`")


def evaluate_all(a: argparse.Namespace) -> None:
    """Sample and score every row; write results.json (after each row), results.md, fid_vs_steps.png, grids/."""
    import torch
    from tqdm import tqdm

    from . import __version__, distributed, metrics, ops
    from .checkpoint import BUNDLED_MODEL as BUNDLED
    from .checkpoint import load_model
    from .engine import Engine, generate
    from .files import ensure_writable, write_json
    from .images import grid, save_png
    from .machine import machine_info, pick_device

    n = a.n if a.n is not None else (QUICK_N if a.quick else N)
    if n < 2:
        raise ValueError(f"--n must be >= 2 (FID needs a covariance); got {n}")
    if a.batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1; got {a.batch_size}")
    if a.nll_timesteps < 1:
        raise ValueError(f"--nll-timesteps must be >= 1 (T - 1 or more: every timestep); got {a.nll_timesteps}")
    if a.out.exists() and not a.out.is_dir():
        raise ValueError(f"--out {a.out}: exists and is not a folder")
    ckpt = a.ckpt or BUNDLED
    if getattr(a, "diffusers", None) is not None:  # an unconditional UNet2DModel folder (interop.diffusers)
        from types import SimpleNamespace

        from .interop.diffusers import load_diffusers

        model, schedule, info = load_diffusers(a.diffusers)
        ckpt, shape = a.diffusers, info["image_shape"]
        cfg = SimpleNamespace(in_channels=shape[0], image_size=shape[1], num_classes=0)
    else:
        if a.ckpt is None and not BUNDLED.exists():
            raise FileNotFoundError(f"no --ckpt given and the bundled model {BUNDLED} is missing; pass --ckpt "
                                    "RUN_FOLDER")
        model, schedule, _ = load_model(ckpt)
        cfg = model.config
        shape = cfg.image_shape
    rows = table_rows(a, schedule.num_train_timesteps)
    check_rows(rows, schedule, n, a.seed, a.unclipped_eps)
    onnx = {kind: open_onnx(path, flag, kind.split("-")[1]) for kind, path, flag in
            (("onnx-fp32", a.onnx, "--onnx"), ("onnx-int8", a.onnx_int8, "--onnx-int8")) if path is not None}
    for kind, runner in onnx.items():
        check_onnx_matches(runner, "--onnx" if kind == "onnx-fp32" else "--onnx-int8", model, schedule)
    rows += [{"name": f"{kind}-ddim-{ONNX_STEPS}", "source": kind, "sampler": "ddim", "steps": ONNX_STEPS,
              "eta": ONNX_ETA} for kind in onnx]
    if not rows:
        raise ValueError("nothing to evaluate: --steps/--etas and --ddpm-steps select no rows")
    ensure_writable(a.out)
    device = distributed.init(pick_device(a.device))  # under torchrun: every rank samples its share of each row
    if not distributed.is_main():
        a.quiet = True  # one set of progress bars
    model = model.to(device)

    classes = torch.arange(n) % cfg.num_classes if cfg.num_classes else None  # balanced classes if conditional
    floor = metrics.real_floor(n)
    results = {"fastdiff": __version__, "torch": torch.__version__, "step_backend": ops.backend(),
               "machine": machine_info(device), "runtime": Engine(model, schedule, device=device).runtime_info["runtime"],
               "processes": distributed.world_size(), "ckpt": str(ckpt), "n": n, "seed": a.seed, "ddim_clipped_eps": not a.unclipped_eps,
               "reference": "load_digits(16, 'test'): 297 held-out digits",
               "classifier": {"path": str(metrics.CLASSIFIER), "test_accuracy": metrics.classifier_accuracy()},
               "floor": {"what": f"{floor['n']} real train digits vs the test digits", **floor}, "rows": []}

    def sample(count: int, **kw) -> torch.Tensor | None:
        """count images; under torchrun each rank samples its batches and rank 0 gets them all (others: None)."""
        return distributed.gather_shards(lambda lo, hi: generate(
            model, schedule, shape, hi - lo, seed=a.seed + lo, num_classes=cfg.num_classes,
            classes=None if classes is None else classes[lo:hi], batch_size=a.batch_size, device=device, **kw),
            count, a.batch_size)

    paired: dict[str, torch.Tensor] = {}

    def reference_images() -> torch.Tensor:
        """PyTorch fp32 DDIM-ONNX_STEPS η = ONNX_ETA with the same seeds: what every approximate path is paired with."""
        if "ref" not in paired:
            paired["ref"] = sample(n, sampler="ddim", steps=ONNX_STEPS, runtime="torch",
                                   **ddim_options(ONNX_ETA, a.unclipped_eps))
        return paired["ref"]

    sample(min(n, a.batch_size * distributed.world_size()), sampler="ddim", steps=1)  # warm-up, so that the first row's seconds are fair
    (a.out / "grids").mkdir(exist_ok=True)
    bar = tqdm(rows, desc="eval", unit="row", disable=a.quiet, dynamic_ncols=True)
    for row in bar:
        bar.set_postfix_str(row["name"])
        start = time.perf_counter()
        if row["source"] == "torch":
            images = sample(n, sampler=row["sampler"], steps=row["steps"], progress=not a.quiet,
                            **(ddim_options(row["eta"], a.unclipped_eps) if row["sampler"] == "ddim" else {}))
        else:
            images = distributed.gather_shards(lambda lo, hi: torch.from_numpy(onnx[row["source"]].sample(
                hi - lo, sampler="ddim", steps=ONNX_STEPS, seed=a.seed + lo, progress=not a.quiet,
                classes=None if classes is None else classes[lo:hi].numpy(),
                **ddim_options(ONNX_ETA, a.unclipped_eps))), n, a.batch_size)
        seconds = time.perf_counter() - start
        if row["source"] != "torch":
            reference_images()  # sampled by every rank (a collective under torchrun), then cached
        if images is None:  # another rank under torchrun: rank 0 scores and writes
            continue
        grid_path = a.out / "grids" / f"{row['name']}.png"
        save_png(grid(images[:64], scale=4), grid_path)
        row.update(metrics.evaluate(images), seconds=round(seconds, 3), grid=str(grid_path))
        if row["source"] != "torch":  # paired with the PyTorch fp32 images of the same seeds
            row["paired"] = metrics.paired_fidelity(images, reference_images())
        results["rows"].append(row)
        write_json(a.out / "results.json", results)  # after every row, so a long run can be watched
    if not distributed.is_main():
        return
    if a.nll:
        from .data import load_digits
        from .likelihood import bits_per_dim

        test = load_digits(cfg.image_size, "test")
        y = test.labels if cfg.num_classes else None
        results["nll"] = bits_per_dim(model, schedule, test.images.to(device), y=None if y is None else y.to(device),
                                      timesteps=min(a.nll_timesteps, schedule.num_train_timesteps - 1),
                                      seed=a.seed, progress=not a.quiet)
        write_json(a.out / "results.json", results)
    write_markdown(results, a.out / "results.md")
    plot(results, a.out / "fid_vs_steps.png")
    best = min(results["rows"], key=lambda r: r["fid"])
    print(f"{len(rows)} rows, n={n}: best FID {best['fid']:.2f} ({best['name']}), real-vs-real floor "
          f"{floor['fid']:.2f} → {a.out}/results.md")


def _label(row: dict) -> str:
    if row["source"] != "torch":
        return f"ONNX {row['source'].split('-')[1].upper()} (DDIM η = {row['eta']:g})"
    return f"DDIM η = {row['eta']:g}" if row["sampler"] == "ddim" else "DDPM"


def write_markdown(results: dict, path: Path) -> None:
    """The DDIM-paper table (rows η / DDPM / ONNX, columns S) and a detail table of every row."""
    from .files import atomic_write

    rows, floor = results["rows"], results["floor"]
    columns = sorted({r["steps"] for r in rows})
    table: dict[str, dict[int, float]] = {}
    for r in rows:
        lo, hi = r["fid_ci95"]
        table.setdefault(_label(r), {})[r["steps"]] = f"{r['fid']:.2f} [{lo:.2f}, {hi:.2f}]"
    lines = [f"# FID vs sampling steps: {results['ckpt']}", "",
             f"n = {results['n']} samples per cell (seed {results['seed']}), FID (lower is better) against "
             f"{results['reference']}, in the 64-wide feature space of fastdiff's digits classifier (test accuracy "
             f"{results['classifier']['test_accuracy']:.1%}). torch {results['torch']}, {results['machine']['device']}"
             f" ({results['machine']['gpu'] or results['machine']['cpu']}), engine runtime "
             f"{results.get('runtime', 'torch')}.", "",
             "| | " + " | ".join(f"S = {s}" for s in columns) + " |", "|---|" + "---:|" * len(columns)]
    for label, cells in table.items():
        lines.append(f"| {label} | " + " | ".join(cells.get(s, "–") for s in columns) + " |")
    flo, fhi = floor["fid_ci95"]
    lines.append("| real vs real (floor) | " + " | ".join(f"{floor['fid']:.2f} [{flo:.2f}, {fhi:.2f}]"
                                                         for _ in columns) + " |")
    lines += ["", "FID [bootstrap 95 % interval: generated and reference features resampled with replacement, "
              "200 rounds, percentiles shifted by the bootstrap's bias]. DDIM rows re-derive ε from the clamped x0" + (" — except in this run, which used "
              "diffusers' semantics (--unclipped-eps)." if not results["ddim_clipped_eps"] else "."), "",
              f"Floor: {floor['what']}: FID {floor['fid']:.2f}, KID {floor['kid_mean']:.4f} ± {floor['kid_std']:.4f}.",
              "", "| row | sampler | S | η | FID [95 % CI] | KID | IS | confident | paired PSNR / max diff | seconds |",
              "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        eta = "–" if r["eta"] is None else f"{r['eta']:g}"
        pair = f"{r['paired']['psnr_db']:.1f} dB / {r['paired']['max_abs_diff']:.3f}" if "paired" in r else "–"
        lines.append(f"| {r['name']} | {r['source']} {r['sampler']} | {r['steps']} | {eta} | {r['fid']:.2f} "
                     f"[{r['fid_ci95'][0]:.2f}, {r['fid_ci95'][1]:.2f}] | {r['kid_mean']:.4f} ± {r['kid_std']:.4f} | "
                     f"{r['inception_score']:.2f} | {r['confident']:.1%} | {pair} | {r['seconds']:.1f} |")
    if "nll" in results:
        nll = results["nll"]
        lines += ["", f"NLL of the {nll['n']} held-out digits: **{nll['bits_per_dim']:.3f} ± {nll['stderr']:.3f} "
                  f"bits/dim** (variational bound, {nll['timesteps']} stratified timesteps, {nll['variance_type']} "
                  f"variance; prior {nll['prior']:.4f}, decoder {nll['decoder']:.3f} bits/dim)."]
    lines += ["", "KID: unbiased polynomial-kernel MMD², mean ± std over random subsets. IS: the Inception Score "
              "computed with the digits classifier (1 to 10). confident: share of samples the classifier labels "
              "with softmax ≥ 0.8. paired: the same seeds through PyTorch fp32 (DDIM-50 η = 0): PSNR and max abs "
              "difference of the images in [-1, 1] (the reference runs on the eager torch runtime). seconds: wall time to sample the n images (after one warm-up "
              "call; ONNX rows include their session's first run).", ""]
    atomic_write(path, lambda tmp: Path(tmp).write_text("\n".join(lines)))


def plot(results: dict, path: Path) -> None:
    """FID vs S (log x), one line per η; DDPM and the real-vs-real floor as horizontal lines, ONNX as markers."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    from .files import atomic_write

    rows = results["rows"]
    fig, ax = plt.subplots(figsize=(6, 4))
    for eta in sorted({r["eta"] for r in rows if r["source"] == "torch" and r["sampler"] == "ddim"}):
        pts = sorted((r["steps"], r["fid"]) for r in rows if r["source"] == "torch" and r["eta"] == eta
                     and r["sampler"] == "ddim")
        ax.plot(*zip(*pts), marker="o", label=f"DDIM η = {eta:g}")
    for i, r in enumerate(r for r in rows if r["sampler"] == "ddpm"):
        ax.axhline(r["fid"], color=f"C{5 + i}", linestyle="--", label=f"DDPM-{r['steps']}")
    for r, marker in zip((r for r in rows if r["source"] != "torch"), "s^"):
        ax.plot([r["steps"]], [r["fid"]], marker=marker, linestyle="none", color="k", label=_label(r))
    ax.axhline(results["floor"]["fid"], color="gray", linestyle=":", label="real vs real (floor)")
    ax.set(xscale="log", xlabel="sampling steps S", ylabel="FID (classifier features)",
           title=f"FID vs steps (n = {results['n']})")
    ax.set_xticks(sorted({r["steps"] for r in rows}), minor=False)
    ax.xaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
    ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
    ax.legend(fontsize=8)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=100))
    plt.close(fig)
