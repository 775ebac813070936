"""Does the deformation help, and when? Stage 2's learning over seeds, measured along a long schedule.

Per seed one stage-1 network (``classification.py``) is trained and shared by every variant (a set of
stage-2 flags); each trains stage 2 round 1, 1-shot (``onlyBasetwoLoss.py --fixCls 1``) for ``--s2Epochs``
x ``--s2Episodes`` episodes. The curves come from each run's ``metrics.csv`` (paired val gain on the same
``--s2Val`` episodes, weight mean and spread, scale, prototype loss, same-class gallery picks), the end
from the script's test reports of the last epoch's weights (``--resume --testWeights last``) and of the
weights it kept (best val); every number over the seeds (mean, 95 % t-interval) with each variant's
paired difference from the first (docs/outcome.md, "Does the deformation help?").

    python -m benchmarks.study --data emoji --imageSize 32 --seeds 0 1 2 --s1Epochs 8 --s1Files 60 \\
        --s2Epochs 10 --s2Episodes 200 --s2Val 100 --s2Test 300 --device cpu \\
        --variant 'faithful:' --variant 'galleryEval:--galleryBN eval' \\
        --variant 'exclude:--galleryExclude episode' --variant 'scaleAuto:--scaleInit auto'

Finished runs are reused; a run asked for more epochs than it has is continued (``--resume``), so the
same command with a larger ``--s2Epochs`` extends a study, and an interrupted one goes on where it
stopped. Runs of the working tree are reused across commits (delete ``--workdir``'s ``results/`` after
changing what the scripts compute); a ``NAME@REVISION`` variant runs that commit's scripts. Output in
``--workdir``: ``study.json`` (summary), ``study.csv`` (every curve point), ``study.png`` (the figure).
"""
from __future__ import annotations

import sys
from pathlib import Path

if __spec__ is None:  # started as a file: the repository's packages import only under python -m
    sys.stderr.write(f"{sys.argv[0]}: run it from the repository root as python -m benchmarks.study\n")
    sys.exit(2)

from utils.runtime import set_process_env

set_process_env()  # before torch loads, as in the scripts

import argparse
import json
import math
import shlex

from benchmarks.outcome import run_parser, run_setup, stage1_flags, stage2_flags, start_runs
from engine.experiments import REPO, Variant, code_tree, compare, evaluate_path, over_seeds, recorded, run_checked
from utils.files import read_csv, write_csv, write_json
from utils.options import run_cli

# Per-epoch columns of a stage-2 metrics.csv the curves keep, by the study's name.
CURVE_COLUMNS = {"val_acc": "select_acc", "val_plain": "select_plain_acc", "weight_mean": "weight_mean",
                 "weight_std": "weight_std", "scale": "scale", "proto_loss": "proto_loss",
                 "gallery_same_class": "train_gallery_same_class", "val_weight_mean": "select_weight_mean"}
CURVE_FIELDS = ["variant", "seed", "epoch", "episodes", "val_gain", *CURVE_COLUMNS]
# End-of-schedule numbers: the last epoch's curve point, the test report of the last epoch's weights
# (test_last_*) and that of the weights the script keeps (test_*: best val accuracy with deformation).
END_METRICS = ["val_gain", "val_acc", "val_plain", "weight_mean", "weight_std", "scale", "proto_loss",
               "gallery_same_class", "test_last_gain", "test_last_acc", "test_last_plain", "test_gain", "test_acc",
               "test_plain"]


def get_args_parser() -> argparse.ArgumentParser:
    p = run_parser(__doc__.splitlines()[0], "NAME[@REVISION]:FLAGS, stage-2 flags, repeated; the first is the "
                   "baseline of the paired differences (default: one variant 'default:')", "runs/study")
    p.add_argument("--s1Flags", default="", help="extra flags of every stage-1 run (one network per seed)")
    p.add_argument("--figure", default=None, help="the figure's path (default: study.png in --workdir)")
    p.set_defaults(s1Epochs=8, s1Files=60, s2Epochs=10, s2Episodes=200, s2Val=100)
    return p


def run_stage1(a: argparse.Namespace, root: Path, seed: int, workdir: Path) -> dict:
    """The seed's stage-1 network ``models/s1_seed<S>.t7``, trained unless a run with the same flags
    made it; returns its record (settings, time)."""
    name = f"s1_seed{seed}"
    flags = stage1_flags(a, root, seed, name, tuple(shlex.split(a.s1Flags)))
    path = workdir / "results" / f"{name}.json"
    saved = recorded(path, {"stage1": flags})
    if saved is not None and (workdir / "models" / f"{name}.t7").is_file():
        print(f"{name}: reused {path}", flush=True)
        return saved
    print(f"{name}: stage 1", flush=True)
    record = {"settings": {"stage1": flags}, "stage1_s": run_checked(
        [sys.executable, str(REPO / "classification.py"), *flags], workdir / "logs" / f"{name}.log", workdir)}
    write_json(path, record)
    return record


def run_stage2(variant: Variant, seed: int, a: argparse.Namespace, root: Path, workdir: Path, stage1: dict) -> dict:
    """One variant's stage-2 run of ``seed`` for ``--s2Epochs`` epochs: reused when done, continued
    (``--resume``) when it has fewer, started anew otherwise; returns its curve and test report."""
    code, commit = code_tree(variant.revision, workdir)
    name = f"{variant.name}_seed{seed}"
    flags = stage2_flags(a, root, seed, f"s1_seed{seed}", f"s2_{name}", variant.stage2_flags)
    at, start_at = flags.index("--numEpochs"), flags.index("--overwrite")
    settings = {"commit": commit if variant.revision else "working tree", "stage1": stage1["settings"]["stage1"],
                "stage2": flags[:at] + flags[at + 2:]}
    path, run_dir = workdir / "results" / f"{name}.json", workdir / "runs" / f"s2_{name}"
    saved = recorded(path, settings)
    trained = saved is not None and saved.get("done") and saved["epochs"] == a.s2Epochs
    if trained and "test_last_gain" in saved["end"]:
        print(f"{name}: reused {path}", flush=True)
        return saved
    command, log = [sys.executable, str(code / "onlyBasetwoLoss.py")], workdir / "logs" / f"s2_{name}.log"
    spent = saved.get("stage2_s", 0.0) if saved else 0.0
    if not trained:
        resume = saved is not None and (run_dir / "resume.pt").is_file() and saved["epochs"] <= a.s2Epochs
        print(f"{name}: stage 2" + (f", continued to {a.s2Epochs} epochs" if resume else ""), flush=True)
        write_json(path, {"settings": settings, "epochs": a.s2Epochs, "done": False})
        flags[start_at] = "--resume" if resume else "--overwrite"
        spent += run_checked([*command, *flags], log, workdir)
    # The last epoch's weights on the same test episodes, with the run's own gallery features and
    # statistics (a resumed finished run only evaluates).
    flags[start_at] = "--resume"
    spent += run_checked([*command, *flags, "--testWeights", "last"], log.with_name(f"s2_{name}_last.log"), workdir)
    curve = []
    for row in read_csv(run_dir / "metrics.csv"):
        point = {"epoch": int(row["epoch"]), "episodes": (int(row["epoch"]) + 1) * a.s2Episodes}
        point.update({key: float(row[column]) if row[column] != "" else math.nan
                      for key, column in CURVE_COLUMNS.items()})
        curve.append({**point, "val_gain": point["val_acc"] - point["val_plain"]})
    end = {key: curve[-1][key] for key in END_METRICS if key in curve[-1]}
    for kind, suffix in (("test", ""), ("test_last", "_last")):
        report = json.loads(evaluate_path(run_dir, 1, seed, suffix).read_text())
        end.update({f"{kind}_gain": report["difference"], f"{kind}_acc": report["accuracy"],
                    f"{kind}_plain": report["plain_accuracy"]})
    result = {"variant": variant.name, "seed": seed, "settings": settings, "epochs": a.s2Epochs, "done": True,
              "commit": commit, "stage2_s": spent, "curve": curve, "end": end}
    write_json(path, result)
    return result


def summarize(results: list[dict], variants: list[Variant], seeds: list[int]) -> dict:
    """Per variant: each end-of-schedule number over the seeds (mean, std, 95 % t half-interval, values),
    and the curves' per epoch; per other variant: the paired difference from the first."""
    by = {(r["variant"], r["seed"]): r for r in results}
    summary = compare({key: r["end"] for key, r in by.items()}, [v.name for v in variants], seeds, END_METRICS,
                      ["val_gain", "test_last_gain", "test_gain", "test_last_acc"])
    summary["curves"] = {}
    for v in variants:
        runs = [by[v.name, s] for s in seeds]
        summary["variants"][v.name]["flags"] = " ".join(v.stage2_flags)
        summary["curves"][v.name] = [
            {"episodes": runs[0]["curve"][i]["episodes"],
             **{key: over_seeds([r["curve"][i][key] for r in runs]) for key in ("val_gain", "weight_mean", "scale",
                                                                                "gallery_same_class")}}
            for i in range(min(len(r["curve"]) for r in runs))]
    return summary


def table(summary: dict, variants: list[Variant], seeds: list[int]) -> str:
    """The end-of-schedule table (markdown), as the README shows it."""
    rows = [("paired test gain, last weights", "test_last_gain", 2), ("paired val gain, last weights", "val_gain", 2),
            ("paired test gain, kept weights (best val)", "test_gain", 2),
            ("test accuracy with deformation, last weights", "test_last_acc", 2),
            ("test accuracy without", "test_last_plain", 2),
            ("weight mean", "weight_mean", 3), ("weight spread (std)", "weight_std", 3), ("scale", "scale", 4),
            ("prototype loss", "proto_loss", 3), ("same-class gallery picks", "gallery_same_class", 3)]
    names = [v.name for v in variants]
    lines = [f"{len(seeds)} seed(s) ({' '.join(map(str, seeds))}); mean +- 95 % t half-interval over the seeds "
             "(none for one seed); accuracies and gains in points",
             "| | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for label, key, digits in rows:
        cells = []
        for n in names:
            s = summary["variants"][n][key]
            form = ("+." if key.endswith("gain") else ".") + f"{digits}{'g' if key == 'scale' else 'f'}"
            text = format(s["mean"], form)
            if len(seeds) > 1:
                text += f" +- {format(s['half_width_95'], form.lstrip('+'))}" + (" *" if key.endswith("gain")
                                                                                  and s["exceeds_noise"] else "")
            cells.append(text)
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    for n in names[1:]:
        d = summary["differences"][n]["test_last_gain"]
        text = f"{d['mean']:+.2f}" + ("" if len(seeds) < 2 else f" +- {d['half_width_95']:.2f}" + (
            " (exceeds noise)" if d["exceeds_noise"] else " (within noise)"))
        lines.append(f"| test gain (last weights), {n} - {names[0]} | " + " | ".join(
            text if m == n else "" for m in names) + " |")
    lines.append("(* the gain's interval leaves out 0)")
    return "\n".join(lines)


def write_figure(summary: dict, variants: list[Variant], path: Path) -> Path:
    """Paired val gain, weight mean, scale and same-class share against training episodes, one line per
    variant (mean over seeds) in a band from the lowest to the highest seed."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("val_gain", "paired val gain (points)", "linear"),
              ("weight_mean", "weight mean (1: the probe)", "linear"),
              ("scale", "scale", "log"), ("gallery_same_class", "same-class gallery picks", "linear")]
    figure, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.6))
    for axis, (key, title, yscale) in zip(axes, panels):
        for v in variants:
            curve = summary["curves"][v.name]
            x = [p["episodes"] for p in curve]
            line, = axis.plot(x, [p[key]["mean"] for p in curve], marker="o", markersize=3, label=v.name)
            axis.fill_between(x, [min(p[key]["values"]) for p in curve], [max(p[key]["values"]) for p in curve],
                              color=line.get_color(), alpha=0.18)
        if key == "val_gain":
            axis.axhline(0.0, color="black", linewidth=0.8)
        axis.set_yscale(yscale)
        axis.set_title(title)
        axis.set_xlabel("training episodes")
    axes[0].legend(fontsize=8)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def main(a: argparse.Namespace) -> int:
    variants, workdir, root, started = start_runs(a)
    results = []
    for seed in a.seeds:
        stage1 = run_stage1(a, root, seed, workdir)
        results += [run_stage2(v, seed, a, root, workdir, stage1) for v in variants]
    summary = summarize(results, variants, a.seeds)
    summary["setup"] = run_setup(root, started, stage2_s={f"{r['variant']}_seed{r['seed']}": r["stage2_s"]
                                                                    for r in results})
    write_csv(workdir / "study.csv", [{"variant": r["variant"], "seed": r["seed"], **p} for r in results
                                      for p in r["curve"]], CURVE_FIELDS)
    write_json(workdir / "study.json", summary)
    figure = write_figure(summary, variants, Path(a.figure) if a.figure else workdir / "study.png")
    print("\n" + table(summary, variants, a.seeds))
    print(json.dumps({"study": str(workdir / "study.json"), "figure": str(figure),
                      "wall_s": round(summary["setup"]["wall_s"], 1)}))
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main, get_args_parser()))
