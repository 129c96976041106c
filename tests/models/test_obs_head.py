"""The observer's head: "linear" (new observers' default, no tied scores) against the
original's ReLU'd single channel; which one a checkpoint has, and how each is loaded."""
import json
import shutil

import pytest
import torch
import torch.nn as nn

from obsnet.metrics.ood import OODMeter
from obsnet.models.checkpoint import CheckpointError
from obsnet.models.obsnet import HEADS, Obsnet_Seg, Obsnet_Small
from obsnet.models.observer_spec import ObserverRequest, ObserverSpec, resolve_observer
from obsnet.models.segnet import SegNet
from tests.helpers.runner import TINY, main_py, paths

WIDTH, NCLASS = 0.0625, 12


def scores(obsnet, seed=0):
    """The observer's logits on a random batch (eval mode, untrained weights)."""
    torch.manual_seed(seed)
    segnet = SegNet(3, NCLASS, width_mult=WIDTH).eval()
    x = torch.randn(2, 3, 32, 48)
    with torch.no_grad():
        feats = segnet(x, return_feat=True)
        return obsnet.eval()(x, feats).flatten()


def original_with_a_dead_half(cls, **kw):
    """An original-head observer whose last pre-activation is <= 0 on about half the pixels:
    untrained, it is centred near 0, so the ReLU zeroes that half into one score."""
    torch.manual_seed(1)
    return cls(width_mult=WIDTH, head="original", **kw)


@pytest.mark.parametrize("cls,kw", [(Obsnet_Seg, {}), (Obsnet_Small, {"input_channels": 512})])
def test_heads_share_every_weight(cls, kw):
    linear, original = (cls(width_mult=WIDTH, head=h, **kw) for h in HEADS)
    a, b = linear.state_dict(), original.state_dict()
    assert list(a) == list(b) and all(a[k].shape == b[k].shape for k in a)
    original.load_state_dict(a, strict=True)  # either checkpoint loads into either head


def test_original_head_ties_and_linear_does_not():
    original = original_with_a_dead_half(Obsnet_Seg)
    linear = Obsnet_Seg(width_mult=WIDTH, head="linear")
    linear.load_state_dict(original.state_dict())
    tied, free = scores(original), scores(linear)
    share = lambda s: torch.unique(s, return_counts=True)[1].max().item() / s.numel()  # noqa: E731
    assert share(tied) > 0.2  # the ReLU'd channel: one score for a large share of the pixels
    assert share(free) < 0.01
    # where the original's pre-activation is positive, both heads agree exactly
    assert torch.equal(tied[tied != tied.mode().values], free[tied != tied.mode().values])


def test_meter_tie_share_matches_a_count():
    s = scores(original_with_a_dead_half(Obsnet_Seg))
    meter = OODMeter()
    meter.update(s, torch.arange(s.numel()) % 3 == 0)
    expected = torch.unique(s, return_counts=True)[1].max().item() / s.numel()
    assert meter.compute()["tie_share"] == pytest.approx(expected, abs=1e-12)


def test_unknown_head_is_refused():
    with pytest.raises(ValueError, match="--obs_head wide"):
        ObserverSpec("segnet", head="wide")


def test_merge_head(tmp_path):
    torch.save({"model": {}, "observer": {"head": "linear"}}, tmp_path / "new.pth")
    torch.save({"model": {}, "observer": {}}, tmp_path / "older.pth")  # records flags, no head
    torch.save({"x": torch.zeros(1)}, tmp_path / "plain.pth")
    assert resolve_observer(tmp_path / "new.pth", ObserverRequest()).head == "linear"
    assert resolve_observer(tmp_path / "older.pth", ObserverRequest(head=None)).head == "original"
    assert resolve_observer(tmp_path / "plain.pth", ObserverRequest()).head == "original"
    assert resolve_observer(tmp_path / "plain.pth", ObserverRequest(head="linear")).head == "linear"
    with pytest.raises(CheckpointError, match="has the linear head, not --obs_head original"):
        resolve_observer(tmp_path / "new.pth", ObserverRequest(head="original"))


# --------------------------------------------------------------------------- command line

@pytest.fixture(scope="module")
def run(run_dir):
    """Observers with either head, trained on ``run_dir``'s SegNet (conftest)."""
    root = run_dir
    for head in HEADS:  # the linear one by default, without --obs_head
        flag = ["--obs_head", head] if head == "original" else []
        obs = main_py(*TINY, *paths(root), "--epoch", "1", "--lr", "0.01", *flag,
                      "--obsnet_file", str(root / head), "--tboard", str(root / f"{head}_logs"))
        assert obs.returncode == 0, obs.stderr
    return root


def test_training_records_the_head(run):
    """Including the default (the "linear" observer was trained without --obs_head)."""
    for head in HEADS:
        for name in ("best.pth", "last.pth"):
            assert torch.load(run / head / name, weights_only=True)["observer"]["head"] == head


def test_test_only_uses_the_recorded_head(run, tmp_path):
    """The original head's checkpoint, tested without --obs_head, scores with a ReLU: as a
    plain state_dict (original head) it gives the same numbers."""
    def test(obsnet_file, *extra):
        logs = tmp_path / f"logs{len(list(tmp_path.iterdir()))}"
        out = main_py(*TINY, *paths(run), "--obsnet_file", str(obsnet_file), "--tboard", str(logs),
                      "--test_only", "--test_multi", "obsnet", *extra)
        assert out.returncode == 0, out.stderr
        return json.loads((logs / "results_test_ood.json").read_text())["methods"]["obsnet"]

    recorded = test(run / "original")
    plain = tmp_path / "plain.pth"
    torch.save(torch.load(run / "original" / "best.pth", weights_only=True)["model"], plain)
    assert test(plain)["error"] == pytest.approx(recorded["error"], rel=1e-6)
    assert 0 <= recorded["tie_share"] <= 1


def test_contradicting_head_is_one_line(run, tmp_path):
    out = main_py(*TINY, *paths(run), "--obsnet_file", str(run / "linear"), "--tboard",
                  str(tmp_path / "logs"), "--test_only", "--test_multi", "obsnet",
                  "--obs_head", "original")
    assert out.returncode == 1
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and "has the linear head" in lines[0], out.stderr


def test_resume_keeps_the_head(run, tmp_path):
    """A run started with the original head resumes with it, without --obs_head."""
    folder = tmp_path / "obs"
    shutil.copytree(run / "original", folder)  # its epoch 1, trained with --obs_head original
    common = (*TINY, *paths(run), "--lr", "0.01", "--obsnet_file", str(folder), "--tboard",
              str(tmp_path / "logs"))
    out = main_py(*common, "--epoch", "2", "--resume")
    assert out.returncode == 0, out.stderr
    assert torch.load(folder / "last.pth", weights_only=True)["observer"]["head"] == "original"
    bad = main_py(*common, "--epoch", "3", "--resume", "--obs_head", "linear")
    assert bad.returncode == 1 and "has the original head" in bad.stderr


def test_relu_removed_only_from_the_last_block():
    obs = Obsnet_Seg(width_mult=WIDTH, head="linear")
    relus = [name for name, m in obs.named_modules() if isinstance(m, nn.ReLU)]
    original = [name for name, m in Obsnet_Seg(width_mult=WIDTH, head="original").named_modules()
                if isinstance(m, nn.ReLU)]
    assert set(original) - set(relus) == {"up1.conv2.cbr_unit.2"}
