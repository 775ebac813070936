"""Deterministic procedural toy dataset in the miniImageNet flat layout.

``python -m datasets.toy --out DIR [--perClass 30] [--size 96] [--seed 0]`` writes::

    DIR/images/<wnid><8 digits>.jpg    size x size RGB JPEG, digits 1-based
    DIR/train.csv, DIR/val.csv, DIR/test.csv    header ``filename,label``

The classes are the real wnids of ``datasplit/{train,val,test}.txt``, each a distinct combination of
five attributes of one shared vocabulary (its objects' shape, hue, fill and number, and a background
texture); two classes may differ in only two, so no single cue names a class. Hard enough to leave
few-shot methods room above a plain prototype classifier: random background colours (the class
texture half of the time), jittered objects, up to two occluding distractors from the vocabulary,
sometimes an occluding rectangle, and per-image brightness, contrast, colour cast and pixel noise.
A pure function of ``seed``: the design comes from the stream ``(seed, 0)``, class ``i``'s images
from ``(seed, 1, i)``, so the files are byte-identical across runs.
"""

from __future__ import annotations

import argparse
import colorsys
import csv
import io
import json
import multiprocessing
import re
import sys
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from functools import partial
from itertools import repeat
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw
from tqdm import tqdm

if __spec__ is None:  # started as a file: the repository's packages import only under python -m
    sys.stderr.write(f"{sys.argv[0]}: run it from the repository root as python -m datasets.toy\n")
    sys.exit(2)

from datasets.splits import SPLITS, class_list
from utils.errors import OptionError
from utils.options import HelpFormatter, add_seed_flag, add_threads_flag, run_cli

SHAPES = ("circle", "ring", "square", "triangle", "star", "cross", "bar", "crescent")
HUES = (0, 28, 55, 115, 175, 220, 270, 315)  # degrees: red, orange, yellow, green, cyan, blue, violet, magenta
FILLS = ("solid", "striped", "spotted", "outline")
COUNTS = (1, 2, 3)
TEXTURES = ("plain", "gradient", "checker", "stripes", "dots", "noise")
VOCABULARY = (SHAPES, HUES, FILLS, COUNTS, TEXTURES)
MIN_ATTRIBUTE_DISTANCE = 2
PREFERRED_ATTRIBUTE_DISTANCE = 2

HUE_JITTER = 10.0  # degrees either side of the class hue
CLASS_TEXTURE_PROB = 0.5  # chance that the background shows the class texture, else a random one
MAX_DISTRACTORS = 2  # distractors per image: 0..MAX objects of random shape, hue and fill
OCCLUDER_PROB = 0.3  # chance of one random rectangle painted over the scene
OBJECT_EXTENT = 1.15  # every shape lies within this many radii of its centre (the square's corners: 0.8 * sqrt(2))

JPEG_QUALITY = 90
# Images from which rendering is spread over processes: each takes some 3 s to start (it imports torch, through
# this package), about what 300-600 images cost to render in one.
PARALLEL_FROM = 1000
SUPERSAMPLE = 2
FILENAME_RE = re.compile(r"^n\d{8}\d{8}\.jpg$")


def class_design(split_sizes: list[int], seed: int) -> np.ndarray:
    """One attribute combination per class: int (classes, attributes) indices into ``VOCABULARY``.

    Greedy over the seeded shuffle of the grid: each class differs from every earlier one in at least
    ``MIN_ATTRIBUTE_DISTANCE`` attributes, ``PREFERRED_ATTRIBUTE_DISTANCE`` where it can, then takes the
    values its split has used least."""
    rng = np.random.default_rng([seed, 0])
    axes = [np.arange(len(values)) for values in VOCABULARY]
    grid = np.stack(np.meshgrid(*axes, indexing="ij"), axis=-1).reshape(-1, len(axes))
    grid = grid[rng.permutation(len(grid))]
    min_distance = np.full(len(grid), len(axes))
    shortfall_weight = len(grid) * len(axes)
    chosen = []
    for split_size in split_sizes:
        usage = [np.zeros(len(values), dtype=np.int64) for values in VOCABULARY]
        for _ in range(split_size):
            shortfall = PREFERRED_ATTRIBUTE_DISTANCE - np.minimum(min_distance, PREFERRED_ATTRIBUTE_DISTANCE)
            score = shortfall * shortfall_weight + sum(usage[a][grid[:, a]] for a in range(len(axes)))
            best = int(np.argmin(score))
            if min_distance[best] < MIN_ATTRIBUTE_DISTANCE:
                raise RuntimeError("attribute vocabulary too small for the number of classes")
            combo = grid[best]
            chosen.append(combo)
            for a in range(len(axes)):
                usage[a][combo[a]] += 1
            min_distance = np.minimum(min_distance, (grid != combo).sum(axis=1))
    return np.array(chosen)


def _unit_shapes() -> dict[str, tuple[list[np.ndarray], list[np.ndarray]]]:
    """Shape -> (filled, holes): unit-radius polygons (n, 2) centred on the origin."""
    turn = np.linspace(0, 2 * np.pi, 48, endpoint=False)
    circle = np.stack([np.cos(turn), np.sin(turn)], axis=1)
    triangle = np.pi / 2 + np.arange(3) * 2 * np.pi / 3
    star = np.pi / 2 + np.arange(10) * np.pi / 5
    star_radii = np.where(np.arange(10) % 2 == 0, 1.0, 0.42)
    a, b = 0.3, 0.95
    cross = [[-a, -b], [a, -b], [a, -a], [b, -a], [b, a], [a, a], [a, b], [-a, b], [-a, a], [-b, a], [-b, -a], [-a, -a]]
    # Crescent: the unit disc minus a disc of radius 0.8 centred at (0.45, 0); the circles meet at (0.625, +-0.78).
    outer_start, inner_start = np.arctan2(0.78, 0.625), np.arctan2(0.78, 0.625 - 0.45)
    outer = np.linspace(outer_start, 2 * np.pi - outer_start, 32)
    inner = np.linspace(2 * np.pi - inner_start, inner_start, 32)
    crescent = np.concatenate([np.stack([np.cos(outer), np.sin(outer)], axis=1),
                               np.stack([0.45 + 0.8 * np.cos(inner), 0.8 * np.sin(inner)], axis=1)])
    return {
        "circle": ([circle], []),
        "ring": ([circle], [0.55 * circle]),
        "square": ([0.8 * np.array([[-1.0, -1.0], [1.0, -1.0], [1.0, 1.0], [-1.0, 1.0]])], []),
        "triangle": ([np.stack([np.cos(triangle), -np.sin(triangle)], axis=1)], []),
        "star": ([np.stack([star_radii * np.cos(star), -star_radii * np.sin(star)], axis=1)], []),
        "cross": ([np.array(cross)], []),
        "bar": ([np.array([[-1.0, -0.3], [1.0, -0.3], [1.0, 0.3], [-1.0, 0.3]])], []),
        "crescent": ([crescent], []),
    }


SHAPE_POLYGONS = _unit_shapes()


def texture_mix(texture: str, xs: np.ndarray, ys: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """The (size, size) share in [0, 1] of the second background colour at the points ``xs, ys``."""
    if texture == "gradient":  # a ramp in a random direction
        theta = rng.uniform(0, 2 * np.pi)
        return np.clip((np.cos(theta) * (xs - 0.5) + np.sin(theta) * (ys - 0.5)) / np.sqrt(0.5) + 0.5, 0, 1)
    if texture == "checker":  # 4-8 cells per side, random phase
        cells, shift = rng.uniform(4, 8), rng.uniform(0, 1, 2)
        return (np.floor(xs * cells + shift[0]) + np.floor(ys * cells + shift[1])) % 2
    if texture == "stripes":  # random angle, 5-10 periods per side, random phase
        angle, period = rng.uniform(0, np.pi), rng.uniform(5, 10)
        return (((np.cos(angle) * xs + np.sin(angle) * ys) * period + rng.uniform(0, 1)) % 1 < 0.5).astype(float)
    if texture == "dots":  # a square lattice of 4-8 dots per side, random phase
        cells = rng.uniform(4, 8)
        fx, fy = ((axis * cells + rng.uniform(0, 1)) % 1 - 0.5 for axis in (xs, ys))
        return (fx**2 + fy**2 < 0.09).astype(float)
    if texture == "noise":  # blocky value noise, 6-12 blocks per side
        blocks = min(len(xs), int(rng.integers(6, 13)))
        index = np.arange(len(xs)) * blocks // len(xs)
        return rng.uniform(0, 1, (blocks, blocks))[np.ix_(index, index)]
    return np.zeros_like(xs)  # plain


def hsv_colour(hue: float, saturation: float, value: float) -> np.ndarray:
    """The float RGB triple in [0, 255] of ``hue`` (degrees), ``saturation`` and ``value`` in [0, 1]."""
    return 255.0 * np.array(colorsys.hsv_to_rgb((hue / 360.0) % 1.0, saturation, value))


def render_background(texture: str, size: int, rng: np.random.Generator) -> np.ndarray:
    """A float (size, size, 3) background: ``texture`` mixing two random colours (any hue, muted to vivid)."""
    first, second = (hsv_colour(rng.uniform(0, 360), rng.uniform(0, 0.75), rng.uniform(0.15, 0.85)) for _ in range(2))
    ys, xs = pixel_grid(size)
    return first + texture_mix(texture, xs, ys, rng)[..., None] * (second - first)


def shape_mask(shape: str, centre: np.ndarray, radius: float, angle: float, size: int,
               hole: float = 0.0) -> np.ndarray:
    """The float (size, size) coverage in [0, 1] of one ``shape``; ``hole`` > 0 cuts out the shape
    scaled by ``hole`` (an outline)."""
    big = size * SUPERSAMPLE
    mask = Image.new("L", (big, big), 0)
    draw = ImageDraw.Draw(mask)
    rotation = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    filled, holes = SHAPE_POLYGONS[shape]
    layers = [(filled, 1.0, 255), (holes, 1.0, 0)] + ([(filled, hole, 0)] if hole > 0 else [])
    for polygons, scale, value in layers:
        for polygon in polygons:
            points = (polygon @ rotation.T * radius * scale + centre) * big
            draw.polygon([tuple(p) for p in points.tolist()], fill=value)
    return np.asarray(mask.reduce(SUPERSAMPLE), dtype=np.float64) / 255.0


def fill_pattern(fill: str, xs: np.ndarray, ys: np.ndarray, centre: np.ndarray, radius: float, angle: float,
                 rng: np.random.Generator) -> np.ndarray:
    """The share in [0, 1] of the dark colour of ``fill`` at ``xs, ys``, laid out in object coordinates."""
    if fill not in ("striped", "spotted"):
        return np.zeros_like(xs)
    dx, dy = xs - centre[0], ys - centre[1]
    u = (np.cos(angle) * dx + np.sin(angle) * dy) / radius
    v = (-np.sin(angle) * dx + np.cos(angle) * dy) / radius
    if fill == "striped":
        return ((u * 2.2 + rng.uniform(0, 1)) % 1 < 0.45).astype(float)
    fu, fv = ((w * 2.0 + rng.uniform(0, 1)) % 1 - 0.5 for w in (u, v))
    return (fu**2 + fv**2 < 0.07).astype(float)


def pixel_grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    """The (size, size) y and x coordinates in [0, 1] of the pixel centres."""
    return tuple((np.mgrid[0:size, 0:size] + 0.5) / size)


def place_objects(radii: list[float], rng: np.random.Generator) -> list[np.ndarray]:
    """A centre in [0, 1]^2 per radius, trying (20 draws) to keep objects from covering each other."""
    centres: list[np.ndarray] = []
    for index, radius in enumerate(radii):
        for _attempt in range(20):
            centre = rng.uniform(radius * 0.8, 1 - radius * 0.8, 2)
            if all(np.hypot(*(centre - c)) > 0.75 * (radius + r) for c, r in zip(centres, radii[:index])):
                break
        centres.append(centre)
    return centres


def render_image(design: np.ndarray, size: int, rng: np.random.Generator) -> Image.Image:
    """One jittered RGB image of the class described by ``design``."""
    shape_i, hue_i, fill_i, count_i, texture_i = (int(v) for v in design)
    if rng.random() >= CLASS_TEXTURE_PROB:
        texture_i = int(rng.integers(len(TEXTURES)))
    image = render_background(TEXTURES[texture_i], size, rng)
    count = COUNTS[count_i]
    base_radius = {1: 0.27, 2: 0.21, 3: 0.17}[count]
    objects = [(SHAPES[shape_i], HUES[hue_i], FILLS[fill_i], base_radius * rng.uniform(0.75, 1.2))
               for _ in range(count)]  # (shape, hue, fill, radius)
    for _ in range(int(rng.integers(0, MAX_DISTRACTORS + 1))):
        objects.append((SHAPES[rng.integers(len(SHAPES))], HUES[rng.integers(len(HUES))],
                        FILLS[rng.integers(len(FILLS))], base_radius * rng.uniform(0.55, 0.95)))
    centres = place_objects([radius for *_, radius in objects], rng)
    ys, xs = pixel_grid(size)
    for index in rng.permutation(len(objects)):
        shape, hue, fill, radius = objects[index]
        centre = centres[index]
        angle = rng.uniform(-np.pi, np.pi)
        colour = hsv_colour(hue + rng.uniform(-HUE_JITTER, HUE_JITTER), rng.uniform(0.5, 1.0), rng.uniform(0.55, 1.0))
        low = np.clip(np.floor((centre - OBJECT_EXTENT * radius) * size), 0, size).astype(int)
        high = np.clip(np.ceil((centre + OBJECT_EXTENT * radius) * size) + 1, 0, size).astype(int)
        box = slice(low[1], high[1]), slice(low[0], high[0])  # the rows and columns the object may cover
        mask = shape_mask(shape, centre, radius, angle, size, 0.6 if fill == "outline" else 0.0)[box][..., None]
        dark = fill_pattern(fill, xs[box], ys[box], centre, radius, angle, rng)[..., None]
        paint = colour * (1 - dark) + (colour * 0.3) * dark
        image[box] = image[box] * (1 - mask) + paint * mask
    if rng.random() < OCCLUDER_PROB:
        width, height = rng.uniform(0.15, 0.4, 2)
        left, top = rng.uniform(0, 1 - width), rng.uniform(0, 1 - height)
        inside = (xs >= left) & (xs < left + width) & (ys >= top) & (ys < top + height)
        image[inside] = hsv_colour(rng.uniform(0, 360), rng.uniform(0, 0.6), rng.uniform(0.1, 0.9))
    return photometric_jitter(image, rng)


def photometric_jitter(image: np.ndarray, rng: np.random.Generator) -> Image.Image:
    """The float (size, size, 3) scene with its own contrast, brightness, colour cast and pixel noise, as RGB."""
    mean = image.mean()
    image = (image - mean) * rng.uniform(0.7, 1.2) + mean + rng.uniform(-25, 25)
    image *= rng.uniform(0.88, 1.12, 3)
    image += rng.normal(0, rng.uniform(3, 12), image.shape)
    return Image.fromarray(np.clip(np.rint(image), 0, 255).astype(np.uint8), "RGB")


def jpeg_bytes(image: Image.Image) -> bytes:
    """The image as the toy datasets' JPEG (quality 90, no chroma subsampling)."""
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=JPEG_QUALITY, subsampling=0)
    return buffer.getvalue()


def render_class(draw: Callable[[np.random.Generator], Image.Image], index: int, per_class: int,
                 seed: int) -> list[bytes]:
    """The JPEG bytes of class ``index``'s ``per_class`` images, ``draw(rng)`` on the stream ``(seed, 1, index)``."""
    rng = np.random.default_rng([seed, 1, index])
    return [jpeg_bytes(draw(rng)) for _ in range(per_class)]


def check_arguments(out: Path, per_class: int, size: int, seed: int) -> None:
    """Raise ``OptionError`` naming the first unusable flag."""
    for flag, value, least in (("--perClass", per_class, 1), ("--size", size, 16), ("--seed", seed, 0)):
        if value < least:
            raise OptionError(f"{flag} must be >= {least}, got {value}")
    if out.exists() and not out.is_dir():
        raise OptionError(f"--out {out} exists and is not a directory")


def generate(out: Path, per_class: int = 30, size: int = 96, seed: int = 0, *,
             progress: bool = False, workers: int = 1) -> dict[str, int]:
    """Write the toy dataset under ``out`` (regenerated in place; classes rendered by ``workers`` processes, the
    same bytes for any number) and return the number of images per split."""
    out = Path(out)
    check_arguments(out, per_class, size, seed)
    splits = {split: sorted(class_list(split)) for split in SPLITS}
    design = class_design([len(wnids) for wnids in splits.values()], seed)
    classes = [(split, wnid) for split, wnids in splits.items() for wnid in wnids]
    draws = [partial(render_image, combo, size) for combo in design]
    return write_dataset(out, classes, draws, per_class, seed, FILENAME_RE, progress, workers)


def write_dataset(out: Path, classes: list[tuple[str, str]], draws: list[Callable[[np.random.Generator], Image.Image]],
                  per_class: int, seed: int, stale_names: re.Pattern, progress: bool = False,
                  workers: int = 1) -> dict[str, int]:
    """Write ``out/images/<label><8 digits>.jpg`` (1-based) and ``out/<split>.csv`` for ``classes``
    (``(split, label)`` pairs; class i's images :func:`render_class` of ``draws[i]``, in ``workers`` processes
    from :data:`PARALLEL_FROM` images on: the draws must pickle), remove the images matching ``stale_names``
    this call did not write (so the folder is a function of the arguments), and return the number of images
    per split."""
    images_dir = out / "images"
    images_dir.mkdir(parents=True, exist_ok=True)
    rows: dict[str, list[tuple[str, str]]] = {split: [] for split in SPLITS}
    parallel = workers > 1 and len(classes) > 1 and len(classes) * per_class >= PARALLEL_FROM
    pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) if parallel else None
    try:
        rendered = (pool.map if pool else map)(render_class, draws, range(len(classes)), repeat(per_class),
                                               repeat(seed))
        for (split, label), images in zip(tqdm(classes, desc="classes", disable=not progress), rendered):
            for number, data in enumerate(images, 1):
                (images_dir / f"{label}{number:08d}.jpg").write_bytes(data)
                rows[split].append((f"{label}{number:08d}.jpg", label))
    finally:
        if pool:
            pool.shutdown(cancel_futures=True)  # on an error or Ctrl-C, the classes not started are dropped
    written = {name for split_rows in rows.values() for name, _ in split_rows}
    for stale in images_dir.iterdir():
        if stale_names.match(stale.name) and stale.name not in written:
            stale.unlink()
    for split, split_rows in rows.items():
        with open(out / f"{split}.csv", "w", newline="") as handle:
            csv.writer(handle, lineterminator="\n").writerows([("filename", "label"), *split_rows])
    return {split: len(split_rows) for split, split_rows in rows.items()}


def generate_lowshot(out: Path, classes_per_list: int = 6, train_per_class: int = 22, val_per_class: int = 4,
                     size: int = 32, seed: int = 0, trials: int = 5, examples: int = 20) -> dict[str, int]:
    """A toy ImageNet-1K low-shot benchmark under ``out``, in the real files' formats.

    Writes ``train/<wnid>/<wnid>_<k>.JPEG`` (``k`` not zero-padded, as in ILSVRC) and
    ``val/<wnid>/ILSVRC2012_val_<8 digits>.JPEG`` (``4 * classes_per_list`` classes),
    ``label_idx.json`` (``label_names`` in a shuffled, unsorted order; ``base_classes_1``,
    ``base_classes_2``, ``novel_classes_1``, ``novel_classes_2`` of ``classes_per_list`` classes
    each), ``train.json`` (the release's list of training images: ``image_names``, absolute paths
    of another machine, and ``image_labels``; class by class in ``label_names`` order, each class's
    files by ``k``, which is not their name order) and ``splitfile_{1..trials}.json`` (per class,
    ``examples`` distinct indices into ``train.json``'s list). Returns the number of classes and images.
    """
    out = Path(out)
    if train_per_class < examples:
        raise ValueError(f"train_per_class {train_per_class} < examples {examples}")
    count = 4 * classes_per_list
    design = class_design([count], seed)
    rng = np.random.default_rng([seed, 2])
    order = rng.permutation(count)
    while np.all(order[:-1] < order[1:]):
        order = rng.permutation(count)
    names = [f"n{90000000 + int(i):08d}" for i in order]
    for k, wnid in enumerate(names):
        images = render_class(partial(render_image, design[k], size), k, train_per_class + val_per_class, seed)
        for folder in ("train", "val"):
            (out / folder / wnid).mkdir(parents=True, exist_ok=True)
        for number, data in enumerate(images[:train_per_class]):
            (out / "train" / wnid / f"{wnid}_{number}.JPEG").write_bytes(data)
        for number, data in enumerate(images[train_per_class:], k * val_per_class + 1):
            (out / "val" / wnid / f"ILSVRC2012_val_{number:08d}.JPEG").write_bytes(data)
    groups = [[int(i) for i in part] for part in np.split(rng.permutation(count), 4)]
    meta = {"label_names": names, "base_classes_1": groups[0], "base_classes_2": groups[1],
            "novel_classes_1": groups[2], "novel_classes_2": groups[3], "base_classes": groups[0] + groups[1]}
    (out / "label_idx.json").write_text(json.dumps(meta))
    (out / "train.json").write_text(json.dumps({
        "image_names": [f"/datasets/imagenet/train/{wnid}/{wnid}_{number}.JPEG" for wnid in names
                        for number in range(train_per_class)],
        "image_labels": [k for k in range(count) for _ in range(train_per_class)]}))
    for trial in range(1, trials + 1):
        trial_rng = np.random.default_rng([seed, 3, trial])
        rows = [[k * train_per_class + int(i) for i in trial_rng.choice(train_per_class, examples, replace=False)]
                for k in range(count)]
        (out / f"splitfile_{trial}.json").write_text(json.dumps(rows))
    return {"classes": count, "images": count * (train_per_class + val_per_class)}


def generator_parser(prog: str, description: str, per_class: int) -> argparse.ArgumentParser:
    """The flags of the generated datasets' command lines (this one's and ``datasets.emoji``'s)."""
    parser = argparse.ArgumentParser(prog=prog, description=description, formatter_class=HelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="output directory")
    parser.add_argument("--perClass", type=int, default=per_class, help="images per class")
    parser.add_argument("--size", type=int, default=96, help="image side in pixels")
    add_seed_flag(parser, "the images")
    return parser


def report(counts: dict[str, int], out: Path) -> None:
    """Print what a generator wrote."""
    summary = ", ".join(f"{split} {count}" for split, count in counts.items())
    print(f"wrote {sum(counts.values())} images ({summary}) to {out}")


def get_args_parser() -> argparse.ArgumentParser:
    parser = generator_parser("python -m datasets.toy", __doc__.splitlines()[0], per_class=30)
    add_threads_flag(parser, at_most=8, use="processes rendering the classes (the files are the same for any number)")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Generate the dataset; a bad flag is one line on stderr and status 2."""
    return run_cli(lambda a: report(generate(a.out, a.perClass, a.size, a.seed, progress=True, workers=a.nthreads),
                                    a.out), get_args_parser(), argv)


if __name__ == "__main__":
    sys.exit(main())
