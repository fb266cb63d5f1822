"""The `fastdiff` command: one thin module per sub-command, one error path (docs/design.md §1).

Every expected failure — a bad argument, a missing or unreadable file, a full disk, a model that
produces NaN — ends in one line `fastdiff <command>: error: ...` and exit status 2; Ctrl-C in one line
and status 130; SIGTERM (`timeout`, a job scheduler) the same clean path with status 143; a closed
stdout (`fastdiff info | head -c0`) silently; a warning in one line `fastdiff <command>: warning: ...`. Under torchrun the line names the
rank (`fastdiff train: error: rank 1: ...`), and a lost peer or a timed-out collective says so.
"""
from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
import warnings
from contextlib import contextmanager
from typing import Iterator, NoReturn

from .. import distributed
from . import bench, evaluate, export, info, quantize, sample, serve, train

COMMANDS = (train, sample, info, export, quantize, evaluate, bench, serve)
EXPECTED_ERRORS = (ValueError, OSError, FloatingPointError, RuntimeError)


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where Python runs next so `with` blocks clean up as for Ctrl-C."""


class OneLineParser(argparse.ArgumentParser):
    """argparse whose errors are one line naming the command, not the whole usage block; add_subparsers passes
    type(self) as parser_class, so the sub-commands' parsers are OneLineParsers too."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog="fastdiff", description="Train DDPM U-Nets and sample them fast (DDPM / DDIM).")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for command in COMMANDS:
        command.add(sub)
    return p


def _message(e: BaseException) -> str:
    text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    if isinstance(e, OSError) and e.filename is not None and str(e.filename) not in text:
        text = f"{e.filename}: {text}"
    return text


@contextmanager
def _sigterm_interrupts() -> Iterator[None]:
    """Within the block, SIGTERM raises Terminated (main thread only; the previous handler is put back)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def terminate(signum, frame):
        raise Terminated("terminated")

    previous = signal.signal(signal.SIGTERM, terminate)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextmanager
def _one_line_warnings(command: str) -> Iterator[None]:
    """Within the block, a warning prints as `fastdiff <command>: warning: <message>` (no source line)."""
    def show(message, category, filename, lineno, file=None, line=None) -> None:
        print(f"fastdiff {command}: warning: {message}", file=file or sys.stderr)

    previous, warnings.showwarning = warnings.showwarning, show
    try:
        yield
    finally:
        warnings.showwarning = previous


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        with _sigterm_interrupts(), _one_line_warnings(args.command):
            args.run(args)
        distributed.shutdown()  # leave torchrun's process group, if the command joined one
        sys.stdout.flush()
    except BrokenPipeError:  # the reader went away: nothing to say, and nothing more to say it to
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except Terminated:
        print(f"\nfastdiff {args.command}: terminated (SIGTERM)", file=sys.stderr)
        return 143
    except KeyboardInterrupt as e:
        print(f"\nfastdiff {args.command}: interrupted" + (f": {e}" if str(e) else ""), file=sys.stderr)
        return 130
    except EXPECTED_ERRORS as e:
        print(f"fastdiff {args.command}: error: {distributed.explain(e, _message(e))}", file=sys.stderr)
        return 2
    return 0
