"""The outcome benchmark (``benchmarks/outcome.py``): variants, the noise over seeds, and (slow) one
smallest run whose numbers are checked against an evaluation of the files it wrote computed here by hand
(torchvision's ResNet forward, PyTorch's own BatchNorm averaging, prototypes and nearest distances written
out), on the benchmark's own episodes."""
from __future__ import annotations

import csv
import json
import math
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import eval_crops
from datasets.episodes import EpisodeDataset
from datasets.splits import read_split
from engine.experiments import Variant, code_tree, parse_variant
from engine.precise_bn import clean_files
from models import load_embedding
from tests.scripts_helpers import load_script
from utils.errors import OptionError
from utils.metrics import t_quantile_975

REPO = Path(__file__).resolve().parent.parent
outcome = load_script("benchmarks/outcome.py")


def test_variants_parse_flags_for_both_stages_or_each() -> None:
    both = parse_variant("cl:--memoryFormat channels_last")
    assert both == Variant("cl", None, ("--memoryFormat", "channels_last"), ("--memoryFormat", "channels_last"))
    each = parse_variant("old@56d06f0:--LR 0.002 // --LR 0.0005 --deform random")
    assert each.revision == "56d06f0"
    assert each.stage1_flags == ("--LR", "0.002") and each.stage2_flags == ("--LR", "0.0005", "--deform", "random")
    assert parse_variant("base:").stage1_flags == ()
    for bad in ("no-colon", ":--LR 1", "a b:--LR 1"):
        with pytest.raises(OptionError, match=r"--variant .*: expected NAME\[@REVISION\]:FLAGS"):
            parse_variant(bad)


def fake_results(values: dict[str, list[float]]) -> list[dict]:
    return [{"variant": name, "seed": seed, **{m: v[i] + (0.5 if m == "stage1_s" else 0.0) for m in outcome.METRICS}}
            for name, v in values.items() for i, seed in enumerate((0, 1, 2))]


def test_noise_and_differences_come_from_the_seeds() -> None:
    variants = [parse_variant("a:"), parse_variant("b:")]
    results = fake_results({"a": [50.0, 54.0, 52.0], "b": [60.0, 61.0, 65.0]})
    summary = outcome.summarize(results, variants, [0, 1, 2])
    a = summary["variants"]["a"]["val_1shot_saved"]
    assert a["mean"] == pytest.approx(52.0) and a["std"] == pytest.approx(2.0)
    d = summary["differences"]["b"]["val_1shot_saved"]
    diffs = [10.0, 7.0, 13.0]
    assert d["mean"] == pytest.approx(10.0)
    assert d["half_width_95"] == pytest.approx(4.3026527 * statistics.stdev(diffs) / math.sqrt(3))
    assert d["exceeds_noise"] is True
    noisy = outcome.summarize(fake_results({"a": [50.0, 54.0, 52.0], "b": [58.0, 46.0, 55.0]}), variants, [0, 1, 2])
    assert noisy["differences"]["b"]["val_1shot_saved"]["exceeds_noise"] is False


def test_a_revision_is_exported_as_its_own_code_tree(tmp_path: Path) -> None:
    if subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True).returncode:
        pytest.skip("not a git checkout")
    tree, commit = code_tree("HEAD", tmp_path)
    assert tree == tmp_path / "code" / commit and (tree / "classification.py").is_file()
    with pytest.raises(OptionError, match="--variant ...@no-such-revision-xyz: not a commit of"):
        code_tree("no-such-revision-xyz", tmp_path)


@torch.no_grad()
def hand_accuracy(embed: torch.nn.Module, split, episodes: EpisodeDataset) -> float:
    """Mean accuracy (%) over ``episodes`` of the nearest prototype (mean support feature, squared
    Euclidean distance), each episode's classes and files as ``episodes.plan`` draws them."""
    accuracies = []
    for index in range(len(episodes)):
        classes, support, query, _ = episodes.plan(index)
        prototypes = torch.stack([embed(eval_crops([split.files[c][i] for i in picks], 32)).mean(0)
                                  for c, picks in zip(classes, support)])
        correct = 0
        for label, (c, picks) in enumerate(zip(classes, query)):
            features = embed(eval_crops([split.files[c][i] for i in picks], 32))
            nearest = ((features[:, None, :] - prototypes[None, :, :]) ** 2).sum(-1).argmin(1)
            correct += int((nearest == label).sum())
        accuracies.append(correct / sum(len(picks) for picks in query))
    return 100 * sum(accuracies) / len(accuracies)


@pytest.mark.slow
def test_smallest_benchmark_run(tmp_path: Path) -> None:
    work = tmp_path / "work"
    flags = ["--workdir", str(work), "--seeds", "0", "1", "--s1Epochs", "1", "--s1Files", "2", "--s2Epochs", "1",
             "--s2Episodes", "3", "--s2Val", "3", "--s2Test", "5", "--evalEpisodes", "5", "--preciseImages", "64",
             "--s1Batch", "32", "--galleryNum", "2", "--perClass", "20", "--device", "cpu", "--nthreads", "0",
             "--variant", "cl:--memoryFormat channels_last", "--variant", "plain:--memoryFormat contiguous"]
    done = subprocess.run([sys.executable, "-m", "benchmarks.outcome", *flags], cwd=REPO, capture_output=True,
                          text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    for metric in outcome.METRICS:
        assert f"| {metric} |" in done.stdout, metric
    with open(work / "outcome.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert set(rows[0]) == {"variant", "seed", *outcome.METRICS}
    assert [(r["variant"], r["seed"]) for r in rows] == [("cl", "0"), ("plain", "0"), ("cl", "1"), ("plain", "1")]
    results = {(r["variant"], int(r["seed"])): json.loads((work / "results" / f"{r['variant']}_seed{r['seed']}.json")
                                                          .read_text()) for r in rows}
    # identical seeds and data: the stage-1 command lines differ only in the variant's flags
    for seed in (0, 1):
        cl, plain = (results[v, seed]["settings"]["stage1"] for v in ("cl", "plain"))
        strip = lambda flags, v: [f.replace(f"_{v}_", "_") for f in flags[:-2]]  # noqa: E731
        assert strip(cl, "cl") == strip(plain, "plain") and cl[-1] == "channels_last" and plain[-1] == "contiguous"
    # the noise estimate is over the seeds
    summary = json.loads((work / "outcome.json").read_text())
    values = [results["plain", s]["val_1shot_saved"] - results["cl", s]["val_1shot_saved"] for s in (0, 1)]
    d = summary["differences"]["plain"]["val_1shot_saved"]
    assert d["mean"] == pytest.approx(statistics.mean(values))
    assert d["half_width_95"] == pytest.approx(t_quantile_975(1) * statistics.stdev(values) / math.sqrt(2))
    # as saved and re-estimated: the file the plain variant's stage 1 wrote for seed 1, evaluated here by hand
    # on the benchmark's test episodes (5-way 1-shot, 15 queries, --evalEpisodes 5, episode seed 0)
    root = Path(summary["setup"]["data"])
    net = load_embedding(work / "models" / "s1_plain_seed1.t7")
    net.convnet.fc = torch.nn.Identity()  # torchvision's forward up to the pooled 512-d features
    test = read_split(root, "test")
    episodes = EpisodeDataset(test, 32, 5, 1, 15, 5, seed=0, stream=2, decode="none")
    reference = {"saved": hand_accuracy(net.convnet.eval(), test, episodes)}
    # --preciseImages 64 clean images in two batches of --s1Batch 32: the re-estimated statistics are the average
    # of the two batches' mean and unbiased variance, what PyTorch's BatchNorm keeps with momentum None
    norms = [m for m in net.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    for norm in norms:
        norm.reset_running_stats()
        norm.momentum = None
    batch = eval_crops(clean_files(read_split(root, "train"), 64, 1, 2), 32)
    with torch.no_grad():
        net.convnet.train()
        net.convnet(batch[:32])
        net.convnet(batch[32:])
    assert all(int(norm.num_batches_tracked) == 2 for norm in norms)
    reference["precise"] = hand_accuracy(net.convnet.eval(), test, episodes)
    assert results["plain", 1]["test_1shot_saved"] == pytest.approx(reference["saved"])
    assert results["plain", 1]["test_1shot_precise"] == pytest.approx(reference["precise"])
    # a second call reuses every finished run
    again = subprocess.run([sys.executable, "-m", "benchmarks.outcome", *flags], cwd=REPO, capture_output=True,
                           text=True, timeout=300)
    assert again.returncode == 0 and again.stdout.count("reused") == 4
