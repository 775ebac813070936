"""The whole method on toy data, through the real scripts: stage 1, stage 2 round 1, --evaluate
(processes, marked slow), and the authors' ``module.``-prefixed weight layout through both scripts."""
from __future__ import annotations

import json
import re

import pytest
import torch
from PIL import Image

import engine.stage1
from datasets import read_split
from datasets.toy import generate
from engine.fewshot import evaluate_embedding
from engine.options import stage1_config
from models import EmbeddingNet
from tests.scripts_helpers import make_workdir, read_metrics, run_main, run_script
from utils.checkpoint import safe_load
from utils.metrics import mean_ci95

SIZE = "48"
STAGE1 = ["--dataroot", "toy", "--imageSize", SIZE, "--numEpochs", "3", "--batchSize", "64", "--nthreads", "0",
          "--valEvery", "1", "--valEpisodes", "60", "--progress", "0"]
STAGE2 = ["--dataroot", "toy", "--imageSize", SIZE, "--shots", "1", "--augnum", "7", "--chooseNum", "15",
          "--galleryNum", "5", "--nthreads", "0", "--progress", "0"]
LINE = re.compile(r"^5-way 1-shot test accuracy: (\d+\.\d\d) \+- (\d+\.\d\d) % \(80 episodes, seed 0\)$", re.M)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    root = tmp_path_factory.mktemp("pipeline")
    generate(root / "toy", per_class=20, size=64, seed=0)
    return root


@pytest.fixture(scope="module")
def stage1(workdir):
    result = run_script(workdir, "classification.py", *STAGE1, "--tensorname", "toy_stage1")
    assert result.returncode == 0, result.stderr
    return read_metrics(workdir / "runs/toy_stage1/metrics.csv")


def untrained_val_accuracy(workdir) -> float:
    torch.manual_seed(0)
    net = EmbeddingNet(64).eval()
    accuracies = evaluate_embedding(net.features, read_split(workdir / "toy", "val"), int(SIZE), 5, 1, 15, 60, 0,
                                    torch.device("cpu"), progress=False)
    return mean_ci95([100 * a for a in accuracies])[0]


@pytest.mark.slow
def test_stage1_trains_the_embedding_well_above_chance(workdir, stage1):
    assert [int(row["epoch"]) for row in stage1] == [0, 1, 2]
    assert float(stage1[-1]["loss"]) < float(stage1[0]["loss"])
    final = float(stage1[-1]["val_1shot"])
    assert final > 40.0, f"val 5-way 1-shot {final:.1f} % after stage 1 (chance 20 %)"
    assert final > untrained_val_accuracy(workdir) + 5.0
    assert float(stage1[-1]["val_5shot"]) > final
    for name in ("toy_stage1.t7", "toy_stage1_best.t7"):
        assert (workdir / "models" / name).is_file()
    args = json.loads((workdir / "runs/toy_stage1/args.json").read_text())
    assert args["imageSize"] == int(SIZE) and args["tensorname"] == "toy_stage1"


@pytest.mark.slow
def test_stage2_round1_then_evaluate_beats_chance_and_reports(workdir, stage1):
    trained = run_script(workdir, "onlyBasetwoLoss.py", *STAGE2, "--network", "toy_stage1", "--fixCls", "1",
                         "--numEpochs", "2", "--epoch", "30", "--valEpisodes", "30", "--testEpisodes", "30",
                         "--tensorname", "toy_1shot")
    assert trained.returncode == 0, trained.stderr
    rows = read_metrics(workdir / "runs/toy_1shot/metrics.csv")
    assert len(rows) == 2 and all(row["select_split"] == "val" for row in rows)
    assert rows[0]["cls_loss"] == ""  # --fixCls 1: no classification loss is computed

    evaluated = run_script(workdir, "onlyBasetwoLoss.py", *STAGE2, "--GNet", "toy_1shot", "--evaluate",
                           "--testEpisodes", "80", "--tensorname", "toy_1shot")
    assert evaluated.returncode == 0, evaluated.stderr
    match = LINE.search(evaluated.stdout)
    assert match, evaluated.stdout
    accuracy, interval = float(match.group(1)), float(match.group(2))
    assert accuracy > 35.0, evaluated.stdout
    assert 0 < interval < 15
    assert "test accuracy without deformation:" in evaluated.stdout
    assert "difference (with - without deformation):" in evaluated.stdout
    summary = json.loads((workdir / "runs/toy_1shot/evaluate_1shot_seed0.json").read_text())
    assert summary["episodes"] == 80 and summary["accuracy"] == pytest.approx(accuracy, abs=0.006)
    with Image.open(workdir / "picture/toy_1shot_deformed.png") as figure:
        assert figure.width > 4 * int(SIZE) and figure.height > int(SIZE)


def save_original_layout(stage1_file, path) -> dict[str, torch.Tensor]:
    """The stage-1 weights of ``stage1_file`` written to ``path`` as the authors' files hold them:
    ``module.``-prefixed keys (DataParallel), no ``num_batches_tracked`` (PyTorch 0.4.0), the legacy
    format. Returns the weights, under the stage-1 names."""
    state = {key: value for key, value in torch.load(stage1_file).items() if not key.endswith("num_batches_tracked")}
    torch.save({f"module.{key}": value for key, value in state.items()}, path, _use_new_zipfile_serialization=False)
    return state


def assert_stage1_network_holds(root, name: str, state: dict[str, torch.Tensor], monkeypatch) -> None:
    """``--network name`` builds the network classification.py trains from exactly ``state``."""
    monkeypatch.chdir(root)
    args = stage1_config(dataroot="toy", network=name, tensorname="check")
    model, _ = engine.stage1.build_model(args, 64)
    built = model.state_dict()
    assert all(torch.equal(built[key], value) for key, value in state.items())


def assert_stage2_embedding_holds(weights_file, state: dict[str, torch.Tensor]) -> None:
    """The embedding and fc in a stage-2 weights file equal ``state`` (stage-1 names)."""
    saved = safe_load(weights_file)
    renamed = {key.replace("convnet.fc.", "fc.").replace("convnet.", "backbone."): value
               for key, value in state.items()}
    assert all(torch.equal(saved[key], value) for key, value in renamed.items())


def test_module_prefixed_weights_load_as_the_file_holds_them(tmp_path, monkeypatch):
    """Through both scripts' own loading (stage 2: its main in this process, embedding frozen)."""
    root = make_workdir(tmp_path)
    state = save_original_layout(root / "models/stage1.t7", root / "models/original_layout.t7")
    assert_stage1_network_holds(root, "original_layout", state, monkeypatch)
    frozen = run_main(root, "onlyBasetwoLoss.py", "--dataroot", "toy", "--imageSize", "32", "--network",
                      "original_layout", "--deform", "none", "--galleryBN", "eval", "--fixCls", "1", "--numEpochs", "1",
                      "--epoch", "2",
                      "--valEpisodes", "2", "--testEpisodes", "2", "--test_num", "3", "--galleryNum", "2",
                      "--nthreads", "0", "--progress", "0", "--tensorname", "from_original")
    assert frozen.returncode == 0, frozen.stderr
    assert_stage2_embedding_holds(root / "models/from_original_last.t7", state)


@pytest.mark.slow
def test_network_accepts_the_original_layout_with_module_prefix(workdir, stage1, monkeypatch):
    state = save_original_layout(workdir / "models/toy_stage1.t7", workdir / "models/original_layout.t7")
    result = run_script(workdir, "classification.py", *STAGE1, "--numEpochs", "1", "--valEpisodes", "0",
                        "--filesPerClass", "2", "--network", "original_layout", "--tensorname", "finetune")
    assert result.returncode == 0, result.stderr
    assert_stage1_network_holds(workdir, "original_layout", state, monkeypatch)
    evaluated = run_script(workdir, "onlyBasetwoLoss.py", *STAGE2, "--network", "original_layout", "--deform", "none",
                           "--galleryBN", "eval", "--fixCls", "1", "--numEpochs", "1", "--epoch", "2",
                           "--valEpisodes", "2", "--testEpisodes", "2", "--tensorname", "from_original")
    assert evaluated.returncode == 0, evaluated.stderr
    assert_stage2_embedding_holds(workdir / "models/from_original_last.t7", state)
