"""Where runs live, and their JSON and CSV files (no torch: the sweep launcher reads this too)."""
from __future__ import annotations

import csv
import io
import json
import math
import os
import secrets
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

RUNS_DIR = Path("runs")  # runs/<tensorname>/: args.json, metrics.csv, resume.pt, evaluation JSON


def atomic_write(path: Path | str, write: Callable[[BinaryIO], object]) -> None:
    """``write(handle)`` into a new file beside ``path``, fsync it, rename it over ``path`` and fsync the folder
    (best effort: Windows and some network filesystems cannot): a reader finds the old file or the whole new one,
    and an error leaves no temporary file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    try:
        with open(tmp, "xb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    try:
        folder = os.open(path.parent, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(folder)
    except OSError:
        pass
    finally:
        os.close(folder)


def write_json(path: Path, data: dict[str, Any]) -> None:
    """Write ``data`` as indented JSON, atomically; a non-finite float becomes null (JSON has no NaN)."""
    text = json.dumps(finite_or_null(data), indent=2, sort_keys=True, default=str, allow_nan=False) + "\n"
    atomic_write(path, lambda handle: handle.write(text.encode()))


def finite_or_null(value: Any) -> Any:
    """``value`` with every non-finite float inside dicts, lists and tuples replaced by None."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: finite_or_null(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_or_null(item) for item in value]
    return value


def csv_cell(value: Any) -> str:
    """A CSV cell: empty for None, floats to six significant digits."""
    if value is None:
        return ""
    return f"{value:.6g}" if isinstance(value, float) else str(value)


def read_csv(path: Path) -> list[dict[str, str]]:
    """The rows of a CSV file with a header (a run's ``metrics.csv``, ...), as text by column name."""
    with open(path, newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def write_csv(path: Path, rows: list[dict[str, Any]], fields: list[str]) -> None:
    """Write ``rows`` (the ``fields`` columns) as CSV, atomically."""
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=fields, lineterminator="\n")
    writer.writeheader()
    writer.writerows({key: csv_cell(row[key]) for key in fields} for row in rows)
    atomic_write(path, lambda handle: handle.write(text.getvalue().encode()))
