"""Print a table of evaluation results (the JSON files ``onlyBasetwoLoss.py`` writes).

    python -m scripts.summarize runs/*/evaluate_*.json
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("files", nargs="+", type=Path, help="evaluate_*.json files")
    args = parser.parse_args(argv)
    header = f"{'run':<24} {'setting':<14} {'with deformation':>18} {'without':>16} {'difference':>16} {'episodes':>9}"
    print(header)
    print("-" * len(header))
    for path in args.files:
        try:
            result = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            print(f"error: {path}: {exc}", file=sys.stderr)
            return 2
        setting = f"{result['ways']}-way {result['shots']}-shot"
        print(f"{result['checkpoint']:<24} {setting:<14} {result['accuracy']:>9.2f} +- {result['ci95']:.2f} "
              f"{result['plain_accuracy']:>8.2f} +- {result['plain_ci95']:.2f} "
              f"{result['difference']:>+8.2f} +- {result['difference_ci95']:.2f} {result['episodes']:>9}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
