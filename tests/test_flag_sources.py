"""Every script keeps its flags (the contract: the snapshot below, recorded from each parser before the
flags were declared once), and the flags every script shares are declared in one source line each."""
from __future__ import annotations

import argparse
import os
import re
import typing
from dataclasses import asdict, fields
from pathlib import Path

import pytest
import torch

import datasets.check
import datasets.emoji
import datasets.toy
import engine.options
from engine.lowshot import lowshot_config
from engine.options import lowshot_parser, stage1_config, stage1_parser, stage2_config, stage2_parser
from tests.scripts_helpers import load_script

REPO = Path(__file__).resolve().parent.parent
CPUS = 64  # the machine-dependent defaults (the usable CPU cores, capped) as for a process that may use 64 cores
ACTIONS = {argparse._StoreAction: "store", argparse._StoreTrueAction: "store_true",
           argparse._AppendAction: "append"}

# {script: {flag: (default, choices, required, type name, nargs, action)}}, recorded with os.cpu_count() = 64
# (now pinned by :func:`as_on_cpus`: the cores a process may use, utils.cpus.usable_cpus, are 64)
# from the parsers of commit 74368f7, before the flags were declared once.
SNAPSHOT = {
    "classification.py": {
        "--dataroot": ("data/miniImageNet", None, False, None, None, "store"),
        "--lowshotmeta": (None, None, False, None, None, "store"),
        "--imageSize": (224, None, False, "int", None, "store"),
        "--Fang": (3, None, False, "int", None, "store"),
        "--tensorname": (None, None, True, None, None, "store"),
        "--network": ("None", None, False, None, None, "store"),
        "--LR": (0.001, None, False, "float", None, "store"),
        "--batchSize": (128, None, False, "int", None, "store"),
        "--nthreads": (4, None, False, "int", None, "store"),
        "--device": (None, None, False, None, None, "store"),
        "--seed": (0, None, False, "int", None, "store"),
        "--amp": (0, (0, 1), False, "int", None, "store"),
        "--deterministic": (0, (0, 1), False, "int", None, "store"),
        "--tf32": (1, (0, 1), False, "int", None, "store"),
        "--memoryFormat": ("channels_last", ("channels_last", "contiguous"), False, None, None, "store"),
        "--resume": (False, None, False, None, 0, "store_true"),
        "--overwrite": (False, None, False, None, 0, "store_true"),
        "--skipBadImages": (False, None, False, None, 0, "store_true"),
        "--progress": (None, (0, 1), False, "int", None, "store"),
        "--numEpochs": (35, None, False, "int", None, "store"),
        "--backbone": (None, ("resnet10", "resnet18", "resnet50"), False, None, None, "store"),
        "--filesPerClass": (500, None, False, "int", None, "store"),
        "--crop": ("tv02", ("tv02", "current"), False, None, None, "store"),
        "--valEvery": (5, None, False, "int", None, "store"),
        "--valEpisodes": (600, None, False, "int", None, "store"),
        "--valQueries": (15, None, False, "int", None, "store"),
        "--preciseBN": (0, None, False, "int", None, "store"),
    },
    "onlyBasetwoLoss.py": {
        "--dataroot": ("data/miniImageNet", None, False, None, None, "store"),
        "--lowshotmeta": (None, None, False, None, None, "store"),
        "--imageSize": (224, None, False, "int", None, "store"),
        "--Fang": (3, None, False, "int", None, "store"),
        "--tensorname": (None, None, True, None, None, "store"),
        "--network": ("None", None, False, None, None, "store"),
        "--LR": (0.001, None, False, "float", None, "store"),
        "--batchSize": (None, None, False, "int", None, "store"),
        "--nthreads": (4, None, False, "int", None, "store"),
        "--device": (None, None, False, None, None, "store"),
        "--seed": (0, None, False, "int", None, "store"),
        "--amp": (0, (0, 1), False, "int", None, "store"),
        "--deterministic": (0, (0, 1), False, "int", None, "store"),
        "--tf32": (1, (0, 1), False, "int", None, "store"),
        "--memoryFormat": ("channels_last", ("channels_last", "contiguous"), False, None, None, "store"),
        "--resume": (False, None, False, None, 0, "store_true"),
        "--overwrite": (False, None, False, None, 0, "store_true"),
        "--skipBadImages": (False, None, False, None, 0, "store_true"),
        "--progress": (None, (0, 1), False, "int", None, "store"),
        "--GNet": ("None", None, False, None, None, "store"),
        "--shots": (1, None, False, "int", None, "store"),
        "--ways": (5, None, False, "int", None, "store"),
        "--trainways": (5, None, False, "int", None, "store"),
        "--test_num": (15, None, False, "int", None, "store"),
        "--augnum": (None, None, False, "int", None, "store"),
        "--chooseNum": (None, None, False, "int", None, "store"),
        "--galleryNum": (30, None, False, "int", None, "store"),
        "--epoch": (600, None, False, "int", None, "store"),
        "--numEpochs": (120, None, False, "int", None, "store"),
        "--clsLR": (0.001, None, False, "float", None, "store"),
        "--fixCls": (0, (0, 1), False, "int", None, "store"),
        "--fixAttention": (0, (0, 1), False, "int", None, "store"),
        "--fixScale": (0, (0, 1), False, "int", None, "store"),
        "--scaleInit": (None, None, False, "scale_init", None, "store"),
        "--deformNet": ("small", ("small", "twobranch"), False, None, None, "store"),
        "--deform": ("learned", ("learned", "random", "none"), False, None, None, "store"),
        "--gallerySelect": ("nearest", ("nearest", "random"), False, None, None, "store"),
        "--galleryExclude": ("none", ("none", "episode"), False, None, None, "store"),
        "--galleryBN": ("train", ("train", "eval"), False, None, None, "store"),
        "--selectOn": ("val", ("val", "test"), False, None, None, "store"),
        "--testWeights": ("kept", ("kept", "last"), False, None, None, "store"),
        "--overlap": (0, (0, 1), False, "int", None, "store"),
        "--valEpisodes": (600, None, False, "int", None, "store"),
        "--dataParallel": (0, (0, 1), False, "int", None, "store"),
        "--evaluate": (False, None, False, None, 0, "store_true"),
        "--testEpisodes": (600, None, False, "int", None, "store"),
    },
    "lowshot_imagenet.py": {
        "--imagenet": (None, None, True, None, None, "store"),
        "--lowshotmeta": (None, None, True, None, None, "store"),
        "--experimentpath": (None, None, True, None, None, "store"),
        "--trainlist": (None, None, False, None, None, "store"),
        "--tensorname": (None, None, True, None, None, "store"),
        "--GNet": ("None", None, False, None, None, "store"),
        "--network": ("None", None, False, None, None, "store"),
        "--testsetup": (1, (0, 1), False, "int", None, "store"),
        "--trials": ([1, 2, 3, 4, 5], None, False, "int", "+", "store"),
        "--lowshotn": ([1, 2, 5, 10, 20], None, False, "int", "+", "store"),
        "--augnum": (None, None, False, "int", None, "store"),
        "--chooseNum": (None, None, False, "int", None, "store"),
        "--galleryNum": (30, None, False, "int", None, "store"),
        "--deform": ("learned", ("learned", "random", "none"), False, None, None, "store"),
        "--gallerySelect": ("nearest", ("nearest", "random"), False, None, None, "store"),
        "--deformNet": ("small", ("small", "twobranch"), False, None, None, "store"),
        "--imageSize": (224, None, False, "int", None, "store"),
        "--Fang": (3, None, False, "int", None, "store"),
        "--batchSize": (None, None, False, "int", None, "store"),
        "--nthreads": (4, None, False, "int", None, "store"),
        "--device": (None, None, False, None, None, "store"),
        "--seed": (0, None, False, "int", None, "store"),
        "--amp": (0, (0, 1), False, "int", None, "store"),
        "--deterministic": (0, (0, 1), False, "int", None, "store"),
        "--tf32": (1, (0, 1), False, "int", None, "store"),
        "--progress": (None, (0, 1), False, "int", None, "store"),
    },
    "benchmarks/episode.py": {
        "--dataroot": (None, None, False, None, None, "store"),
        "--toyDir": (None, None, False, None, None, "store"),
        "--toySize": (None, None, False, "int", None, "store"),
        "--imageSize": (224, None, False, "int", None, "store"),
        "--device": (None, None, False, None, None, "store"),
        "--amp": (False, None, False, None, 0, "store_true"),
        "--warmup": (2, None, False, "int", None, "store"),
        "--nthreads": (4, None, False, "int", None, "store"),
        "--torchThreads": (None, None, False, "int", None, "store"),
        "--pssInterval": (2.0, None, False, "float", None, "store"),
        "--seed": (0, None, False, "int", None, "store"),
        "--json": (None, None, False, None, None, "store"),
        "--shots": (1, None, False, "int", None, "store"),
        "--ways": (5, None, False, "int", None, "store"),
        "--queries": (15, None, False, "int", None, "store"),
        "--augnum": (None, None, False, "int", None, "store"),
        "--chooseNum": (None, None, False, "int", None, "store"),
        "--galleryNum": (30, None, False, "int", None, "store"),
        "--fixCls": (1, (0, 1), False, "int", None, "store"),
        "--deformNet": ("small", ("small", "twobranch"), False, None, None, "store"),
        "--batchSize": (None, None, False, "int", None, "store"),
        "--episodes": (5, None, False, "int", None, "store"),
        "--testEpisodes": (None, None, False, "int", None, "store"),
        "--rounds": (1, None, False, "int", None, "store"),
        "--skipTest": (False, None, False, None, 0, "store_true"),
        "--passEpisodes": (30, None, False, "int", None, "store"),
    },
    "benchmarks/stage1.py": {
        "--dataroot": (None, None, False, None, None, "store"),
        "--toyDir": (None, None, False, None, None, "store"),
        "--toySize": (None, None, False, "int", None, "store"),
        "--imageSize": (224, None, False, "int", None, "store"),
        "--device": (None, None, False, None, None, "store"),
        "--amp": (False, None, False, None, 0, "store_true"),
        "--warmup": (2, None, False, "int", None, "store"),
        "--nthreads": (4, None, False, "int", None, "store"),
        "--torchThreads": (None, None, False, "int", None, "store"),
        "--pssInterval": (2.0, None, False, "float", None, "store"),
        "--seed": (0, None, False, "int", None, "store"),
        "--json": (None, None, False, None, None, "store"),
        "--toyPerClass": (30, None, False, "int", None, "store"),
        "--batchSize": (128, None, False, "int", None, "store"),
        "--filesPerClass": (500, None, False, "int", None, "store"),
        "--steps": (5, None, False, "int", None, "store"),
        "--monitorEpisodes": (30, None, False, "int", None, "store"),
        "--monitorQueries": (15, None, False, "int", None, "store"),
    },
    "benchmarks/outcome.py": {
        "--variant": ([], None, False, None, None, "append"),
        "--seeds": ([0, 1, 2], None, False, "int", "+", "store"),
        "--data": ("toy", None, False, None, None, "store"),
        "--perClass": (None, None, False, "int", None, "store"),
        "--dataSize": (None, None, False, "int", None, "store"),
        "--imageSize": (32, None, False, "int", None, "store"),
        "--s1Epochs": (4, None, False, "int", None, "store"),
        "--s1Files": (20, None, False, "int", None, "store"),
        "--s1Batch": (64, None, False, "int", None, "store"),
        "--s2Epochs": (2, None, False, "int", None, "store"),
        "--s2Episodes": (60, None, False, "int", None, "store"),
        "--s2Val": (50, None, False, "int", None, "store"),
        "--s2Test": (300, None, False, "int", None, "store"),
        "--galleryNum": (10, None, False, "int", None, "store"),
        "--device": (None, None, False, None, None, "store"),
        "--nthreads": (2, None, False, "int", None, "store"),
        "--evalEpisodes": (300, None, False, "int", None, "store"),
        "--preciseImages": (1024, None, False, "int", None, "store"),
        "--workdir": ("runs/outcome", None, False, None, None, "store"),
        "--json": (None, None, False, None, None, "store"),
    },
    "benchmarks/study.py": {
        "--variant": ([], None, False, None, None, "append"),
        "--seeds": ([0, 1, 2], None, False, "int", "+", "store"),
        "--data": ("toy", None, False, None, None, "store"),
        "--perClass": (None, None, False, "int", None, "store"),
        "--dataSize": (None, None, False, "int", None, "store"),
        "--imageSize": (32, None, False, "int", None, "store"),
        "--s1Epochs": (8, None, False, "int", None, "store"),
        "--s1Files": (60, None, False, "int", None, "store"),
        "--s1Batch": (64, None, False, "int", None, "store"),
        "--s2Epochs": (10, None, False, "int", None, "store"),
        "--s2Episodes": (200, None, False, "int", None, "store"),
        "--s2Val": (100, None, False, "int", None, "store"),
        "--s2Test": (300, None, False, "int", None, "store"),
        "--galleryNum": (10, None, False, "int", None, "store"),
        "--device": (None, None, False, None, None, "store"),
        "--nthreads": (2, None, False, "int", None, "store"),
        "--s1Flags": ("", None, False, None, None, "store"),
        "--workdir": ("runs/study", None, False, None, None, "store"),
        "--figure": (None, None, False, None, None, "store"),
    },
    "benchmarks/ops.py": {
        "--dataroot": (None, None, False, None, None, "store"),
        "--toyDir": (None, None, False, None, None, "store"),
        "--toySize": (None, None, False, "int", None, "store"),
        "--imageSize": (32, None, False, "int", None, "store"),
        "--device": ("cpu", None, False, None, None, "store"),
        "--amp": (False, None, False, None, 0, "store_true"),
        "--warmup": (2, None, False, "int", None, "store"),
        "--nthreads": (0, None, False, "int", None, "store"),
        "--torchThreads": (None, None, False, "int", None, "store"),
        "--pssInterval": (2.0, None, False, "float", None, "store"),
        "--seed": (0, None, False, "int", None, "store"),
        "--json": (None, None, False, None, None, "store"),
        "--shots": (1, None, False, "int", None, "store"),
        "--ways": (5, None, False, "int", None, "store"),
        "--queries": (15, None, False, "int", None, "store"),
        "--augnum": (7, None, False, "int", None, "store"),
        "--chooseNum": (15, None, False, "int", None, "store"),
        "--galleryNum": (15, None, False, "int", None, "store"),
        "--deformNet": ("small", ("small", "twobranch"), False, None, None, "store"),
        "--batchSize": (None, None, False, "int", None, "store"),
        "--short": (8, None, False, "int", None, "store"),
        "--long": (24, None, False, "int", None, "store"),
        "--top": (12, None, False, "int", None, "store"),
    },
    "scripts/gpu_check.py": {
        "--device": (None, None, False, None, None, "store"),
        "--imageSize": (224, None, False, "int", None, "store"),
        "--batchSize": (None, None, False, "int", None, "store"),
        "--quick": (False, None, False, None, 0, "store_true"),
        "--dataroot": (None, None, False, None, None, "store"),
        "--workdir": ("runs/gpu_check", None, False, None, None, "store"),
        "--json": ("gpu_check.json", None, False, None, None, "store"),
        "--nthreads": (8, None, False, "int", None, "store"),
        "--outcomeSeeds": (2, None, False, "int", None, "store"),
        "--budget": (None, None, False, "float", None, "store"),
        "--distributedChecks": (None, (0, 1), False, "int", None, "store"),
        "--worker": (None, ("stage1", "steps", "nan"), False, None, None, "store"),
        "stage1Flags": (None, None, True, None, "*", "store"),
    },
    "scripts/precise_bn.py": {
        "--checkpoint": (None, None, True, None, None, "store"),
        "--dataroot": ("data/miniImageNet", None, False, None, None, "store"),
        "--lowshotmeta": (None, None, False, None, None, "store"),
        "--imageSize": (224, None, False, "int", None, "store"),
        "--images": (1024, None, False, "int", None, "store"),
        "--filesPerClass": (500, None, False, "int", None, "store"),
        "--batchSize": (128, None, False, "int", None, "store"),
        "--seed": (0, None, False, "int", None, "store"),
        "--out": (None, None, False, None, None, "store"),
        "--device": (None, None, False, None, None, "store"),
        "--nthreads": (4, None, False, "int", None, "store"),
        "--progress": (1, (0, 1), False, "int", None, "store"),
    },
    "scripts/sweep.py": {
        "--grid": ([], None, False, None, None, "append"),
        "--jobs": (None, None, False, "int", None, "store"),
        "--perGPU": (None, None, False, "int", None, "store"),
        "--slurm": (False, None, False, None, 0, "store_true"),
        "--dryRun": (False, None, False, None, 0, "store_true"),
        "--partition": (None, None, False, None, None, "store"),
        "--gpusPerTask": (None, None, False, "int", None, "store"),
        "--gres": (None, None, False, None, None, "store"),
        "--cpusPerTask": (None, None, False, "int", None, "store"),
        "--mem": (None, None, False, None, None, "store"),
        "--time": (None, None, False, None, None, "store"),
        "--maxParallel": (None, None, False, "int", None, "store"),
        "--runIndex": (None, None, False, "int", None, "store"),
        "--summarize": (False, None, False, None, 0, "store_true"),
    },
    "scripts/demo_estimate.py": {
        "--dataroot": (None, None, True, None, None, "store"),
        "--imageSize": (None, None, True, "int", None, "store"),
        "--nthreads": (2, None, False, "int", None, "store"),
        "--stage1Epochs": (None, None, True, "int", None, "store"),
        "--stage1Batch": (None, None, True, "int", None, "store"),
        "--filesPerClass": (None, None, True, "int", None, "store"),
        "--monitorEpisodes": (None, None, True, "int", None, "store"),
        "--stage2Epochs": (None, None, True, "int", None, "store"),
        "--episodes": (None, None, True, "int", None, "store"),
        "--galleryNum": (None, None, True, "int", None, "store"),
        "--valEpisodes": (None, None, True, "int", None, "store"),
        "--testEpisodes": (None, None, True, "int", None, "store"),
        "--evalEpisodes": (None, None, True, "int", None, "store"),
    },
    "datasets/check.py": {
        "--dataroot": (None, None, True, None, None, "store"),
        "--full": (False, None, False, None, 0, "store_true"),
        "--nthreads": (8, None, False, "int", None, "store"),
    },
    "scripts/make_miniimagenet.py": {
        "--imagenet": (None, None, True, "Path", None, "store"),
        "--splits": (None, None, True, "Path", None, "store"),
        "--out": (None, None, True, "Path", None, "store"),
        "--size": (None, None, False, "positive_int", None, "store"),
        "--nthreads": (64, None, False, "positive_int", None, "store"),
    },
    "datasets/toy.py": {
        "--out": (None, None, True, "Path", None, "store"),
        "--perClass": (30, None, False, "int", None, "store"),
        "--size": (96, None, False, "int", None, "store"),
        "--seed": (0, None, False, "int", None, "store"),
    },
    "datasets/emoji.py": {
        "--out": (None, None, True, "Path", None, "store"),
        "--perClass": (60, None, False, "int", None, "store"),
        "--size": (96, None, False, "int", None, "store"),
        "--seed": (0, None, False, "int", None, "store"),
        "--font": (Path("/usr/share/fonts/truetype/noto/NotoColorEmoji.ttf"), None, False, "Path", None, "store"),
    },
}


# What changed on purpose: the benchmarks' --amp was a switch; it takes 0/1 as everywhere else. The ops
# benchmark's --augnum and --chooseNum were 7 and 15 whatever --shots; they take the scripts' shot-dependent
# defaults (the same 7 and 15 for its default, 1 shot), declared once with the episode benchmark's.
AMP_01 = (0, (0, 1), False, "int", None, "store")
SHOT_DEPENDENT = (None, None, False, "int", None, "store")
CHANGED = {("benchmarks/episode.py", "--amp"): AMP_01, ("benchmarks/stage1.py", "--amp"): AMP_01,
           ("benchmarks/ops.py", "--amp"): AMP_01, ("benchmarks/ops.py", "--augnum"): SHOT_DEPENDENT,
           ("benchmarks/ops.py", "--chooseNum"): SHOT_DEPENDENT}
ADDED = {"scripts/gpu_check.py": {"--loaderSizes": (None, None, False, "int", "*", "store")},  # since the snapshot
         "datasets/toy.py": {"--nthreads": (8, None, False, "int", None, "store")}}
GETTERS = {"scripts/sweep.py": "get_parser"}
MODULES = {"datasets/check.py": datasets.check, "datasets/toy.py": datasets.toy, "datasets/emoji.py": datasets.emoji}


def parser_of(script: str) -> argparse.ArgumentParser:
    """The script's parser (a module's run with ``python -m``)."""
    if script in MODULES:
        return MODULES[script].get_args_parser()
    return getattr(load_script(script), GETTERS.get(script, "get_args_parser"))()


def listing(parser: argparse.ArgumentParser) -> dict[str, tuple]:
    """``{flag: (default, choices, required, type name, nargs, action)}``; a positional by its name."""
    out = {}
    for action in parser._actions:
        if isinstance(action, argparse._HelpAction):
            continue
        key = action.option_strings[0] if action.option_strings else action.dest
        assert action.option_strings in ([key], []) and action.dest == key.lstrip("-"), key
        out[key] = (action.default, None if action.choices is None else tuple(action.choices), action.required,
                    None if action.type is None else action.type.__name__, action.nargs,
                    ACTIONS.get(type(action), type(action).__name__))
    return out


def as_on_cpus(monkeypatch, cpus: int) -> None:
    """The machine-dependent defaults as for a process that may use ``cpus`` cores: the machine's count,
    the process's affinity (:func:`utils.cpus.usable_cpus` reads it) and no SLURM allocation."""
    monkeypatch.setattr(os, "cpu_count", lambda: cpus)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(cpus)), raising=False)
    monkeypatch.delenv("SLURM_CPUS_PER_TASK", raising=False)


@pytest.mark.parametrize("script", list(SNAPSHOT))
def test_every_flag_keeps_its_name_default_choices_and_type(script: str, monkeypatch) -> None:
    as_on_cpus(monkeypatch, CPUS)
    expected = {flag: CHANGED.get((script, flag), row) for flag, row in SNAPSHOT[script].items()}
    expected.update(ADDED.get(script, {}))
    parser = parser_of(script)
    assert listing(parser) == expected
    shown = parser.format_help()  # --help prints every flag
    assert all(flag in shown for flag in expected if flag.startswith("--")), shown


def source_files() -> list[Path]:
    """The repository's Python outside tests/."""
    folders = ("utils", "datasets", "models", "engine", "scripts", "benchmarks")
    return sorted(REPO.glob("*.py")) + sorted(p for folder in folders for p in (REPO / folder).rglob("*.py"))


@pytest.mark.parametrize("flag", ["--nthreads", "--imageSize", "--device", "--amp", "--seed", "--dataroot",
                                  "--progress", "--lowshotmeta", "--network", "--GNet", "--Fang", "--filesPerClass",
                                  "--tensorname"])
def test_a_shared_flag_is_declared_in_one_source_line(flag: str) -> None:
    declaration = re.compile(r"add_argument\(\s*[\"']" + re.escape(flag) + r"[\"']")
    lines = [f"{path.relative_to(REPO)}:{text.count(chr(10), 0, found.start()) + 1}"
             for path in source_files() for text in [path.read_text()] for found in declaration.finditer(text)]
    assert len(lines) == 1, lines


@pytest.mark.parametrize("shots", [1, 2, 5])
def test_stage_2_and_the_lowshot_evaluation_take_the_same_shot_defaults(shots: int) -> None:
    stage2 = stage2_config(torch.device("cpu"), tensorname="t", network="n", shots=shots)
    lowshot = lowshot_parser().parse_args(["--imagenet", "i", "--lowshotmeta", "m", "--experimentpath", "e",
                                           "--tensorname", "t", "--GNet", "g", "--batchSize", "4"])
    config = lowshot_config(lowshot, shots, 5)
    assert (config.augnum, config.choose_num) == (stage2.augnum, stage2.chooseNum)
    assert (stage2.augnum, stage2.chooseNum) == ((7, 15) if shots == 1 else (5, 30))  # the original's


def test_the_configurations_record_every_flag_under_its_name() -> None:
    """args.json and resume.pt hold ``asdict(config)``: the parsed flags, names and values, where
    nothing is left to resolve (a resumed run compares them key by key)."""
    flags = vars(stage1_parser().parse_args(["--tensorname", "t"]))
    assert asdict(stage1_config(**flags)) == flags
    flags = vars(stage2_parser().parse_args(["--tensorname", "t", "--network", "n", "--batchSize", "8", "--augnum",
                                             "3", "--chooseNum", "4"]))
    assert asdict(stage2_config(torch.device("cpu"), **flags)) == flags


@pytest.mark.parametrize("parser,config", [(stage1_parser, "Stage1Config"), (stage2_parser, "Stage2Config"),
                                           (lowshot_parser, "LowShotConfig")])
def test_every_configuration_field_is_typed_as_its_flag_parses(parser, config: str) -> None:
    """Each field's type holds the value the flag parses to, whether given (a sample of its type) or left at
    its default; a switch is a bool, a flag of several values a list, a required flag never None."""
    types = {field.name: field.type for field in fields(getattr(engine.options, config))}
    actions = [action for action in parser()._actions if action.dest != "help"]
    assert list(types) == [action.dest for action in actions]
    samples = {int: "3", float: "0.5", str: "x"}
    for action in actions:
        kind = types[action.dest]
        values = [] if action.required else [action.default]  # a required flag is never left at its default
        if action.type in samples:
            value = action.type(samples[action.type])
            values.append([value] if action.nargs in ("+", "*") else value)
        if action.nargs == 0:
            assert kind is bool, action.dest
        if action.required:
            assert not isinstance(None, kind), f"--{action.dest} is required, typed {kind}"
        for value in values:
            if value is None:
                assert isinstance(None, kind), f"{action.dest} defaults to None, typed {kind}"
            elif isinstance(value, list):
                assert typing.get_origin(kind) is list and all(isinstance(v, typing.get_args(kind)) for v in value)
            else:
                assert isinstance(value, kind), f"--{action.dest} parses {value!r}, typed {kind}"
