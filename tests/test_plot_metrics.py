"""``scripts/plot_metrics.py``: the curves of a run's metrics.csv, whole epochs on the x axis."""
from __future__ import annotations

import pandas as pd
import pytest

from tests.scripts_helpers import load_script

matplotlib = pytest.importorskip("matplotlib")
matplotlib.use("Agg")


def stage2_table(epochs: int) -> pd.DataFrame:
    """A stage-2 metrics table with a frozen classifier (cls_loss empty)."""
    return pd.DataFrame({"epoch": range(epochs), "proto_loss": [3.0 - 0.1 * e for e in range(epochs)],
                         "cls_loss": [float("nan")] * epochs, "train_acc": [30.0 + e for e in range(epochs)],
                         "select_acc": [28.0 + e for e in range(epochs)]})


@pytest.mark.parametrize("epochs", [2, 3, 7])
def test_the_x_axis_shows_whole_epochs(epochs: int) -> None:
    figure = load_script("scripts/plot_metrics.py").draw(stage2_table(epochs), "run")
    figure.canvas.draw()
    for axis in figure.axes:
        low, high = axis.get_xlim()
        ticks = [tick for tick in axis.get_xticks() if low <= tick <= high]
        assert len(ticks) >= 2 and all(tick == int(tick) for tick in ticks), ticks
    matplotlib.pyplot.close(figure)


def test_writes_the_png_of_a_run(tmp_path, capsys) -> None:
    csv = tmp_path / "runs/demo/metrics.csv"
    csv.parent.mkdir(parents=True)
    stage2_table(3).to_csv(csv, index=False)
    out = tmp_path / "curves.png"
    assert load_script("scripts/plot_metrics.py").main([str(csv), "--out", str(out)]) == 0
    assert out.read_bytes().startswith(b"\x89PNG")
    assert capsys.readouterr().out == f"wrote {out}\n"
