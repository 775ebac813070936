"""The original's behaviours that change a reproduction's numbers (docs/original.md §7): the scale's undecayed
rate (§4.6), unflipped gallery features (§4.3), PyTorch 0.4.0 initialisation of the deformation network and
torchvision's of the stage-1 ResNet (§4.2, §3.1), and ``--selectOn test`` evaluated before each epoch trains
(§4.8, §6.1)."""
from __future__ import annotations

import math

import pytest
import torch
import torchvision
from torch import nn

import engine.stage1 as stage1
import engine.stage2 as stage2
from conftest import make_gallery, normalise, uint8_images
from datasets import read_split
from engine.episode import GalleryBank
from engine.options import stage1_config, stage2_config, stage2_parser
from models import DEFORM_NETS, IDeMeNet, SmallDeformNet
from tests.scripts_helpers import make_workdir, read_metrics, run_main, run_script
from utils.checkpoint import safe_load
from utils.forward import compute_layout, layout_model
from utils.options import configure_backend

CPU = torch.device("cpu")
LR = 0.002
TINY = ["--dataroot", "toy", "--imageSize", "32", "--network", "stage1", "--galleryNum", "2", "--chooseNum", "3",
        "--augnum", "2", "--test_num", "3", "--nthreads", "0", "--progress", "0", "--device", "cpu"]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return make_workdir(tmp_path_factory.mktemp("faithful"))


# 1. The scale's learning rate never decays -------------------------------------------------------

def tiny_args(*flags: str):
    """The stage-2 flags of TINY plus ``flags``, resolved as the script resolves them (run in ``workdir``)."""
    return stage2_config(CPU, **vars(stage2_parser().parse_args([*TINY, "--tensorname", "tiny", *flags])))


def test_schedules_over_41_epochs_as_the_training_loop_steps_them(workdir, monkeypatch) -> None:
    """The loop's own calls once per epoch (``epoch_row`` then ``step_schedulers``) on the optimisers
    ``make_optimizers`` builds: in epoch 40 the deformation network's rate is LR / 2 and the scale's
    LR; the states resume.pt keeps continue the schedules where they were."""
    monkeypatch.chdir(workdir)
    args = tiny_args("--LR", str(LR))
    model = stage2.build_model(args, CPU)
    optimizers, schedulers = stage2.make_optimizers(model, args)
    rows = []
    for epoch in range(41):
        rows.append(stage2.epoch_row(epoch, stage2.new_progress(), optimizers, model))
        stage2.step_schedulers(*schedulers.values())
    assert [row["lr"] for row in rows] == [pytest.approx(LR)] * 40 + [pytest.approx(LR / 2)]
    assert [row["scale_lr"] for row in rows] == [pytest.approx(LR)] * 41
    assert optimizers["scale_opt"].param_groups[0]["params"] == [model.scale]  # the scale alone
    assert all(p is not model.scale for g in optimizers["meta_opt"].param_groups for p in g["params"])

    saved = {key: obj.state_dict() for key, obj in {**optimizers, **schedulers}.items()}
    resumed_optimizers, resumed_schedulers = stage2.make_optimizers(model, args)
    for key, obj in {**resumed_optimizers, **resumed_schedulers}.items():
        obj.load_state_dict(saved[key])
    assert resumed_optimizers["meta_opt"].param_groups[0]["lr"] == pytest.approx(LR / 2)
    for _ in range(41, 80):
        stage2.step_schedulers(*resumed_schedulers.values())
    assert resumed_optimizers["meta_opt"].param_groups[0]["lr"] == pytest.approx(LR / 4)
    assert resumed_optimizers["scale_opt"].param_groups[0]["lr"] == pytest.approx(LR)


@pytest.mark.slow
def test_scale_keeps_its_rate_while_the_deformation_network_halves_every_40_epochs(workdir) -> None:
    """41 one-episode epochs: in epoch 40 the deformation network's rate is LR / 2, the scale's LR,
    in metrics.csv and in the optimiser states that resume.pt keeps at its top level."""
    result = run_script(workdir, "onlyBasetwoLoss.py", *TINY, "--tensorname", "lr41", "--numEpochs", "41",
                        "--epoch", "1", "--valEpisodes", "1", "--testEpisodes", "1", "--LR", str(LR))
    assert result.returncode == 0, result.stderr
    rows = read_metrics(workdir / "runs/lr41/metrics.csv")
    assert len(rows) == 41
    assert float(rows[39]["lr"]) == pytest.approx(LR) and float(rows[40]["lr"]) == pytest.approx(LR / 2)
    assert all(float(row["scale_lr"]) == pytest.approx(LR) for row in rows)
    state = safe_load(workdir / "runs/lr41/resume.pt")
    assert state["epoch"] == 41
    assert [g["lr"] for g in state["meta_opt"]["param_groups"]] == [pytest.approx(LR / 2)]
    assert [g["lr"] for g in state["scale_opt"]["param_groups"]] == [pytest.approx(LR)]
    assert len(state["scale_opt"]["param_groups"][0]["params"]) == 1  # the scale alone
    assert state["gallery_features"].shape == (2 * 64, 512)


def test_an_earlier_resume_state_is_refused_with_one_line(workdir) -> None:
    result = run_main(workdir, "onlyBasetwoLoss.py", *TINY, "--tensorname", "old", "--numEpochs", "2",
                      "--epoch", "1", "--valEpisodes", "1", "--testEpisodes", "1")
    assert result.returncode == 0, result.stderr
    path = workdir / "runs/old/resume.pt"
    state = safe_load(path)
    old = {k: v for k, v in state.items() if k not in ("format", "scale_opt")}  # the layout before the change
    torch.save(old, path)
    before = path.read_bytes()
    result = run_main(workdir, "onlyBasetwoLoss.py", *TINY, "--tensorname", "old", "--numEpochs", "2",
                      "--epoch", "1", "--valEpisodes", "1", "--testEpisodes", "1", "--resume")
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "resume.pt" in lines[0] and "--overwrite" in lines[0]
    assert path.read_bytes() == before


# 2. Gallery features come from unflipped images --------------------------------------------------

def test_gallery_features_are_embeddings_of_the_unflipped_images() -> None:
    torch.manual_seed(0)
    model = layout_model(IDeMeNet(num_classes=4, image_size=32).eval())  # as the scripts build it
    images = uint8_images(10, seed=3)
    bank = GalleryBank(make_gallery(images, torch.arange(10) % 4), model, CPU, chunk=4)
    with torch.no_grad():
        want = model.embed(compute_layout(normalise(images)))
        mirrored = model.embed(compute_layout(normalise(images).flip(-1)))
    torch.testing.assert_close(bank.features, want, rtol=1e-5, atol=1e-6)
    # the images are not mirror-symmetric, so a flipped embedding would be told apart
    assert all(not torch.allclose(want[i], mirrored[i], rtol=1e-3, atol=1e-4) for i in range(10))


# 3. Initialisation as PyTorch 0.4.0 did it -------------------------------------------------------

def assert_uniform(tensor: torch.Tensor, low: float, high: float) -> None:
    """Every value in [low, high], and for large tensors the spread of U(low, high)."""
    values = tensor.detach().flatten()
    assert values.min() >= low and values.max() <= high
    if values.numel() >= 500:
        width = high - low
        assert values.min() < low + 0.05 * width and values.max() > high - 0.05 * width
        assert values.var().item() == pytest.approx(width ** 2 / 12, rel=0.15)
        assert values.mean().item() == pytest.approx((low + high) / 2, abs=0.05 * width)


def built_deformer(seed: int, *flags: str) -> nn.Module:
    """The deformation network stage 2 builds for a new run with ``--seed seed`` (run in ``workdir``)."""
    args = tiny_args("--seed", str(seed), *flags)
    configure_backend(CPU, False, args.seed)
    return stage2.build_model(args, CPU).deformer


def test_deformation_encoder_batchnorm_starts_uniform_0_1_with_zero_bias(workdir, monkeypatch) -> None:
    monkeypatch.chdir(workdir)
    net = built_deformer(1)
    assert isinstance(net, SmallDeformNet)
    norms = [m for m in net.modules() if isinstance(m, nn.BatchNorm2d)]
    assert len(norms) == 5
    weights = torch.cat([bn.weight.detach() for bn in norms])
    assert_uniform(weights, 0.0, 1.0)
    assert weights.std() > 0.2  # not today's constant 1
    assert all(torch.equal(bn.bias, torch.zeros_like(bn.bias)) for bn in norms)
    assert all(torch.equal(bn.running_mean, torch.zeros_like(bn.running_mean))
               and torch.equal(bn.running_var, torch.ones_like(bn.running_var)) for bn in norms)


def torch040_small_deformer(image_size: int, fang: int) -> dict[str, torch.Tensor]:
    """The small encoder's state as PyTorch 0.4.0's ``reset_parameters`` left it (docs/original.md §4.1, §4.2),
    drawn from the global generator in construction order: per block a 3x3 convolution (weight, then bias,
    both U(+-1/sqrt(fan_in)) with fan_in = in_channels * 9), then BatchNorm (weight U(0, 1), bias 0, running
    mean 0 and variance 1); at the end ``toWeight`` (weight, then bias, U(+-1/sqrt(in_features))). Written
    out from those rules, not from the project's classes."""
    channels = (6, 32, 64, 64, 32, 16)
    state = {}
    for block, (cin, cout) in enumerate(zip(channels[:-1], channels[1:])):
        bound = 1 / math.sqrt(cin * 3 * 3)
        state[f"encoder.{block}.0.weight"] = torch.empty(cout, cin, 3, 3).uniform_(-bound, bound)
        state[f"encoder.{block}.0.bias"] = torch.empty(cout).uniform_(-bound, bound)
        state[f"encoder.{block}.1.weight"] = torch.empty(cout).uniform_()
        state[f"encoder.{block}.1.bias"] = torch.zeros(cout)
        state[f"encoder.{block}.1.running_mean"] = torch.zeros(cout)
        state[f"encoder.{block}.1.running_var"] = torch.ones(cout)
        state[f"encoder.{block}.1.num_batches_tracked"] = torch.tensor(0)
    flat = channels[-1] * (image_size // 32) ** 2
    bound = 1 / math.sqrt(flat)
    state["toWeight.0.weight"] = torch.empty(fang * fang, flat).uniform_(-bound, bound)
    state["toWeight.0.bias"] = torch.empty(fang * fang).uniform_(-bound, bound)
    return state


def test_the_deformation_network_starts_as_pytorch_040_drew_it(workdir, monkeypatch) -> None:
    """The deformation network of a new stage-2 run equals, number for number, the PyTorch 0.4.0
    initialisation drawn from the generator state at which the run builds it: the same layers, the same
    draws in the same order, and nothing re-initialised afterwards."""
    monkeypatch.chdir(workdir)
    states = []

    class Recorded(SmallDeformNet):
        def __init__(self, *args, **kwargs) -> None:
            states.append(torch.get_rng_state())
            super().__init__(*args, **kwargs)

    monkeypatch.setitem(DEFORM_NETS, "small", Recorded)
    built = built_deformer(2).state_dict()
    assert len(states) == 1
    torch.set_rng_state(states[0])
    want = torch040_small_deformer(32, 3)
    assert list(built) == list(want)
    for key, value in want.items():
        # today's kaiming_uniform_ bound equals 1/sqrt(fan_in) up to rounding in its last digit
        torch.testing.assert_close(built[key], value, rtol=1e-6, atol=0, msg=key)


def test_stage1_builds_torchvisions_resnet18_whose_batchnorm_starts_at_one() -> None:
    """Only the deformation network gets PyTorch 0.4.0's BatchNorm: the network stage 1 trains from scratch
    (docs/original.md §3.1) is torchvision's ResNet-18 with a 64-way fc, drawn as torchvision draws it, whose
    ResNet sets every BatchNorm weight to 1 and bias to 0 (in torchvision 0.2 as today)."""
    args = stage1_config(tensorname="init", device="cpu")
    torch.manual_seed(3)
    model, _ = stage1.build_model(args, 64)
    torch.manual_seed(3)
    reference = torchvision.models.resnet18(weights=None, num_classes=64).state_dict()
    state = model.state_dict()
    assert list(state) == [f"convnet.{key}" for key in reference]
    assert all(torch.equal(state[f"convnet.{key}"], value) for key, value in reference.items())
    norms = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert len(norms) == 20 and all(torch.equal(bn.weight, torch.ones_like(bn.weight)) for bn in norms)


def test_the_deformation_network_is_drawn_from_the_run_seed(workdir, monkeypatch) -> None:
    monkeypatch.chdir(workdir)

    first, again, other = (built_deformer(seed).state_dict() for seed in (5, 5, 6))
    assert all(torch.equal(first[k], again[k]) for k in first)
    assert not torch.equal(first["encoder.0.1.weight"], other["encoder.0.1.weight"])
    assert_uniform(first["encoder.0.1.weight"], 0.0, 1.0)


# 4. --selectOn test: the original's timing -----------------------------------------------------

@pytest.mark.slow  # an end-to-end run of the script
def test_selection_on_test_evaluates_fresh_test_episodes_before_each_epoch_trains(workdir, monkeypatch) -> None:
    """Epoch e's select_loss is the test loss of the weights before epoch e trains, on test episodes
    of epoch e; the kept file is the candidate (initial weights, weights after epoch 0) with the
    lowest of these losses; the weights after the last epoch are never a candidate."""
    common = [*TINY, "--epoch", "3", "--valEpisodes", "2", "--testEpisodes", "1", "--selectOn", "test"]
    for name, epochs in (("seltest", "2"), ("seltest_one", "1")):
        result = run_main(workdir, "onlyBasetwoLoss.py", *common, "--tensorname", name, "--numEpochs", epochs)
        assert result.returncode == 0, result.stderr
    rows = read_metrics(workdir / "runs/seltest/metrics.csv")
    assert [row["select_split"] for row in rows] == ["test", "test"]

    monkeypatch.chdir(workdir)
    args = stage2_config(CPU, **vars(stage2_parser().parse_args([*common, "--tensorname", "check",
                                                                 "--numEpochs", "2"])))
    configure_backend(CPU, False, args.seed)
    model = stage2.build_model(args, CPU)
    after_epoch0 = safe_load(workdir / "models/seltest_one_last.t7")
    splits = {"train": read_split("toy", "train"), "test": read_split("toy", "test")}
    from datasets import Gallery
    # the run's default gallery pass changes the statistics the initial candidate is evaluated with
    bank = GalleryBank(Gallery(splits["train"], 2, 32, 0, progress=False), model, CPU, args.batchSize,
                       batch_norm=args.galleryBN)
    initial = {k: v.clone() for k, v in model.state_dict().items()}

    def test_loss(weights, epoch: int) -> float:
        model.load_state_dict(weights)
        dataset = stage2.episodes(splits["test"], args, stage2.episode_config(args, args.ways), 2, stage2.TEST_STREAM,
                                  len(bank))
        dataset.set_epoch(epoch)
        losses = stage2.evaluate(model, dataset, bank, args, CPU, "check", model.embed)["loss"]
        return sum(losses) / len(losses)

    losses = [test_loss(initial, 0), test_loss(after_epoch0, 1)]
    assert [float(row["select_loss"]) for row in rows] == [pytest.approx(x, rel=1e-5) for x in losses]
    assert losses[0] != pytest.approx(test_loss(initial, 1), rel=1e-6)  # the episodes change per epoch
    kept = safe_load(workdir / "models/seltest.t7")
    want = initial if losses[0] <= losses[1] else after_epoch0
    assert all(torch.equal(kept[k], want[k]) for k in want)
    last = safe_load(workdir / "models/seltest_last.t7")
    assert not all(torch.equal(kept[k], last[k]) for k in last)
