"""The epoch line both stages print (``engine.run.format_row``): every value it shows has one, and
the accuracies are all in percent (the stages' ``main`` run in this process on toy data)."""
from __future__ import annotations

import re

import pytest

from engine.run import format_row
from tests.scripts_helpers import make_workdir, read_metrics, run_main

STAGE1 = ["--dataroot", "toy", "--imageSize", "32", "--batchSize", "32", "--nthreads", "0", "--filesPerClass", "2",
          "--numEpochs", "2", "--valEvery", "1", "--valEpisodes", "2", "--valQueries", "1", "--progress", "0"]
STAGE2 = ["--dataroot", "toy", "--imageSize", "32", "--network", "stage1", "--epoch", "3", "--galleryNum", "2",
          "--chooseNum", "3", "--augnum", "2", "--test_num", "3", "--nthreads", "0", "--numEpochs", "1",
          "--valEpisodes", "2", "--testEpisodes", "2", "--progress", "0"]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return make_workdir(tmp_path_factory.mktemp("epoch_lines"))


def epoch_lines(stdout: str) -> dict[int, dict[str, str]]:
    """Epoch number -> the ``name value`` pairs of its console line."""
    lines = re.findall(r"^epoch (\d+): (.*)$", stdout, re.M)
    return {int(epoch): dict(pair.split(" ") for pair in shown.split(", ")) for epoch, shown in lines}


def test_format_row_leaves_out_columns_without_a_value() -> None:
    row = {"epoch": 3, "proto_loss": 1.23456, "cls_loss": "", "train_acc": 41.0, "own_distance": None,
           "gallery_bn": "train"}
    assert format_row(row) == "epoch 3: proto_loss 1.235, train_acc 41, gallery_bn train"


@pytest.mark.slow  # an end-to-end run of the script
def test_stage1_prints_the_training_accuracy_in_percent_as_the_val_accuracy(workdir) -> None:
    result = run_main(workdir, "classification.py", *STAGE1, "--tensorname", "percent")
    assert result.returncode == 0, result.stderr
    rows = read_metrics(workdir / "runs/percent/metrics.csv")
    shown = epoch_lines(result.stdout)
    assert sorted(shown) == [0, 1]
    assert any(float(row["accuracy"]) > 0 for row in rows)  # a zero would prove nothing
    for row in rows:
        line = shown[int(row["epoch"])]
        assert float(line["accuracy"]) == pytest.approx(100 * float(row["accuracy"]), rel=1e-3)  # metrics.csv: fraction
        assert float(line["val_1shot"]) == pytest.approx(float(row["val_1shot"]), rel=1e-3)  # percent in both


def test_stage2_with_a_frozen_classifier_prints_no_empty_cls_loss(workdir) -> None:
    result = run_main(workdir, "onlyBasetwoLoss.py", *STAGE2, "--fixCls", "1", "--tensorname", "frozen")
    assert result.returncode == 0, result.stderr
    assert read_metrics(workdir / "runs/frozen/metrics.csv")[0]["cls_loss"] == ""  # not trained: empty in the CSV
    line = next(line for line in result.stdout.splitlines() if line.startswith("epoch 0:"))
    assert "cls_loss" not in line and " ," not in line and not line.endswith(" "), line
    assert all(value for value in epoch_lines(result.stdout)[0].values())
