"""A dataset of real artwork for outcome checks: 100 emoji classes in the miniImageNet flat layout.

``python -m datasets.emoji --out DIR [--perClass 60] [--size 96] [--seed 0] [--font PATH]`` writes::

    DIR/images/e<codepoint><8 digits>.jpg    size x size RGB JPEG, digits 1-based
    DIR/train.csv, DIR/val.csv, DIR/test.csv    header ``filename,label`` (64 / 16 / 20 classes)

Each class is one emoji (animals, plants, food: drawn artwork with real shading and texture) of Google's
Noto Color Emoji, from Debian's ``fonts-noto-color-emoji`` (SIL Open Font License 1.1, which allows
rendering it into images; the images are not redistributed here). Every image renders its class's
emoji at a random size (45-95 % of the side), rotation (+-25 degrees), mirror, hue, saturation,
brightness and place over one of the toy set's backgrounds, with zero to two distractor emoji of no
class before or after it (occluding it), then contrast, colour cast, blur and pixel noise. The
classes and their splits do not depend on ``--seed``; the images are a pure function of it.
"""
from __future__ import annotations

import argparse
import re
import sys
from functools import cache, partial
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont

if __spec__ is None:  # started as a file: the repository's packages import only under python -m
    sys.stderr.write(f"{sys.argv[0]}: run it from the repository root as python -m datasets.emoji\n")
    sys.exit(2)

from datasets import toy
from datasets.splits import SPLITS
from utils.errors import DataError
from utils.options import run_cli

FONT = Path("/usr/share/fonts/truetype/noto/NotoColorEmoji.ttf")
GLYPH_SIZE = 109  # the font's bitmap strike: the only size it renders at
# Animals, plants and food: the candidates, in code-point order.
CANDIDATES = tuple(cp for first, last in ((0x1F330, 0x1F37F), (0x1F400, 0x1F43C), (0x1F950, 0x1F96F),
                                           (0x1F980, 0x1F9AE), (0x1FAB0, 0x1FABD), (0x1FAD0, 0x1FADB))
                   for cp in range(first, last + 1))
SPLIT_CLASSES = {"train": 64, "val": 16, "test": 20}
CLASS_DRAW_SEED = 2019  # which candidates are classes, and their split: fixed, whatever --seed
FILENAME_RE = re.compile(r"^e[0-9a-f]{5}\d{8}\.jpg$")
MAX_DISTRACTORS = 2


@cache
def glyph(codepoint: int, font: Path = FONT) -> Image.Image | None:
    """The RGBA artwork of one emoji cropped to its visible pixels, or None when the font lacks it."""
    canvas = Image.new("RGBA", (GLYPH_SIZE + 40, GLYPH_SIZE + 40), (0, 0, 0, 0))
    ImageDraw.Draw(canvas).text((4, 4), chr(codepoint), font=_font(font), embedded_color=True)
    box = canvas.getchannel("A").getbbox()
    return canvas.crop(box) if box else None


@cache
def _font(path: Path) -> ImageFont.FreeTypeFont:
    if not path.is_file():
        raise DataError(f"{path}: emoji font not found (apt-get install fonts-noto-color-emoji, or --font)")
    return ImageFont.truetype(str(path), GLYPH_SIZE)


def class_plan(font: Path = FONT) -> tuple[list[tuple[str, int]], list[int]]:
    """``([(split, codepoint)] of the 100 classes, distractor codepoints)``: the candidates the font has,
    a fixed draw of 100 of them split 64 / 16 / 20, the rest distractors."""
    present = [cp for cp in CANDIDATES if glyph(cp, font) is not None]
    needed = sum(SPLIT_CLASSES.values())
    if len(present) < needed + 20:
        raise DataError(f"{font}: only {len(present)} of the emoji this dataset draws on (needs {needed + 20})")
    order = np.random.default_rng(CLASS_DRAW_SEED).permutation(len(present))
    parts = np.split(order[:needed], np.cumsum([SPLIT_CLASSES[split] for split in SPLITS])[:-1])
    classes = [(split, cp) for split, part in zip(SPLITS, parts) for cp in sorted(present[i] for i in part)]
    return classes, sorted(present[i] for i in order[needed:])


def jittered(sprite: Image.Image, side: float, rng: np.random.Generator) -> Image.Image:
    """``sprite`` scaled so its longer side is ``side`` px, mirrored half the time, its hue, saturation
    and brightness shifted, rotated by up to 25 degrees."""
    scale = side / max(sprite.size)
    sprite = sprite.resize((max(1, round(sprite.width * scale)), max(1, round(sprite.height * scale))),
                           Image.Resampling.LANCZOS)
    if rng.random() < 0.5:
        sprite = sprite.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    hsv = np.asarray(sprite.convert("RGB").convert("HSV")).astype(np.float64)
    hsv[..., 0] = (hsv[..., 0] + rng.uniform(-12, 12)) % 256
    hsv[..., 1] *= rng.uniform(0.7, 1.3)
    hsv[..., 2] *= rng.uniform(0.75, 1.15)
    rgb = Image.fromarray(np.clip(np.rint(hsv), 0, 255).astype(np.uint8), "HSV").convert("RGB")
    rgb.putalpha(sprite.getchannel("A"))
    return rgb.rotate(rng.uniform(-25, 25), resample=Image.Resampling.BICUBIC, expand=True)


def render_image(codepoint: int, distractors: list[int], size: int, rng: np.random.Generator,
                 font: Path = FONT) -> Image.Image:
    """One augmented RGB ``size`` x ``size`` image of the class ``codepoint``."""
    background = toy.render_background(toy.TEXTURES[rng.integers(len(toy.TEXTURES))], size, rng)
    canvas = Image.fromarray(np.clip(np.rint(background), 0, 255).astype(np.uint8), "RGB").convert("RGBA")
    layers = [(glyph(codepoint, font), rng.uniform(0.45, 0.95), rng.uniform(0.3, 0.7, 2))]
    for _ in range(int(rng.integers(0, MAX_DISTRACTORS + 1))):
        other = distractors[rng.integers(len(distractors))]
        layers.append((glyph(other, font), rng.uniform(0.25, 0.5), rng.uniform(0.0, 1.0, 2)))
    for index in rng.permutation(len(layers)):
        sprite, fraction, centre = layers[index]
        sprite = jittered(sprite, fraction * size, rng)
        left, top = np.rint(centre * size - np.array(sprite.size) / 2).astype(int)
        layer = Image.new("RGBA", canvas.size, (0, 0, 0, 0))
        layer.paste(sprite, (int(left), int(top)), sprite)  # centred at centre * size, may hang over the edge
        canvas.alpha_composite(layer)
    image = canvas.convert("RGB")
    if rng.random() < 0.3:
        image = image.filter(ImageFilter.GaussianBlur(rng.uniform(0.3, 1.0) * size / 96))
    return toy.photometric_jitter(np.asarray(image, dtype=np.float64), rng)


def generate(out: Path, per_class: int = 60, size: int = 96, seed: int = 0, font: Path = FONT, *,
             progress: bool = False) -> dict[str, int]:
    """Write the dataset under ``out`` (regenerated in place, stale images removed) and return the
    number of images per split."""
    toy.check_arguments(Path(out), per_class, size, seed)
    classes, distractors = class_plan(font)
    draws = [partial(render_image, cp, distractors, size, font=font) for _, cp in classes]
    return toy.write_dataset(Path(out), [(split, f"e{cp:05x}") for split, cp in classes], draws, per_class, seed,
                             FILENAME_RE, progress)


def get_args_parser() -> argparse.ArgumentParser:
    parser = toy.generator_parser("python -m datasets.emoji", __doc__.splitlines()[0], per_class=60)
    parser.add_argument("--font", type=Path, default=FONT, help="Noto Color Emoji (CBDT) font file")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Generate the dataset; a bad flag or font is one line on stderr and status 2."""
    return run_cli(lambda a: toy.report(generate(a.out, a.perClass, a.size, a.seed, a.font, progress=True), a.out),
                   get_args_parser(), argv)


if __name__ == "__main__":
    sys.exit(main())
