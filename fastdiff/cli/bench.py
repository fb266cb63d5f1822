"""`fastdiff bench`: the benchmarks of the fused step, the sampling engine and its peers (docs/design.md §5)."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from ..machine import pick_device
from .common import add_device, add_quiet

SECTIONS = ("step", "model", "peers", "e2e")


def add(sub) -> None:
    p = sub.add_parser("bench", help="benchmarks: the step, end-to-end sampling, peers (JSON, Markdown, PNG)",
                       description="Benchmarks of the fused step, the sampling engine and its peers (docs/design.md §5). "
                       "Writes results.json, results.md and PNG plots.")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--quick", dest="mode", action="store_const", const="quick", help="small sizes, digits only (default)")
    g.add_argument("--full", dest="mode", action="store_const", const="full", help="every size, both nets, torch.compile rows")
    g.add_argument("--smoke", dest="mode", action="store_const", const="smoke", help=argparse.SUPPRESS)
    p.set_defaults(mode="quick")
    p.add_argument("--out", type=Path,
                   help="output folder (default: benchmarks/results/<device-slug>-<date>/ under the current directory)")
    add_device(p)
    p.add_argument("--sections", default=",".join(SECTIONS), help="comma-separated subset of " + ",".join(SECTIONS))
    p.add_argument("--time-budget", type=float, default=0.0,
                   help="seconds; cases left when it is spent are recorded as skipped (default: 0 = none)")
    p.add_argument("--threads", type=int, help="torch CPU threads for the run (default: torch's own choice)")
    p.add_argument("--only", metavar="REGEX", help="run only the cases whose 'section:impl-...' name matches, e.g. "
                   "'peers:.*-digits-(1|64)-ddim-50' (re-running key rows when the load is low)")
    p.add_argument("--update", action="store_true",
                   help="re-run the --only cases and replace their rows in the results.json already in --out (same "
                        "mode and machine); the other rows stay, the notes say what was re-run when")
    p.add_argument("--no-plots", action="store_true", help=argparse.SUPPRESS)
    add_quiet(p)
    p.set_defaults(run=run)


def run(a: argparse.Namespace) -> None:
    from ..bench import run_bench

    device = pick_device(a.device)
    sections = tuple(s.strip() for s in a.sections.split(",") if s.strip())
    bad = set(sections) - set(SECTIONS)
    if bad or not sections:
        raise ValueError(f"--sections: choose from {', '.join(SECTIONS)}; got {a.sections!r}")
    if a.threads is not None and a.threads < 1:
        raise ValueError("--threads must be >= 1")
    if a.update and (a.only is None or a.out is None):
        raise ValueError("--update needs --only (the cases to re-run) and --out (the folder whose results.json they update)")
    if a.only is not None:
        import re

        try:
            re.compile(a.only)
        except re.error as e:
            raise ValueError(f"--only: not a regular expression ({e})") from None
    out = run_bench(a.mode, device, a.out, sections, a.time_budget, a.threads, progress=not a.quiet,
                    plots=not a.no_plots, only=a.only, update=a.update)
    result = json.loads((out / "results.json").read_text())
    done = sum("median_s" in r for r in result["rows"])
    print(f"{done}/{len(result['rows'])} cases measured in {result['total_s']:.0f} s → {out}/results.md")
    for t in result["targets"]:
        print(f"  {t['target']}: {t['value']:.2f} ({'met' if t['met'] else 'not met'})")
