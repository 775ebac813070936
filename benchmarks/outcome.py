"""What a run learns, over seeds: the outcome benchmark (docs/outcome.md, "Outcome and noise").

For each seed and each variant (a set of flags, or a git revision of the code), in that order so that
every variant sees the same drift in machine load: stage 1 (``classification.py``, the script itself)
for a fixed budget; its saved file ``models/<run>.t7`` evaluated on val and test, 5-way 1- and 5-shot,
on the same episodes for every variant and seed, as saved and with its BatchNorm statistics re-estimated
as ``--preciseBN`` would; a short stage 2 round 1, 1-shot (``onlyBasetwoLoss.py --fixCls 1``) from it,
its test accuracy with and without deformation. Per variant each number's mean +- standard deviation
over the seeds and the time; for every other variant its paired difference from the first with a
t-interval over the seeds: "exceeds noise" when that interval leaves out 0. One run proves nothing.

    python -m benchmarks.outcome --data toy --imageSize 32 --seeds 0 1 2 \\
        --variant 'channels_last:--memoryFormat channels_last' --variant 'contiguous:--memoryFormat contiguous'
    python -m benchmarks.outcome --data emoji --imageSize 48 --variant 'main:' --variant 'old@56d06f0:'

Finished runs are kept in ``--workdir`` (``results/<variant>_seed<S>.json``) and reused when their
settings are the same, so an interrupted benchmark continues where it stopped. The study
(``benchmarks/study.py``) launches its runs with the same flags, data and command lines (below).
"""
from __future__ import annotations

import sys
from pathlib import Path

if __spec__ is None:  # started as a file: the repository's packages import only under python -m
    sys.stderr.write(f"{sys.argv[0]}: run it from the repository root as python -m benchmarks.outcome\n")
    sys.exit(2)

from utils.runtime import set_process_env

set_process_env()  # before torch loads, as in the scripts

import argparse
import json
import math
import os
import platform
import time

import torch

from benchmarks.common import generate_once
from datasets import emoji, toy
from datasets.splits import read_split
from engine.experiments import Variant, code_tree, compare, evaluate_path, parse_variant, recorded, run_checked
from engine.fewshot import evaluate_embedding
from engine.options import add_gallery_num_flag, add_image_size_flag
from engine.precise_bn import clean_files, reestimate
from models import load_embedding
from utils.errors import OptionError
from utils.files import read_csv, write_csv, write_json
from utils.forward import layout_model
from utils.options import HelpFormatter, add_device_flag, add_threads_flag, check_positive, run_cli

EVAL_SEED = 0  # every variant and seed is evaluated on the same val and test episodes
STAGE1_METRICS = [f"{split}_{shots}shot_{state}" for state in ("saved", "precise") for split in ("val", "test")
                  for shots in (1, 5)]
STAGE2_METRICS = ["s2_test_acc", "s2_test_plain", "s2_difference"]
COST_METRICS = ["s1_final_loss", "s1_images_per_s", "stage1_s", "stage2_s"]
METRICS = STAGE1_METRICS + STAGE2_METRICS + COST_METRICS
GENERATORS = {"toy": (toy.generate, 30), "emoji": (emoji.generate, 60)}  # --data -> (generator, images per class)


def get_args_parser() -> argparse.ArgumentParser:
    p = run_parser(__doc__.splitlines()[0], "NAME[@REVISION]:FLAGS, repeated; the first is the baseline (default: "
                   "one variant 'default:')", "runs/outcome")
    p.add_argument("--evalEpisodes", type=int, default=300, help="episodes of each stage-1 evaluation")
    p.add_argument("--preciseImages", type=int, default=1024, help="clean training images of the re-estimation")
    p.add_argument("--json", default=None, help="also write the summary to this file")
    return p


# --- the runs, which the study (benchmarks/study.py) shares ----------------------------------------

def run_parser(description: str, variant_help: str, workdir: str) -> argparse.ArgumentParser:
    """The flags of the runs both the outcome benchmark and the study launch."""
    p = argparse.ArgumentParser(description=description, formatter_class=HelpFormatter)
    p.add_argument("--variant", action="append", default=[], help=variant_help)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="training seeds of every variant")
    p.add_argument("--data", default="toy", help="toy, emoji (generated in --workdir) or a dataset root")
    p.add_argument("--perClass", type=int, default=None, help="generated images per class (toy 30, emoji 60)")
    p.add_argument("--dataSize", type=int, default=None, help="generated image side (default: ceil(imageSize*256/224))")
    add_image_size_flag(p, 32, "of both stages' runs")
    p.add_argument("--s1Epochs", type=int, default=4, help="stage-1 epochs")
    p.add_argument("--s1Files", type=int, default=20, help="stage 1's --filesPerClass")
    p.add_argument("--s1Batch", type=int, default=64, help="stage 1's --batchSize (also the re-estimation's batch)")
    p.add_argument("--s2Epochs", type=int, default=2, help="stage-2 epochs (round 1, 1-shot, --fixCls 1)")
    p.add_argument("--s2Episodes", type=int, default=60, help="stage-2 training episodes per epoch")
    p.add_argument("--s2Val", type=int, default=50, help="stage-2 val episodes per epoch (selection)")
    p.add_argument("--s2Test", type=int, default=300, help="stage-2 test episodes")
    add_gallery_num_flag(p, 10, " of the stage-2 runs")
    add_device_flag(p)
    add_threads_flag(p, 2, use="loader workers of the scripts and the evaluation")
    p.add_argument("--workdir", default=workdir, help="folder of the runs, data, code trees and results")
    return p


def start_runs(a: argparse.Namespace) -> tuple[list[Variant], Path, Path, tuple[float, float]]:
    """The ``--variant`` list (``default:`` when none) once the flags of :func:`run_parser` are checked,
    ``--workdir`` (made), the dataset root (``--data`` as a folder, or the toy or emoji set generated in
    ``--workdir``, reused when its settings are the same), and the clock and load average then."""
    variants = [parse_variant(text) for text in (a.variant or ["default:"])]
    if len({v.name for v in variants}) != len(variants):
        raise OptionError("--variant: two variants share a name")
    if len(set(a.seeds)) != len(a.seeds):
        raise OptionError(f"--seeds {' '.join(map(str, a.seeds))}: repeated seed")
    check_positive(a, "imageSize", "s1Epochs", "s1Files", "s1Batch", "s2Epochs", "s2Episodes", "s2Val", "s2Test",
                   "galleryNum")
    workdir = Path(a.workdir).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    if a.data in GENERATORS:
        generate, per_class = GENERATORS[a.data]
        params = {"per_class": a.perClass or per_class, "size": a.dataSize or math.ceil(a.imageSize * 256 / 224),
                  "seed": 0}
        root = workdir / f"data_{a.data}_{params['size']}px_{params['per_class']}"
        generate_once(generate, root, ".outcome_data.json", a.data, **params)
    elif Path(a.data).is_dir():
        root = Path(a.data).resolve()
    else:
        raise OptionError(f"--data {a.data}: neither toy, emoji nor a dataset folder")
    return variants, workdir, root, (time.perf_counter(), os.getloadavg()[0])


def stage1_flags(a: argparse.Namespace, root: Path, seed: int, name: str, extra: tuple[str, ...]) -> list[str]:
    """``classification.py``'s command line for the stage-1 run ``name``."""
    return [*script_flags(a, root, seed), "--tensorname", name, "--numEpochs", str(a.s1Epochs), "--batchSize",
            str(a.s1Batch), "--filesPerClass", str(a.s1Files), "--valEpisodes", "0", *extra]


def stage2_flags(a: argparse.Namespace, root: Path, seed: int, network: str, name: str,
                 extra: tuple[str, ...]) -> list[str]:
    """``onlyBasetwoLoss.py``'s command line for the round-1 1-shot run ``name`` from ``network``."""
    return [*script_flags(a, root, seed), "--network", network, "--tensorname", name, "--shots", "1", "--fixCls", "1",
            "--galleryNum", str(a.galleryNum), "--epoch", str(a.s2Episodes), "--numEpochs", str(a.s2Epochs),
            "--valEpisodes", str(a.s2Val), "--testEpisodes", str(a.s2Test), *extra]


def script_flags(a: argparse.Namespace, root: Path, seed: int) -> list[str]:
    """The flags both scripts get from the benchmark's own (a run starts anew: ``--overwrite``)."""
    return ["--dataroot", str(root), "--imageSize", str(a.imageSize), "--seed", str(seed), "--nthreads",
            str(a.nthreads), "--progress", "0", "--overwrite"] + (["--device", a.device] if a.device else [])


def run_setup(root: Path, started: tuple[float, float], **more) -> dict:
    """The ``setup`` of a summary: the command line, the data, the machine, its load and the wall time since
    ``started`` (:func:`start_runs`)."""
    start, load_start = started
    return {"argv": sys.argv[1:], "data": str(root), "machine": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(), "load_avg_start": load_start, "load_avg_end": os.getloadavg()[0],
            "wall_s": time.perf_counter() - start, **more}


@torch.no_grad()
def evaluate_file(path: Path, root: Path, a: argparse.Namespace, seed: int, device: torch.device) -> dict[str, float]:
    """Val and test 5-way 1- and 5-shot accuracy (%) of a stage-1 file's embedding, as saved and with
    its BatchNorm statistics re-estimated (over the ``--preciseImages`` clean images ``--preciseBN``
    would draw with ``seed``)."""
    net = layout_model(load_embedding(path).to(device))
    splits = {name: read_split(root, name) for name in ("train", "val", "test")}
    out = {}
    for state in ("saved", "precise"):
        if state == "precise":
            reestimate(net, clean_files(splits["train"], a.preciseImages, seed, a.s1Files), a.imageSize, a.s1Batch,
                       a.nthreads, device)
        net.eval()
        for split, stream in (("val", 1), ("test", 2)):
            for shots in (1, 5):
                accs = evaluate_embedding(net.features, splits[split], a.imageSize, 5, shots, 15, a.evalEpisodes,
                                          EVAL_SEED, device, stream, 128, a.nthreads, progress=False)
                out[f"{split}_{shots}shot_{state}"] = 100 * sum(accs) / len(accs)
    return out


def run_one(variant: Variant, seed: int, root: Path, a: argparse.Namespace, workdir: Path,
            device: torch.device) -> dict:
    """Both stages of one variant and seed, and their numbers; reused from ``results/`` when the
    settings are the same."""
    code, commit = code_tree(variant.revision, workdir)
    name = f"{variant.name}_seed{seed}"
    stage1 = stage1_flags(a, root, seed, f"s1_{name}", variant.stage1_flags)
    stage2 = stage2_flags(a, root, seed, f"s1_{name}", f"s2_{name}", variant.stage2_flags)
    settings = {"commit": commit, "stage1": stage1, "stage2": stage2, "evalEpisodes": a.evalEpisodes,
                "preciseImages": a.preciseImages, "evalSeed": EVAL_SEED}
    path = workdir / "results" / f"{name}.json"
    if (saved := recorded(path, settings)) is not None:
        print(f"{name}: reused {path}", flush=True)
        return saved
    print(f"{name}: stage 1", flush=True)
    result = {"variant": variant.name, "seed": seed, "settings": settings, "stage1_s": run_checked(
        [sys.executable, str(code / "classification.py"), *stage1], workdir / "logs" / f"s1_{name}.log", workdir)}
    row = read_csv(workdir / "runs" / f"s1_{name}" / "metrics.csv")[-1]
    result["s1_final_loss"], result["s1_images_per_s"] = float(row["loss"]), float(row["images_per_s"])
    result.update(evaluate_file(workdir / "models" / f"s1_{name}.t7", root, a, seed, device))
    print(f"{name}: stage 2", flush=True)
    result["stage2_s"] = run_checked([sys.executable, str(code / "onlyBasetwoLoss.py"), *stage2],
                                     workdir / "logs" / f"s2_{name}.log", workdir)
    report = json.loads(evaluate_path(workdir / "runs" / f"s2_{name}", 1, seed).read_text())
    result.update(s2_test_acc=report["accuracy"], s2_test_plain=report["plain_accuracy"],
                  s2_difference=report["difference"])
    write_json(path, result)
    return result


def summarize(results: list[dict], variants: list[Variant], seeds: list[int]) -> dict:
    """Per variant and metric: mean, std, 95 % t half-interval and the seeds' values; per other variant:
    the same of the paired difference from the first, and whether it exceeds the noise."""
    names = [v.name for v in variants]
    return compare({(r["variant"], r["seed"]): r for r in results}, names, seeds, METRICS, METRICS)


def print_summary(summary: dict, variants: list[Variant], seeds: list[int]) -> None:
    names = [v.name for v in variants]
    header = ["metric"] + [f"{n} (mean +- std)" for n in names] + [f"{n} - {names[0]} [95% t-interval]"
                                                                   for n in names[1:]]
    print(f"\n{len(seeds)} seeds ({' '.join(map(str, seeds))}); accuracies in %, times in s")
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for metric in METRICS:
        cells = [metric]
        for n in names:
            s = summary["variants"][n][metric]
            cells.append(f"{s['mean']:.2f} +- {s['std']:.2f}" if len(seeds) > 1 else f"{s['mean']:.2f}")
        for n in names[1:]:
            d = summary["differences"][n][metric]
            verdict = "" if d["exceeds_noise"] is None else \
                (" **exceeds noise**" if d["exceeds_noise"] else " within noise")
            cells.append(f"{d['mean']:+.2f} +- {d['half_width_95']:.2f}{verdict}")
        print("| " + " | ".join(cells) + " |")
    if len(names) > 1 and len(seeds) > 1:
        tests = len(STAGE1_METRICS + STAGE2_METRICS)
        print(f"(each variant: {tests} accuracy comparisons at 95 %; when nothing differs, about {tests / 20:.1f} "
              "of them exceed the noise by chance alone)")


def main(a: argparse.Namespace) -> int:
    check_positive(a, "evalEpisodes")
    if a.preciseImages < 2:
        raise OptionError(f"--preciseImages must be at least 2, got {a.preciseImages}")
    device = torch.device(a.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    variants, workdir, root, started = start_runs(a)
    results = [run_one(v, seed, root, a, workdir, device) for seed in a.seeds for v in variants]
    summary = summarize(results, variants, a.seeds)
    summary["setup"] = run_setup(root, started, device=str(device), torch=torch.__version__)
    write_csv(workdir / "outcome.csv", results, ["variant", "seed", *METRICS])
    write_json(workdir / "outcome.json", summary)
    if a.json:
        write_json(Path(a.json), summary)
    print_summary(summary, variants, a.seeds)
    print(json.dumps({"outcome": str(workdir / "outcome.json"), "wall_s": round(summary["setup"]["wall_s"], 1)}))
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main, get_args_parser()))
