"""The attack at every precision, what it reports, and the original's small points (target
classes, min_class, learning-rate milestones)."""
import math

import pytest
import torch
import torch.nn.functional as F

from obsnet.attacks import AttackConfig, AttackOutput, fgsm, max_mode_target, select_attack
from obsnet.data.specs import SPECS
from obsnet.losses import CRITERIA
from obsnet.models.obsnet import Obsnet_Seg
from obsnet.models.segnet import SegNet, freeze
from obsnet.config import OptimConfig
from obsnet.stages import attack_config
from obsnet.training_state import make_optimizer
from obsnet.train import ObserverConfig, ObserverJob, _epoch_summary, attack_counts, train_observer_epoch
from obsnet.utils import amp_dtype, autocast

CPU = torch.device("cpu")


def config(mode="min", mask="all_image", eps=0.05, nclass=12, **kw):
    return AttackConfig(mode=mode, mask=mask, epsilon=eps, patch_size=(32, 40, 10, 16),
                        nclass=nclass, mean=(0.45,) * 3, std=(0.25,) * 3, noise_std=0.0, **kw)


@pytest.fixture(scope="module")
def segnet():
    torch.manual_seed(0)
    return freeze(SegNet(3, 12, width_mult=0.125))


def batch(b=2, h=48, w=64, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(b, 3, h, w, generator=gen).clamp(-1.5, 1.5),
            torch.randint(0, 12, (b, h, w), generator=gen))


def perturbed_share(adv, images, mask):
    inside = mask.expand_as(images) > 0
    return ((adv - images)[inside].abs() > 1e-6).float().mean().item()


def test_mean_loss_gradient_underflows_in_float16(segnet):
    """Why the attack needs care: the original's mean cross-entropy, under float16 autocast,
    has input gradients that are all zero here (their sign: no perturbation at all)."""
    images, labels = batch()
    x = images.clone().requires_grad_(True)
    with autocast(CPU, "float16"):
        loss = F.cross_entropy(segnet(x).float(), labels)
    (grad,) = torch.autograd.grad(loss, x)
    assert (grad != 0).float().mean() < 0.05


@pytest.mark.parametrize("mode", ["min", "max"])
def test_float16_attack_equals_float32(segnet, mode):
    images, labels = batch()
    mask = torch.ones_like(images[:, :1])
    outs = []
    for amp in (None, "float16"):
        torch.manual_seed(3)
        with autocast(CPU, amp):
            outs.append(fgsm(segnet, images, labels, mask, config(mode)))
    assert torch.equal(outs[0][0], outs[1][0]) and torch.equal(outs[0][1], outs[1][1])
    assert perturbed_share(outs[1][0], images, mask) > 0.99


def test_bfloat16_attack_perturbs_every_pixel(segnet):
    images, labels = batch()
    mask = torch.ones_like(images[:, :1])
    with autocast(CPU, "bfloat16"):
        adv, _ = fgsm(segnet, images, labels, mask, config())
    assert perturbed_share(adv, images, mask) > 0.99


def test_sum_loss_has_the_mean_losss_signs_in_float32(segnet):
    images, labels = batch()
    x = images.clone().requires_grad_(True)
    logits = segnet(x).float()
    (g_mean,) = torch.autograd.grad(F.cross_entropy(logits, labels), x, retain_graph=True)
    (g_sum,) = torch.autograd.grad(F.cross_entropy(logits, labels, reduction="sum"), x)
    assert torch.equal(g_mean.sign(), g_sum.sign())


def test_amp_values():
    assert amp_dtype(CPU, None) is None and amp_dtype(CPU, False) is None
    assert amp_dtype(CPU, "auto") == torch.bfloat16 == amp_dtype(CPU, True)
    assert amp_dtype(torch.device("cuda"), "auto") == torch.float16
    assert amp_dtype(CPU, "float16") == torch.float16
    with autocast(CPU, "float16"):
        assert torch.get_autocast_dtype("cpu") == torch.float16 and torch.is_autocast_enabled("cpu")


def test_max_mode_draws_real_classes_only():
    labels = torch.zeros(4000, 2, 2, dtype=torch.long)
    torch.manual_seed(0)
    drawn = max_mode_target(labels, config("max", target_classes=tuple(range(11))))
    assert set(drawn.unique().tolist()) == set(range(11))  # every real class, never void 11
    drawn = max_mode_target(labels, config("max"))
    assert set(drawn.unique().tolist()) == set(range(12))  # no list: every output


def test_attack_config_targets_exclude_void():
    given = ("max_random_patch", 0.01, (96, 128), 14)
    assert attack_config(*given, SPECS["Synthetic"]).target_classes == tuple(range(11))
    street = attack_config(*given, SPECS["StreetHazard"]).target_classes
    assert street == tuple(range(1, 13))  # not "unlabeled" (0), nor output 13 (the anomaly)


def test_min_class_attacks_only_pixels_the_segnet_gets_right(segnet):
    images, _ = batch(b=3)
    with torch.no_grad():
        pred = segnet(images).argmax(1)
    labels = pred.clone()
    labels[:, ::2] = (pred[:, ::2] + 1) % 12  # every other row: the SegNet is wrong there
    torch.manual_seed(0)
    out = select_attack(images, labels, segnet, config(mask="class"))
    attacked = out.mask[:, 0] > 0
    assert attacked.any()
    assert torch.all(pred[attacked] == labels[attacked])
    torch.manual_seed(0)
    out_max = select_attack(images, labels, segnet, config("max", mask="class"))
    assert (out_max.mask[:, 0] > 0)[(pred != labels)].any()  # max_class: every pixel of the class


def test_attack_counts_hand_case():
    mask = torch.tensor([[[[1, 1, 0, 0]]]], dtype=torch.float32)
    before = torch.tensor([[[0, 1, 2, 3]]])
    pred = torch.tensor([[[0, 2, 2, 0]]])  # pixel 1 flipped inside, pixel 3 changed outside
    error = torch.tensor([[[0.0, 1.0, 1.0, 0.0]]])
    attack = AttackOutput(torch.zeros(1), mask, before)
    counts = attack_counts(attack, pred, error, None)
    assert counts.tolist() == [2, 1, 1, 2, 1, 0]  # attacked, flipped, err in, outside, err out,
    valid = torch.tensor([[[True, True, False, True]]])  # pasted
    assert attack_counts(attack, pred, error, valid).tolist() == [2, 1, 1, 1, 0, 0]
    summary = _epoch_summary(torch.tensor([1.0, 0, 0, 4, *counts.tolist()], dtype=torch.float64), 1)
    assert summary["attack_flip_rate"] == 0.5
    assert summary["segnet_error_in_mask"] == 0.5 and summary["segnet_error_outside_mask"] == 0.5
    assert "attack_flip_rate" not in _epoch_summary(torch.zeros(10, dtype=torch.float64), 1)


@pytest.mark.parametrize("amp", [None, "float16", "bfloat16"])
def test_observer_epoch_reports_the_attack_at_every_precision(segnet, amp):
    torch.manual_seed(0)
    obsnet = Obsnet_Seg(3, 1, width_mult=0.125)
    loader = [batch(seed=s) for s in range(2)]
    optimizer = torch.optim.SGD(obsnet.parameters(), lr=0.01)
    cfg = ObserverConfig(config(eps=0.5, mask="square_patch"))
    torch.manual_seed(1)
    stats = train_observer_epoch(ObserverJob(model=obsnet, loader=loader, optimizer=optimizer,
                                             device=CPU, amp=amp, progress=False, segnet=segnet,
                                             criterion=CRITERIA["bce"](2.0), config=cfg), 0)
    assert math.isfinite(stats["loss"])
    assert 0.05 < stats["attack_flip_rate"] <= 1  # a large epsilon flips pixels in every precision
    assert 0 <= stats["segnet_error_outside_mask"] <= 1
    assert stats["segnet_error_in_mask"] >= stats["segnet_error_outside_mask"] - 0.2


@pytest.mark.parametrize("epochs,after", [(10, {4: 1.0, 5: 0.04}), (20, {9: 1.0, 10: 0.2, 15: 0.04})])
def test_milestones_as_the_original(epochs, after):
    optim = OptimConfig(optim="SGD", lr=1.0, epoch=epochs)
    optimizer, scheduler = make_optimizer(optim, [torch.nn.Parameter(torch.zeros(1))])
    rates = []
    for _ in range(epochs):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    for epoch, factor in after.items():
        assert rates[epoch] == pytest.approx(factor)


def test_cli_amp_float16_logs_the_attack(tmp_path):
    from tests.helpers.runner import TINY, main_py, paths
    from obsnet.data.synthetic import generate
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    generate(tmp_path / "data", seed=0, n_train=8, n_val=2, n_test=2)
    seg = main_py(*TINY, *paths(tmp_path), "--train_segnet", "--epoch", "1", "--amp", "float16")
    assert seg.returncode == 0, seg.stderr
    obs = main_py(*TINY, *paths(tmp_path), "--epoch", "1", "--adv", "min_random_patch",
                  "--epsilon", "0.25", "--amp", "float16")
    assert obs.returncode == 0, obs.stderr
    assert "attack flip rate" in obs.stdout + obs.stderr and "SegNet error in mask" in obs.stdout + obs.stderr
    events = EventAccumulator(str(tmp_path / "logs"))
    events.Reload()
    flip = events.Scalars("Train/attack_flip_rate")
    assert len(flip) == 1 and 0 <= flip[0].value <= 1  # a 1-epoch SegNet may flip nothing
    assert {"Train/segnet_error_in_mask", "Train/segnet_error_outside_mask"} <= set(events.Tags()["scalars"])
    bad = main_py(*TINY, *paths(tmp_path), "--amp", "float32")
    assert bad.returncode == 2 and "--amp: invalid choice" in bad.stderr
