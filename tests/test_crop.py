"""Stage 1's crop (docs/original.md §2.3): torchvision 0.2's RandomResizedCrop, drawn from the item's seed."""
from __future__ import annotations

import math

import pytest
import torch
from PIL import Image

from datasets.softrandom import SoftRandomDataset
from datasets.transforms import TV02RandomResizedCrop, torch_uniform, train_transform, tv02_crop_box
from engine.options import stage1_parser
from engine.stage1 import RESUME_KEYS

LOW, HIGH = 3 / 4, 4 / 3


class Scripted:
    """``uniform(low, high)`` that returns ``low + (high - low) * u`` for the given fractions u in turn."""

    def __init__(self, *fractions: float) -> None:
        self.fractions, self.calls = list(fractions), []

    def __call__(self, low: float, high: float) -> float:
        self.calls.append((low, high))
        return low + (high - low) * self.fractions.pop(0)


class Recording:
    """Torch's draws, each kept with its range."""

    def __init__(self) -> None:
        self.draws: list[tuple[float, float, float]] = []

    def __call__(self, low: float, high: float) -> float:
        value = torch_uniform(low, high)
        self.draws.append((low, high, value))
        return value


def test_the_rule_on_scripted_draws() -> None:
    """1000 x 500: area fraction 0.32 and ratio 1.0 give a 400 x 400 crop; 0.5 of an area of 500,000
    with ratio 4/3 gives w = round(577.35) = 577, h = round(433.01) = 433; the third draw swaps (< 1/2)."""
    box = tv02_crop_box(1000, 500, Scripted((0.32 - 0.08) / 0.92, (1.0 - LOW) / (HIGH - LOW), 0.9, 0.5, 0.25))
    assert box == (math.floor(0.5 * 101), math.floor(0.25 * 601), 400, 400)
    draws = Scripted((0.5 - 0.08) / 0.92, 1.0, 0.9, 0.0, 0.999)
    assert tv02_crop_box(1000, 500, draws) == (0, 423, 433, 577)  # not swapped: 577 wide, 433 high
    assert draws.calls[:3] == [(0.08, 1.0), (LOW, HIGH), (0.0, 1.0)]
    # swapped: 433 wide, 577 high does not fit a height of 500; the next attempt (fraction 0.08, ratio 3/4,
    # w = round(173.21) = 173, h = round(230.94) = 231, not swapped) does
    draws = Scripted((0.5 - 0.08) / 0.92, 1.0, 0.1, 0.0, 0.0, 0.6, 0.0, 0.0)
    assert tv02_crop_box(1000, 500, draws) == (0, 0, 231, 173)
    assert len(draws.calls) == 8


def test_an_elongated_image_falls_back_to_the_centre_square_after_ten_attempts() -> None:
    """1000 x 10: every crop has at least 0.08 * 10,000 = 800 px of area, so a side of at least
    sqrt(800 * 3 / 4) > 24 px, taller than the image either way round."""
    torch.manual_seed(0)
    for _ in range(20):
        draws = Recording()
        assert tv02_crop_box(1000, 10, draws) == (0, 495, 10, 10)
        assert len(draws.draws) == 3 * 10
    crop = TV02RandomResizedCrop(8)(Image.new("RGB", (1000, 10)))
    assert crop.size == (8, 8)


def test_failed_attempts_then_the_centre_square_of_the_shorter_side() -> None:
    """Forced failures (area fraction 1 with ratio 4/3 never fits) on a 300 x 200 image."""
    failing = [1.0, 1.0, 0.9] * 10
    assert tv02_crop_box(300, 200, Scripted(*failing)) == (0, 50, 200, 200)
    assert tv02_crop_box(200, 300, Scripted(*failing)) == (50, 0, 200, 200)


def test_over_many_draws_the_ratio_is_uniform_and_half_the_crops_are_swapped() -> None:
    """20,000 crops of a 1000 x 1000 image: the ratio draws follow U(3/4, 4/3) (a log-uniform draw
    would put 50 % below 1 instead of 42.9 %), the swap draw falls below 1/2 in half the crops, and
    among the crops that fit at the first attempt with area fraction at most 1/2 (all such crops fit)
    half are wider than high (57.1 % without the swap)."""
    torch.manual_seed(0)
    ratios, swaps, wide, counted = [], 0, 0, 0
    for _ in range(20_000):
        draws = Recording()
        top, left, h, w = tv02_crop_box(1000, 1000, draws)
        assert 0 <= top <= 1000 - h and 0 <= left <= 1000 - w
        ratios.extend(v for low, high, v in draws.draws if (low, high) == (LOW, HIGH))
        first = draws.draws[:3]
        if len(draws.draws) == 5 and first[0][2] <= 0.5:
            counted += 1
            swaps += first[2][2] < 0.5
            wide += w > h
    ratios = torch.tensor(ratios, dtype=torch.float64)
    assert ratios.min() >= LOW and ratios.max() < HIGH
    # the empirical CDF at nine points against the uniform one (the log-uniform one differs by up to 0.07)
    for q in torch.linspace(LOW, HIGH, 11)[1:-1]:
        assert (ratios < q).double().mean().item() == pytest.approx(((q - LOW) / (HIGH - LOW)).item(), abs=0.012)
    assert (ratios < 1).double().mean().item() == pytest.approx((1 - LOW) / (HIGH - LOW), abs=0.012)
    assert swaps / counted == pytest.approx(0.5, abs=0.02)
    assert wide / counted == pytest.approx(0.5, abs=0.02)


def test_positions_are_uniform_over_the_room_left() -> None:
    """A crop of fraction 0.08 of 1000 x 1000 at ratio 1 (283 x 283) may start anywhere in 0..717."""
    torch.manual_seed(1)
    tops = []
    for _ in range(4000):
        fractions = [0.0, (1 - LOW) / (HIGH - LOW), 0.9, torch.rand(()).item(), torch.rand(()).item()]
        tops.append(tv02_crop_box(1000, 1000, Scripted(*fractions))[0])
    tops = torch.tensor(tops, dtype=torch.float64)
    assert tops.min() >= 0 and tops.max() <= 717
    assert tops.mean().item() == pytest.approx(717 / 2, rel=0.03)
    assert tops.max() > 700 and tops.min() < 17


def image() -> Image.Image:
    generator = torch.Generator().manual_seed(3)
    pixels = torch.randint(0, 256, (50, 70, 3), dtype=torch.uint8, generator=generator)
    return Image.fromarray(pixels.numpy())


def test_the_default_train_transform_is_the_tv02_crop_and_today_s_is_a_flag() -> None:
    assert isinstance(train_transform(32).transforms[0], TV02RandomResizedCrop)
    assert type(train_transform(32, "current").transforms[0]).__name__ == "RandomResizedCrop"
    torch.manual_seed(5)
    tv02 = train_transform(32)(image())
    torch.manual_seed(5)
    current = train_transform(32, "current")(image())
    assert tv02.shape == current.shape == (3, 32, 32) and not torch.equal(tv02, current)
    with pytest.raises(ValueError):
        train_transform(32, "tv3")
    args = stage1_parser().parse_args(["--tensorname", "crop"])
    assert args.crop == "tv02" and "crop" in RESUME_KEYS


def test_the_dataset_s_crop_comes_from_the_item_seed(train_split) -> None:
    """The same (index, item seed) gives the same image whatever was drawn before; the crop follows
    the dataset's ``crop``."""
    dataset = SoftRandomDataset(train_split, 32, files_per_class=2, repeats=1, blend_prob=0.0)
    first = dataset[(0, 123)][0]
    torch.rand(100)
    assert torch.equal(dataset[(0, 123)][0], first)
    assert not torch.equal(dataset[(0, 124)][0], first)
    current = SoftRandomDataset(train_split, 32, files_per_class=2, repeats=1, blend_prob=0.0, crop="current")
    assert not torch.equal(current[(0, 123)][0], first)
