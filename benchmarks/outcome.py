"""What a run learns, over seeds: the outcome benchmark.

For each seed and each variant (a set of flags, or a git revision of the code), in that order so
that every variant sees the same drift in machine load, it

1. runs stage 1 (``classification.py``, the script itself) for a fixed budget;
2. evaluates the saved file ``models/<run>.t7`` (the one stage 2 starts from) on val and test,
   5-way 1- and 5-shot, on the same episodes for every variant and seed, once as saved and once
   with its BatchNorm statistics re-estimated as ``--preciseBN`` would (``engine/precise_bn.py``);
3. runs a short stage 2 round 1, 1-shot (``onlyBasetwoLoss.py --fixCls 1``) from that file and
   reads its test accuracy with and without deformation and their paired difference;

and reports, per variant, each number's mean +- standard deviation over the seeds, the time, and
for every other variant its paired difference from the first with a t-interval over the seeds:
"exceeds noise" when that interval leaves out 0. One run proves nothing either way.

    python benchmarks/outcome.py --data toy --imageSize 32 --seeds 0 1 2 \\
        --variant 'channels_last:--memoryFormat channels_last' --variant 'contiguous:--memoryFormat contiguous'
    python benchmarks/outcome.py --data emoji --imageSize 48 --variant 'main:' --variant 'old@56d06f0:'

Finished runs are kept in ``--workdir`` (``results/<variant>_seed<S>.json``) and reused when their
settings are the same, so an interrupted benchmark continues where it stopped.
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from utils.runtime import set_process_env  # noqa: E402

set_process_env()  # before torch loads, as in the scripts

import argparse  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import os  # noqa: E402
import platform  # noqa: E402
import shlex  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import time  # noqa: E402
from dataclasses import dataclass  # noqa: E402

import torch  # noqa: E402

from datasets import emoji, toy  # noqa: E402
from datasets.splits import read_split  # noqa: E402
from engine.fewshot import evaluate_embedding  # noqa: E402
from engine.options import add_gallery_num_flag, add_image_size_flag  # noqa: E402
from engine.precise_bn import clean_files, reestimate  # noqa: E402
from models import load_embedding  # noqa: E402
from utils.errors import OptionError  # noqa: E402
from utils.files import read_csv, write_csv, write_json  # noqa: E402
from utils.forward import layout_model  # noqa: E402
from utils.metrics import mean_t_ci95  # noqa: E402
from utils.options import HelpFormatter, add_device_flag, add_threads_flag, run_cli  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
GENERATORS = {"toy": (toy.generate, 30), "emoji": (emoji.generate, 60)}  # --data -> (generator, images per class)
EVAL_SEED = 0  # every variant and seed is evaluated on the same val and test episodes
STAGE1_METRICS = [f"{split}_{shots}shot_{state}" for state in ("saved", "precise") for split in ("val", "test")
                  for shots in (1, 5)]
STAGE2_METRICS = ["s2_test_acc", "s2_test_plain", "s2_difference"]
COST_METRICS = ["s1_final_loss", "s1_images_per_s", "stage1_s", "stage2_s"]
METRICS = STAGE1_METRICS + STAGE2_METRICS + COST_METRICS


@dataclass(frozen=True)
class Variant:
    """A named way to run both stages: extra flags for each, and the code tree the scripts come from."""
    name: str
    revision: str | None
    stage1_flags: tuple[str, ...]
    stage2_flags: tuple[str, ...]


def parse_variant(text: str) -> Variant:
    """``NAME[@REV]:FLAGS`` (FLAGS for both stages) or ``NAME[@REV]:FLAGS1 // FLAGS2``."""
    head, sep, flags = text.partition(":")
    name, _, revision = head.partition("@")
    if not sep or not name or not name.replace("_", "").replace("-", "").isalnum():
        raise OptionError(f"--variant {text!r}: expected NAME[@REVISION]:FLAGS, NAME of letters, digits, - and _")
    first, split, second = flags.partition(" // ")
    stage1 = tuple(shlex.split(first))
    return Variant(name, revision or None, stage1, tuple(shlex.split(second)) if split else stage1)


def add_run_args(p: argparse.ArgumentParser, variant_help: str) -> None:
    """The flags of the runs both the outcome benchmark and the study (``benchmarks/study.py``) launch."""
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


def check_run_args(a: argparse.Namespace) -> list[Variant]:
    """The parsed ``--variant`` list (``default:`` when none) after checking the flags of
    :func:`add_run_args`."""
    variants = [parse_variant(text) for text in (a.variant or ["default:"])]
    if len({v.name for v in variants}) != len(variants):
        raise OptionError("--variant: two variants share a name")
    if len(set(a.seeds)) != len(a.seeds):
        raise OptionError(f"--seeds {' '.join(map(str, a.seeds))}: repeated seed")
    for flag in ("imageSize", "s1Epochs", "s1Files", "s1Batch", "s2Epochs", "s2Episodes", "s2Val", "s2Test",
                 "galleryNum"):
        if getattr(a, flag) < 1:
            raise OptionError(f"--{flag} must be at least 1, got {getattr(a, flag)}")
    return variants


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=HelpFormatter)
    add_run_args(p, "NAME[@REVISION]:FLAGS, repeated; the first is the baseline (default: one variant 'default:')")
    p.add_argument("--evalEpisodes", type=int, default=300, help="episodes of each stage-1 evaluation")
    p.add_argument("--preciseImages", type=int, default=1024, help="clean training images of the re-estimation")
    p.add_argument("--workdir", default="runs/outcome", help="folder of the runs, data, code trees and results")
    p.add_argument("--json", default=None, help="also write the summary to this file")
    return p


def prepare_data(a: argparse.Namespace, workdir: Path) -> Path:
    """The dataset root: ``--data`` as a folder, or the generated toy or emoji set (reused when its
    settings are the same)."""
    if a.data not in GENERATORS:
        root = Path(a.data).resolve()
        if not root.is_dir():
            raise OptionError(f"--data {a.data}: neither toy, emoji nor a dataset folder")
        return root
    generate, per_class = GENERATORS[a.data]
    params = {"per_class": a.perClass or per_class, "size": a.dataSize or math.ceil(a.imageSize * 256 / 224), "seed": 0}
    root = workdir / f"data_{a.data}_{params['size']}px_{params['per_class']}"
    marker = root / ".outcome_data.json"
    if not (marker.is_file() and json.loads(marker.read_text()) == params):
        print(f"generating {a.data} data in {root}", flush=True)
        generate(root, **params)
        marker.write_text(json.dumps(params))
    return root


def code_tree(revision: str | None, workdir: Path) -> tuple[Path, str]:
    """``(folder holding the scripts, commit)``: this checkout, or ``revision`` exported (``git archive``)
    into ``workdir/code/<commit>``."""
    def git(*args: str, **kwargs) -> subprocess.CompletedProcess:
        return subprocess.run(["git", "-C", str(REPO), *args], capture_output=True, check=False, **kwargs)

    head = git("rev-parse", "HEAD", text=True).stdout.strip() or "unknown"
    if revision is None:
        dirty = bool(git("status", "--porcelain", "--untracked-files=no", text=True).stdout.strip())
        return REPO, head + ("+uncommitted" if dirty else "")
    found = git("rev-parse", "--verify", f"{revision}^{{commit}}", text=True)
    if found.returncode:
        raise OptionError(f"--variant ...@{revision}: not a commit of {REPO}")
    commit = found.stdout.strip()
    tree = workdir / "code" / commit
    if not (tree / "classification.py").is_file():
        tree.mkdir(parents=True, exist_ok=True)
        archive = git("archive", commit)
        subprocess.run(["tar", "-x", "-C", str(tree)], input=archive.stdout, check=True)
    return tree, commit


def run_script(code: Path, script: str, flags: list[str], workdir: Path, log: Path) -> float:
    """Run ``code/script flags`` in ``workdir``, output to ``log``; the wall time in seconds."""
    log.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    with open(log, "w") as out:
        status = subprocess.run([sys.executable, str(code / script), *flags], cwd=workdir, stdout=out,
                                stderr=subprocess.STDOUT).returncode
    if status:
        tail = log.read_text().strip().splitlines()[-5:]
        raise RuntimeError(f"{script} exited with {status} (log {log}):\n" + "\n".join(tail))
    return time.perf_counter() - start


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


def script_flags(a: argparse.Namespace, root: Path, seed: int, start: str = "--overwrite") -> list[str]:
    """The flags both scripts get from the benchmark's own (``start``: ``--overwrite`` or ``--resume``)."""
    return ["--dataroot", str(root), "--imageSize", str(a.imageSize), "--seed", str(seed), "--nthreads",
            str(a.nthreads), "--progress", "0", start] + (["--device", a.device] if a.device else [])


def stage1_flags(a: argparse.Namespace, root: Path, seed: int, name: str, extra: tuple[str, ...]) -> list[str]:
    """``classification.py``'s command line for the stage-1 run ``name``."""
    return script_flags(a, root, seed) + ["--tensorname", name, "--numEpochs", str(a.s1Epochs),
                                          "--batchSize", str(a.s1Batch), "--filesPerClass", str(a.s1Files),
                                          "--valEpisodes", "0", *extra]


def stage2_flags(a: argparse.Namespace, root: Path, seed: int, network: str, name: str, extra: tuple[str, ...],
                 start: str = "--overwrite") -> list[str]:
    """``onlyBasetwoLoss.py``'s command line for the round-1 1-shot run ``name`` from ``network``
    (``start``: ``--overwrite``, or ``--resume`` to continue it)."""
    return script_flags(a, root, seed, start) + ["--network", network, "--tensorname", name, "--shots", "1",
                                          "--fixCls", "1", "--galleryNum", str(a.galleryNum), "--epoch",
                                          str(a.s2Episodes), "--numEpochs", str(a.s2Epochs), "--valEpisodes",
                                          str(a.s2Val), "--testEpisodes", str(a.s2Test), *extra]


def reusable(path: Path, settings: dict) -> dict | None:
    """The result saved at ``path`` when it was made with ``settings``, else None."""
    if path.is_file():
        saved = json.loads(path.read_text())
        if saved.get("settings") == settings:
            print(f"{path.stem}: reused {path}", flush=True)
            return saved
    return None


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
    result_path = workdir / "results" / f"{name}.json"
    saved = reusable(result_path, settings)
    if saved is not None:
        return saved
    print(f"{name}: stage 1", flush=True)
    result = {"variant": variant.name, "seed": seed, "settings": settings}
    result["stage1_s"] = run_script(code, "classification.py", stage1, workdir, workdir / "logs" / f"s1_{name}.log")
    row = read_csv(workdir / "runs" / f"s1_{name}" / "metrics.csv")[-1]
    result["s1_final_loss"], result["s1_images_per_s"] = float(row["loss"]), float(row["images_per_s"])
    result.update(evaluate_file(workdir / "models" / f"s1_{name}.t7", root, a, seed, device))
    print(f"{name}: stage 2", flush=True)
    result["stage2_s"] = run_script(code, "onlyBasetwoLoss.py", stage2, workdir, workdir / "logs" / f"s2_{name}.log")
    report = json.loads((workdir / "runs" / f"s2_{name}" / f"evaluate_1shot_seed{seed}.json").read_text())
    result.update(s2_test_acc=report["accuracy"], s2_test_plain=report["plain_accuracy"],
                  s2_difference=report["difference"])
    write_json(result_path, result)
    return result


def summarize(results: list[dict], variants: list[Variant], seeds: list[int]) -> dict:
    """Per variant and metric: mean, std and the seeds' values; per other variant: the paired
    difference from the first, its t-interval over the seeds, and whether it exceeds the noise."""
    by = {(r["variant"], r["seed"]): r for r in results}
    base = variants[0].name
    summary = {"variants": {}, "differences": {}}
    for v in variants:
        summary["variants"][v.name] = {}
        for metric in METRICS:
            values = [by[v.name, s][metric] for s in seeds]
            std = statistics.stdev(values) if len(values) > 1 else math.nan
            summary["variants"][v.name][metric] = {"mean": statistics.mean(values), "std": std, "values": values}
    for v in variants[1:]:
        summary["differences"][v.name] = {}
        for metric in METRICS:
            summary["differences"][v.name][metric] = t_interval([by[v.name, s][metric] - by[base, s][metric]
                                                                 for s in seeds])
    return summary


def t_interval(values: list[float]) -> dict:
    """Mean and 95 % t half-interval over a few seeds' values (nan for one), the values, and whether
    the interval leaves out 0 (``exceeds_noise``; None for one value)."""
    mean, half = mean_t_ci95(values)
    return {"mean": mean, "half_width_95": half, "values": values,
            "exceeds_noise": bool(abs(mean) > half) if len(values) > 1 else None}


def print_summary(summary: dict, variants: list[Variant], seeds: list[int]) -> None:
    base = variants[0].name
    names = [v.name for v in variants]
    header = ["metric"] + [f"{n} (mean +- std)" for n in names] + [f"{n} - {base} [95% t-interval]" for n in names[1:]]
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
        print(f"(each variant: {tests} accuracy comparisons at 95 %; when nothing differs, about "
              f"{tests / 20:.1f} of them "
              "exceed the noise by chance alone)")


def main(a: argparse.Namespace) -> int:
    variants = check_run_args(a)
    if a.evalEpisodes < 1:
        raise OptionError(f"--evalEpisodes must be at least 1, got {a.evalEpisodes}")
    if a.preciseImages < 2:
        raise OptionError(f"--preciseImages must be at least 2, got {a.preciseImages}")
    device = torch.device(a.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    workdir = Path(a.workdir).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    root = prepare_data(a, workdir)
    start, load_start = time.perf_counter(), os.getloadavg()[0]
    results = [run_one(v, seed, root, a, workdir, device) for seed in a.seeds for v in variants]
    summary = summarize(results, variants, a.seeds)
    summary["setup"] = {"argv": sys.argv[1:], "data": str(root), "device": str(device), "machine": platform.processor()
                        or platform.machine(), "cpu_count": os.cpu_count(), "torch": torch.__version__,
                        "load_avg_start": load_start, "load_avg_end": os.getloadavg()[0],
                        "wall_s": time.perf_counter() - start}
    write_csv(workdir / "outcome.csv", results, ["variant", "seed", *METRICS])
    write_json(workdir / "outcome.json", summary)
    if a.json:
        write_json(Path(a.json), summary)
    print_summary(summary, variants, a.seeds)
    print(json.dumps({"outcome": str(workdir / "outcome.json"), "wall_s": round(summary["setup"]["wall_s"], 1)}))
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main, get_args_parser()))
