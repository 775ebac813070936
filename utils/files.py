"""Where runs live and how their JSON files are written (no torch: the sweep launcher reads this too)."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

RUNS_DIR = Path("runs")  # runs/<tensorname>/: args.json, metrics.csv, resume.pt, evaluation JSON


def write_json(path: Path, data: dict[str, Any]) -> None:
    """Write ``data`` as indented JSON, atomically (a temporary file renamed over ``path``)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True, default=str) + "\n")
    os.replace(tmp, path)
