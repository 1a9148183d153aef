"""Pieces every data_prep script shares: named errors, safe extraction, parallel image work, reports."""
from __future__ import annotations

import hashlib
import json
import os
import sys
import tarfile
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence, TypeVar

import pandas as pd
from tqdm import tqdm

from abn_core.images import ImageDecodeError, open_rgb

T = TypeVar("T")
R = TypeVar("R")


class PrepError(Exception):
    """Bad input data. The message names the file and line (or image path) at fault."""


def at_line(path: str | Path, line_no: int, problem: str) -> PrepError:
    """A PrepError pointing at ``path:line_no`` (1-based line number)."""
    return PrepError(f"{path}:{line_no}: {problem}")


def run_cli(main: Callable[[Sequence[str] | None], int], argv: Sequence[str] | None = None) -> None:
    """Run a prep script's main; a PrepError becomes one line on stderr and exit status 2."""
    debug = "--debug" in (argv if argv is not None else sys.argv[1:])
    try:
        sys.exit(main(argv))
    except PrepError as exc:
        if debug:
            raise
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)


def md5_file(path: str | Path, chunk_size: int = 1 << 20) -> str:
    digest = hashlib.md5()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(chunk_size), b""):
            digest.update(chunk)
    return digest.hexdigest()


def safe_extract_tar(archive: str | Path, dest: str | Path) -> None:
    """Extract a tar archive, refusing any member that would land outside ``dest``.

    Links, devices and absolute or ``..`` paths are refused by name before anything is written.
    """
    dest = Path(dest).resolve()
    dest.mkdir(parents=True, exist_ok=True)
    with tarfile.open(archive) as tar:
        members = tar.getmembers()
        for member in members:
            target = (dest / member.name).resolve()
            if target != dest and dest not in target.parents:
                raise PrepError(f"{archive}: member {member.name!r} would be written outside {dest}; refusing")
            if not (member.isfile() or member.isdir()):
                raise PrepError(f"{archive}: member {member.name!r} is a link or special file; refusing")
        for member in tqdm(members, desc=f"extracting {Path(archive).name}", unit="file", leave=False):
            tar.extract(member, dest, filter="data") if hasattr(tarfile, "data_filter") else tar.extract(member, dest)


def parallel_map(fn: Callable[[T], R], items: Sequence[T], workers: int, desc: str) -> list[R]:
    """``[fn(x) for x in items]`` over ``workers`` processes (0 or 1: in this process), with a progress bar.

    ``fn`` must be a module-level function (it is pickled to the workers). Order is preserved.
    """
    if workers <= 1 or len(items) < 2:
        return [fn(item) for item in tqdm(items, desc=desc, unit="img")]
    chunksize = max(1, min(64, len(items) // (workers * 8)))
    with ProcessPoolExecutor(max_workers=workers) as pool:
        return list(tqdm(pool.map(fn, items, chunksize=chunksize), total=len(items), desc=desc, unit="img"))


def default_workers() -> int:
    return os.cpu_count() or 1


def decode_check(path: str | Path) -> str | None:
    """None if the image decodes fully, else the decoding problem as text."""
    try:
        open_rgb(path)
    except ImageDecodeError as exc:
        return str(exc)
    return None


def write_json(path: str | Path, payload: dict[str, Any]) -> None:
    """Write JSON atomically so an interrupted prep never leaves a half-written info file."""
    path = Path(path)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(payload, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)


def print_summary(title: str, rows: Iterable[tuple[str, Any]]) -> None:
    """Print a two-column Markdown summary table."""
    table = pd.DataFrame(list(rows), columns=["item", "value"])
    print(f"\n## {title}\n")
    print(table.to_markdown(index=False))
