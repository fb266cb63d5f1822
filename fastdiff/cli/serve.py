"""`fastdiff serve`: the local studio page and JSON API (fastdiff.serve; docs/serve.md)."""
from __future__ import annotations

import argparse
import os
from pathlib import Path

from .common import add_device


def add(sub) -> None:
    p = sub.add_parser("serve", help="a local studio page and a JSON API that batches concurrent requests",
                       description="Serve the models given (default: the shipped digits model) on a local page and a "
                                   "JSON API; every run is saved under --out with a sidecar that reproduces it.")
    p.add_argument("--ckpt", type=Path, action="append", default=[], metavar="RUN",
                   help="run folder or checkpoint file (repeatable; named by folder)")
    p.add_argument("--onnx", type=Path, action="append", default=[], metavar="FILE",
                   help="exported ONNX model (repeatable; named by file stem)")
    p.add_argument("--diffusers", type=Path, action="append", default=[], metavar="DIR",
                   help="diffusers folder (save_pretrained layout; repeatable; named by folder)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1; any other needs --token)")
    p.add_argument("--port", type=int, default=7860, help="default: 7860")
    p.add_argument("--out", type=Path, default=Path("gallery"), help="where runs are saved (default: gallery)")
    p.add_argument("--token", default=os.environ.get("FASTDIFF_TOKEN"),
                   help="require this token on every request (default: $FASTDIFF_TOKEN; an empty one is refused)")
    p.add_argument("--max-n", type=int, default=16, help="images per request (default: 16)")
    p.add_argument("--max-steps", type=int, default=1000, help="reverse steps per request (default: 1000)")
    p.add_argument("--max-queue", type=int, default=64, help="jobs waiting before 429 (default: 64)")
    p.add_argument("--max-batch", type=int, default=64, help="images per Engine batch (default: 64)")
    p.add_argument("--batch-window-ms", type=float, default=20.0,
                   help="how long the oldest request waits for compatible ones to batch with (default: 20)")
    p.add_argument("--threads", type=int, help="torch CPU threads while sampling (default: torch's; 1 suits a small "
                                               "CPU shared with other work)")
    add_device(p)
    p.set_defaults(run=run)


def run(a: argparse.Namespace) -> None:
    try:
        from ..serve import Limits, create_app, load_models
        from ..serve.server import LOOPBACK_NAMES, bind, check_bind, check_token, is_loopback, serve
    except ImportError as e:
        raise ValueError(f"serve needs the serve extra (pip install 'fastdiff[serve]'): {e}") from None
    from ..files import ensure_writable
    from ..machine import pick_device
    from ..request import check_int

    check_token(a.token)
    warning = check_bind(a.host, a.token)
    if not 1 <= a.port <= 65535:
        raise ValueError(f"--port must be in [1, 65535]; got {a.port}")
    if a.threads is not None:
        check_int("--threads", a.threads, 1)
    limits = Limits(a.max_n, a.max_steps, a.max_queue, a.max_batch, a.batch_window_ms)
    device = pick_device(a.device)
    sock = bind(a.host, a.port)  # before the models load, the folder is made or success is printed
    try:
        ensure_writable(a.out, "--out")
        models = load_models(a.ckpt, a.onnx, a.diffusers, device=device, num_threads=a.threads)
        hosts = (*LOOPBACK_NAMES, a.host.lower()) if is_loopback(a.host) and not a.token else None
        app = create_app(models, a.out, limits, token=a.token, allowed_hosts=hosts)
    except BaseException:
        sock.close()
        raise
    if warning:
        print(warning)
    shown = f"[{a.host}]" if ":" in a.host else a.host
    print(f"fastdiff serve: http://{shown}:{a.port}/{'?token=<token>' if a.token else ''}  models: "
          f"{', '.join(models)}; runs saved under {a.out}/ (Ctrl-C to stop)", flush=True)
    serve(app, a.host, a.port, sock=sock)
