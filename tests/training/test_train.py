"""Training behaviour: flags do what their help says, AMP on CPU, reproducibility, resume."""
import logging

import pytest
import torch

from obsnet.data.synthetic import generate
from obsnet.losses import CRITERIA
from obsnet.train import ObserverConfig, ObserverJob, observer_step, train_observer_epoch
from tests.helpers.runner import main_py
from tests.helpers.nets import tiny_nets


@pytest.fixture()
def nets():
    """A SegNet and an observer in training mode (replaces conftest's ``nets``)."""
    segnet, obsnet = tiny_nets(0.0625, observer_first=True, observer_eval=False)
    obsnet.up1.conv2.cbr_unit[1].bias.data.fill_(1.0)  # a fresh 1-channel ReLU is often all zero
    return segnet, obsnet


def observer_job(nets, loader, optimizer, criterion, amp=False):
    """One observer epoch's job on the CPU, clean images, no progress bar."""
    return ObserverJob(model=nets[1], loader=loader, optimizer=optimizer, device=torch.device("cpu"),
                       amp=amp, progress=False, segnet=nets[0], criterion=criterion,
                       config=ObserverConfig(None))


def step(nets, cfg, seed=0):
    torch.manual_seed(0)  # the same batch every time; ``seed`` drives the step's randomness
    images, labels = torch.randn(2, 3, 32, 48), torch.randint(0, 12, (2, 32, 48))
    torch.manual_seed(seed)
    loss, error, _, _ = observer_step(images, labels, nets[0], nets[1], CRITERIA["bce"](2.0), cfg)
    return loss, error


def test_noise_changes_what_the_segnet_sees(nets):
    nets[1].eval()
    clean = step(nets, ObserverConfig(attack=None))[0]
    assert torch.equal(clean, step(nets, ObserverConfig(attack=None), seed=1)[0])
    assert not torch.equal(clean, step(nets, ObserverConfig(attack=None, noise=1.0))[0])


def test_drop_keeps_segnet_dropout_active(nets):
    nets[1].eval()  # only the SegNet may be random here
    cfg = ObserverConfig(attack=None, drop=True)
    assert not torch.equal(step(nets, cfg, seed=1)[0], step(nets, cfg, seed=2)[0])
    cfg = ObserverConfig(attack=None, drop=False)
    assert torch.equal(step(nets, cfg, seed=1)[0], step(nets, cfg, seed=2)[0])


def test_ignored_pixels_leave_the_loss(nets):
    nets[1].eval()
    torch.manual_seed(0)
    images, labels = torch.randn(1, 3, 32, 48), torch.randint(0, 12, (1, 32, 48))
    ignored = labels.clone()
    ignored[:, :16] = 255
    criterion = CRITERIA["bce"](2.0)
    full, _, logits, _ = observer_step(images, labels, *nets, criterion, ObserverConfig(None))
    half, _, _, _ = observer_step(images, ignored, *nets, criterion,
                               ObserverConfig(None, ignore_id=255))
    error = (nets[0](images).argmax(1) != ignored).float()
    expected = criterion(logits[:, 16:], error[:, 16:])
    assert torch.allclose(half, expected) and not torch.allclose(half, full)


def test_amp_on_cpu_trains(nets):
    loader = [(torch.randn(2, 3, 32, 48), torch.randint(0, 12, (2, 32, 48)))] * 2
    optimizer = torch.optim.SGD(nets[1].parameters(), lr=0.01)
    stats = train_observer_epoch(observer_job(nets, loader, optimizer, CRITERIA["bce"](2.0),
                                              amp=True), 0)
    assert torch.isfinite(torch.tensor(stats["loss"]))


def test_seeded_runs_are_identical_and_resume_matches(tmp_path):
    generate(tmp_path / "data", seed=0, n_train=8, n_val=2, n_test=2)
    common = ["--data", "Synthetic", "--dset_folder", str(tmp_path / "data"), "--size", "32", "48",
              "--width_mult", "0.0625", "--bsize", "4", "--seed", "3", "--segnet_file",
              str(tmp_path / "segnet.pth"), "--adv", "min_random_patch", "--lr", "0.05",
              "--num_workers", "0"]
    assert main_py(*common, "--train_segnet", "--epoch", "1", "--tboard", str(tmp_path / "l")).returncode == 0
    runs = {}
    for name, extra in {"a": [], "b": []}.items():
        out = main_py(*common, "--epoch", "2", "--obsnet_file", str(tmp_path / name),
                      "--tboard", str(tmp_path / f"l{name}"), *extra)
        assert out.returncode == 0, out.stderr
        runs[name] = out.stdout
    first = main_py(*common, "--epoch", "1", "--obsnet_file", str(tmp_path / "c"),
                    "--tboard", str(tmp_path / "lc"))
    resumed = main_py(*common, "--epoch", "2", "--resume", "--obsnet_file", str(tmp_path / "c"),
                      "--tboard", str(tmp_path / "lc"))
    assert first.returncode == 0 and resumed.returncode == 0, resumed.stderr
    losses = [line for line in runs["a"].splitlines() if line.startswith("ObsNet epoch")]
    assert losses and losses == [line for line in runs["b"].splitlines()
                                 if line.startswith("ObsNet epoch")]
    states = {n: torch.load(tmp_path / n / "last.pth", weights_only=True) for n in "abc"}
    assert {"model", "optimizer", "scheduler", "scaler", "epoch", "best", "rng", "args"} <= set(states["a"])
    for key, value in states["a"]["model"].items():
        assert torch.equal(value, states["b"]["model"][key]), key  # same seed, same weights
        assert torch.equal(value, states["c"]["model"][key]), key  # 1 epoch + resume = 2 epochs


class _NanLoss(torch.nn.Module):
    def forward(self, logits, target):
        return (logits * float("nan")).mean()


def test_nan_loss_stops_with_epoch_and_step(nets):
    loader = [(torch.randn(2, 3, 32, 48), torch.randint(0, 12, (2, 32, 48)))] * 3
    optimizer = torch.optim.SGD(nets[1].parameters(), lr=0.01)
    with pytest.raises(FloatingPointError, match="loss is nan at epoch 4, step 0"):
        train_observer_epoch(observer_job(nets, loader, optimizer, _NanLoss()), 4)


def test_nan_score_in_evaluation_names_the_method(nets, monkeypatch):
    from obsnet.data.specs import SPECS
    from obsnet.evaluate import evaluate
    from obsnet import methods
    from obsnet.methods import METHODS, Method, MethodConfig
    broken = Method(lambda batch, cfg: torch.full(batch.images.shape[:1] + batch.images.shape[2:],
                                                  float("nan")), None)
    monkeypatch.setitem(METHODS, "broken", broken)
    assert methods.METHODS["broken"] is broken
    loader = [(torch.randn(2, 3, 32, 48), torch.randint(0, 12, (2, 32, 48)))]
    with pytest.raises(FloatingPointError, match="method 'broken' produced NaN scores"):
        evaluate(nets[0], None, loader, ["broken"], SPECS["Synthetic"], torch.device("cpu"),
                 MethodConfig(), 12, "val", progress=False)


class SlowLoader:
    """Two batches, each handed out after ``delay`` seconds (a loader that cannot keep up)."""

    def __init__(self, delay):
        self.delay = delay

    def __len__(self):
        return 2

    def __iter__(self):
        import time
        for _ in range(2):
            time.sleep(self.delay)
            yield torch.randn(2, 3, 32, 48), torch.randint(0, 12, (2, 32, 48))


def test_epoch_reports_time_waiting_for_data(nets):
    segnet, obsnet = nets
    optimizer = torch.optim.SGD(obsnet.parameters(), lr=0.01)
    stats = [train_observer_epoch(observer_job((segnet, obsnet), SlowLoader(delay), optimizer,
                                               CRITERIA["bce"](2.0)), 0) for delay in (0.0, 0.25)]
    assert stats[1]["data_wait"] >= 0.5 > stats[0]["data_wait"]
    assert stats[1]["seconds"] >= stats[1]["data_wait"]
    assert 0 <= stats[0]["data_wait_share"] < stats[1]["data_wait_share"] <= 1


def test_slow_data_is_reported_once_per_stage(caplog):
    from types import SimpleNamespace

    from obsnet.fit import log_data_wait
    from obsnet.report import NullWriter
    rt, writer = SimpleNamespace(is_main=True), NullWriter()
    stats = {"data_wait_share": 0.05, "seconds": 10.0}
    caplog.set_level(logging.INFO, logger="obsnet")
    assert not log_data_wait(rt, writer, stats, 0, False)
    assert "waiting for data" not in caplog.text
    stats["data_wait_share"] = 0.5
    assert log_data_wait(rt, writer, stats, 1, False)
    assert log_data_wait(rt, writer, stats, 2, True)
    assert caplog.text.count("50% of the time went to waiting for data") == 1
