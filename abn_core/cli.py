"""The command line every task shares: ``python -m tasks.<name> [train|eval|explain] [options] KEY=VALUE ...``."""
from __future__ import annotations

import argparse
import os
import sys
from typing import Sequence

from .errors import UserError
from .task import Task

COMMANDS = ("train", "eval", "explain")


def parse_args(task: Task, argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog=f"python -m tasks.{task.name}",
        description=f"Train or evaluate an Attention Branch Network ({task.name}).",
        epilog="KEY=VALUE items override config keys, e.g. data.root=/data/prepared train.epochs=3",
    )
    parser.add_argument("command", nargs="?", default="train", help="train (default), eval or explain")
    parser.add_argument("--config", help=f"YAML config file (default configs/{task.name}.yaml)")
    parser.add_argument("--checkpoint", help="eval/explain: a run directory or a checkpoint inside it")
    parser.add_argument("--top-k", type=int, default=5, help="explain: classes listed per image (default 5)")
    parser.add_argument("--attention-mask", help="explain: a mask image (white = attend) replacing the attention map")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks for errors")
    parser.add_argument("items", nargs="*", help="KEY=VALUE overrides (and, for explain, images or folders)")
    args = parser.parse_intermixed_args(argv)
    if args.command not in COMMANDS:
        # Allow overrides without a command: `python -m tasks.x train.epochs=3`.
        args.items.insert(0, args.command)
        args.command = "train"
    return args


def run(task: Task, argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m tasks.<name>``; user errors become one line on stderr and exit 2."""
    argv = list(sys.argv[1:] if argv is None else argv)
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")  # no network look-ups at import
    args = parse_args(task, argv)
    try:
        return _dispatch(task, args)
    except UserError as exc:
        if args.debug:
            raise
        print(f"error: {_one_line(exc)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; resume with the same output_dir (train.resume=auto)", file=sys.stderr)
        return 130


def _one_line(exc: Exception) -> str:
    """The user-facing message, also when a DataLoader worker re-raised it wrapped in its traceback."""
    text = str(exc).strip()
    if "Original Traceback" in text:
        last = text.splitlines()[-1]
        return last.split(": ", 1)[1] if ": " in last else last
    return text.splitlines()[0] if text else type(exc).__name__


def _dispatch(task: Task, args: argparse.Namespace) -> int:
    from . import config as config_lib
    from . import engine

    if args.command == "train":
        cfg = config_lib.load_config(task.name, args.config, args.items)
        engine.train(task, cfg)
        return 0
    if args.command == "eval":
        if not args.checkpoint:
            raise UserError("eval needs --checkpoint RUN_DIR (or a checkpoint file inside a run directory)")
        engine.evaluate_checkpoint(task, args.checkpoint, args.config, args.items)
        return 0
    from .explain import explain_command

    if not args.checkpoint:
        raise UserError("explain needs --checkpoint RUN_DIR and image files or folders")
    explain_command(task, args.checkpoint, args.config, args.items, args.top_k, args.attention_mask)
    return 0
