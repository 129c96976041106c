"""How many epochs fit a time budget: the real-data recipe's plan at a given scale.

``measure`` times a few training steps of the SegNet and of the observer (the local attack,
the SegNet's forward, the observer's forward and backward), and their forward passes, at the
recipe's size and width on the current device, on random images (the frames are decoded once
and kept in memory at that scale, so decoding is left out). ``plan`` turns those seconds per
image into SegNet and observer epochs that fit the budget with the test stages (MC dropout's
``T`` passes dominate them), and the minutes each stage should take. Both stages evaluate the
val split after every epoch; that is counted in their epochs.

The observer measured is the mirror observer on the SegNet's features (``Obsnet_Seg``); an
observer that also reads the logits costs about the same, a layer observer less, so the plan
errs on the long side for them.
"""
import copy
import math
import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from benchmarks.common import sync
from obsnet.attacks import select_attack
from obsnet.data.specs import SPECS
from obsnet.losses import CRITERIA
from obsnet.models.blocks import fold_batchnorm
from obsnet.models.obsnet import Obsnet_Seg
from obsnet.models.segnet import SegNet, freeze
from obsnet.stages import attack_config
from obsnet.train import make_scaler
from obsnet.utils import autocast

# Seconds each main.py stage spends outside its epochs: the interpreter and torch imports, the
# CUDA context, decoding the frames into memory, cuDNN's first kernels, writing checkpoints.
STAGE_OVERHEAD_S = 30.0
PASTE_S = 20.0  # one obsnet.paste run over CamVid's 101 val frames
SEGNET_SHARE = 0.7  # of the training time left after the test stages: the SegNet's part


@dataclass(frozen=True)
class Setting:
    """What is measured: image size (H, W), width, batch size, autocast, channels-last, and
    the number of timed steps (after one warm-up step)."""

    size: tuple[int, int]
    width: float
    bsize: int = 8
    amp: str | None = None
    channels_last: bool = False
    steps: int = 3


@dataclass(frozen=True)
class Throughput:
    """Seconds per image: SegNet training step, SegNet forward (evaluation), observer training
    step (attack included), observer forward on top of the SegNet's (evaluation)."""

    seg_train: float
    seg_eval: float
    obs_train: float
    obs_eval: float
    device: str = "cpu"


@dataclass(frozen=True)
class Splits:
    """Frames per split: training and validation; the splits of the test stages (val-sized:
    val_ood_real, val_ood, val) and of the paste stages that write them."""

    n_train: int
    n_val: int
    tests: tuple[str, ...]
    pastes: tuple[str, ...]


@dataclass(frozen=True)
class Plan:
    """Epochs of each training stage and the expected seconds of every stage."""

    seg_epochs: int
    obs_epochs: int
    seconds: dict = field(default_factory=dict)

    @property
    def total_s(self) -> float:
        return sum(self.seconds.values())


def _timed(step, setting: Setting, device: torch.device) -> float:
    """Median seconds per image of ``step()`` (one batch) over ``setting.steps`` calls, after a
    warm-up call."""
    step()
    times = []
    for _ in range(setting.steps):
        sync(device)
        start = time.perf_counter()
        step()
        sync(device)
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2] / setting.bsize


def _networks(setting: Setting, nclass: int, device: torch.device):
    """(a trainable SegNet, its frozen folded copy for the attack, an observer), random weights."""
    fmt = torch.channels_last if setting.channels_last else torch.contiguous_format
    segnet = SegNet(3, nclass, width_mult=setting.width).to(device, memory_format=fmt)
    frozen = fold_batchnorm(freeze(copy.deepcopy(segnet)).eval()).to(memory_format=fmt)
    observer = Obsnet_Seg(3, 1, width_mult=setting.width).to(device, memory_format=fmt).train()
    return segnet.train(), frozen, observer


def measure(setting: Setting, device: torch.device) -> Throughput:
    """Seconds per image of each stage's training step and forward pass (see the module)."""
    spec = SPECS["CamVid"]
    torch.manual_seed(0)
    segnet, frozen, observer = _networks(setting, spec.nclass, device)
    fmt = torch.channels_last if setting.channels_last else torch.contiguous_format
    images = torch.randn(setting.bsize, 3, *setting.size, device=device).to(memory_format=fmt)
    labels = torch.randint(0, spec.nclass, (setting.bsize, *setting.size), device=device)
    attack = attack_config("min_random_patch", 0.025, tuple(setting.size), spec.nclass, spec)
    criterion = CRITERIA["bce"](2.0).to(device)
    seg_opt = torch.optim.AdamW(segnet.parameters(), lr=1e-4)
    obs_opt = torch.optim.SGD(observer.parameters(), lr=1e-4)
    scaler = make_scaler(device, setting.amp)

    def step(loss, optimizer):
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()

    def seg_train():
        with autocast(device, setting.amp):
            loss = F.cross_entropy(segnet(images).float(), labels)
        step(loss, seg_opt)

    def obs_train():
        with autocast(device, setting.amp):
            attacked = select_attack(images, labels, frozen, attack).images
            with torch.no_grad():
                feats = frozen(attacked, return_feat=True)
                error = (feats[-1].argmax(1) != labels).float()
            loss = criterion(observer(attacked, feats).squeeze(1).float(), error)
        step(loss, obs_opt)

    with torch.no_grad(), autocast(device, setting.amp):
        feats = frozen(images, return_feat=True)
        seg_eval = _timed(lambda: frozen(images, return_feat=True), setting, device)
        obs_eval = _timed(lambda: observer.eval()(images, feats), setting, device)
    observer.train()
    return Throughput(seg_train=_timed(seg_train, setting, device), seg_eval=seg_eval,
                      obs_train=_timed(obs_train, setting, device), obs_eval=obs_eval,
                      device=device.type)


def seconds_per_test_image(tp: Throughput, T: int) -> float:
    """One frame of a test stage: the shared SegNet forward, MC dropout's ``T`` passes, the
    observer (the one-pass methods are functions of the logits: nothing measurable)."""
    return tp.seg_eval * (1 + T) + tp.obs_eval


def epoch_seconds(tp: Throughput, splits: Splits) -> tuple[float, float]:
    """Seconds of one SegNet epoch and of one observer epoch, each with its val evaluation."""
    seg = splits.n_train * tp.seg_train + splits.n_val * tp.seg_eval
    obs = splits.n_train * tp.obs_train + splits.n_val * (tp.seg_eval + tp.obs_eval)
    return seg, obs


def plan(tp: Throughput, splits: Splits, T: int, budget_s: float, seg_epochs: int | None = None,
         obs_epochs: int | None = None) -> Plan:
    """Epochs that fit ``budget_s`` (a given ``seg_epochs`` / ``obs_epochs`` is kept as it is):
    the paste and test stages first, then ``SEGNET_SHARE`` of the training time left to the
    SegNet and what remains to the observer. An epoch count may come out 0: the budget does
    not hold one epoch (the caller refuses)."""
    seg_epoch, obs_epoch = epoch_seconds(tp, splits)
    seconds = {f"paste {name}": PASTE_S for name in splits.pastes}
    seconds |= {f"test {name}": STAGE_OVERHEAD_S + splits.n_val * seconds_per_test_image(tp, T)
                for name in splits.tests}
    training = budget_s - sum(seconds.values()) - 2 * STAGE_OVERHEAD_S
    if seg_epochs is None:
        share = training * (SEGNET_SHARE if obs_epochs is None else 1.0)
        if obs_epochs is not None:
            share -= obs_epochs * obs_epoch
        seg_epochs = max(0, math.floor(share / seg_epoch))
    if obs_epochs is None:
        obs_epochs = max(0, math.floor((training - seg_epochs * seg_epoch) / obs_epoch))
    seconds = {"train SegNet": STAGE_OVERHEAD_S + seg_epochs * seg_epoch,
               "train ObsNet": STAGE_OVERHEAD_S + obs_epochs * obs_epoch, **seconds}
    return Plan(seg_epochs, obs_epochs, seconds)


def describe(plan_: Plan, tp: Throughput, budget_s: float) -> str:
    """The plan as printed before the stages run."""
    per_image = (f"measured on {tp.device}, ms per image: SegNet train {tp.seg_train * 1e3:.1f}, "
                 f"forward {tp.seg_eval * 1e3:.1f}; observer train {tp.obs_train * 1e3:.1f}, "
                 f"forward {tp.obs_eval * 1e3:.1f}")
    stages = ", ".join(f"{name} {s / 60:.1f}" for name, s in plan_.seconds.items())
    return (f"[plan] {per_image}\n[plan] SegNet {plan_.seg_epochs} epochs, observer "
            f"{plan_.obs_epochs} epochs; expected minutes: {stages}; total "
            f"{plan_.total_s / 60:.1f} of a {budget_s / 60:.1f}-minute budget")
