"""Plot training curves from a run's metrics CSV (needs the optional matplotlib).

    python -m scripts.plot_metrics runs/NAME/metrics.csv --out picture/NAME_curves.png
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pandas as pd

CURVES = {"loss": ["loss", "proto_loss", "cls_loss"],
          "accuracy (%)": ["val_1shot", "val_5shot", "train_acc", "select_acc", "select_plain_acc"]}


def draw(table: pd.DataFrame, title: str):
    """The figure of a metrics table: one panel per entry of CURVES, whole epochs on the x axis."""
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    figure, axes = plt.subplots(1, len(CURVES), figsize=(5 * len(CURVES), 3.5))
    for axis, (label, columns) in zip(axes, CURVES.items()):
        for column in columns:
            if column in table and table[column].notna().any():
                axis.plot(table["epoch"], table[column], marker="o", label=column)
        axis.xaxis.set_major_locator(MaxNLocator(integer=True))
        axis.set(xlabel="epoch", ylabel=label)
        axis.legend()
    figure.suptitle(title)
    figure.tight_layout()
    return figure


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("metrics", type=Path, help="runs/<name>/metrics.csv")
    parser.add_argument("--out", type=Path, required=True, help="PNG to write")
    args = parser.parse_args(argv)
    try:
        import matplotlib
        matplotlib.use("Agg")
    except ImportError:
        print("matplotlib is not installed (pip install matplotlib); no plot written")
        return 0
    if not args.metrics.is_file():
        print(f"error: {args.metrics}: metrics CSV not found", file=sys.stderr)
        return 2
    figure = draw(pd.read_csv(args.metrics), args.metrics.parent.name)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(args.out, dpi=120)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
