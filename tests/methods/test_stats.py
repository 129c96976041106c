"""--fit_stats and the two methods it feeds (sml, mahalanobis): the streaming fit equals a
brute-force computation over every pixel, the scores equal their per-pixel formulas, a batch
scores like its images one by one, and the command line end to end."""
import json
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from obsnet.methods import METHODS, EvalBatch, MethodConfig
from obsnet.models.segnet import SegNet, freeze
from obsnet.stats import (fit_class_stats, load_stats, save_stats, stats_path, toy_class_stats)
from tests.helpers.runner import TINY, main_py, paths

NCLASS, IGNORE = 5, 255


@pytest.fixture(scope="module")
def segnet():
    torch.manual_seed(3)
    return freeze(SegNet(3, NCLASS, width_mult=0.125))


def batches(n=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        images = torch.randn(2, 3, 32, 48, generator=g)
        labels = torch.randint(0, NCLASS, (2, 32, 48), generator=g)
        labels[:, :3] = IGNORE
        labels[labels == 4] = IGNORE  # class 4 never labelled: left out of mahalanobis
        out.append((images, labels))
    return out


def brute_force(segnet, data):
    tops, preds, feats, labels = [], [], [], []
    with torch.no_grad():
        for images, lab in data:
            f = segnet(images, return_feat=True)
            logits = f[-1]
            x = F.interpolate(f[-2], size=logits.shape[-2:], mode="bilinear", align_corners=False)
            top, pred = logits.max(dim=1)
            tops.append(top.reshape(-1).double().numpy())
            preds.append(pred.reshape(-1).numpy())
            feats.append(x.permute(0, 2, 3, 1).reshape(-1, x.shape[1]).double().numpy())
            labels.append(lab.reshape(-1).numpy())
    return tuple(np.concatenate(a) for a in (tops, preds, feats, labels))


def fit(segnet, data):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        stats = fit_class_stats(segnet, data, NCLASS, torch.device("cpu"), IGNORE)
    return stats, [str(w.message) for w in caught]


def test_fit_equals_brute_force(segnet):
    data = batches()
    stats, said = fit(segnet, data)
    top, pred, x, lab = brute_force(segnet, data)
    for c in range(NCLASS):
        mine = pred == c
        if mine.any():
            assert stats.logit_mean[c].item() == pytest.approx(top[mine].mean(), rel=1e-9, abs=1e-9)
            assert stats.logit_std[c].item() == pytest.approx(max(top[mine].std(), 1e-6), rel=1e-6)
        else:
            assert stats.logit_mean[c] == 0 and stats.logit_std[c] == 1
            assert any("never predicted" in s for s in said)
    valid = lab != IGNORE
    assert stats.label_counts.tolist() == [int((lab == c).sum()) for c in range(NCLASS)]
    assert stats.feat_present.tolist() == [True] * 4 + [False]
    assert any("no labelled" in s for s in said)
    means = np.stack([x[lab == c].mean(0) for c in range(4)])
    assert np.allclose(stats.feat_mean[:4].numpy(), means, atol=1e-9)
    centred = x[valid] - means[lab[valid]]
    cov = centred.T @ centred / valid.sum()
    d = x.shape[1]
    cov += 1e-6 * np.trace(cov) / d * np.eye(d)
    assert stats.feat_dim == d == 8
    assert np.allclose(stats.covariance.numpy(), cov, atol=1e-9, rtol=1e-7)
    assert np.allclose(stats.precision.numpy() @ cov, np.eye(d), atol=1e-6)


def test_save_load_and_missing_file(segnet, tmp_path):
    stats, _ = fit(segnet, batches(1))
    seg = tmp_path / "seg.pth"
    assert stats_path(seg) == tmp_path / "seg.stats.pth"
    save_stats(stats, stats_path(seg))
    back = load_stats(stats_path(seg), NCLASS)
    assert back.nclass == NCLASS and back.feat_dim == 8
    assert torch.equal(back.precision, stats.precision)
    with pytest.raises(Exception, match="fitted for 5 classes"):
        load_stats(stats_path(seg), 7)
    with pytest.raises(Exception, match="run main.py --fit_stats"):
        load_stats(tmp_path / "none.stats.pth", NCLASS)


def score(name, segnet, images, stats):
    with torch.no_grad():
        batch = EvalBatch(images, segnet, None, segnet(images, return_feat=True))
        return METHODS[name].fn(batch, MethodConfig(class_stats=stats))


def test_scores_equal_per_pixel_formulas(segnet):
    stats, _ = fit(segnet, batches())
    images = torch.randn(2, 3, 32, 48)
    top, pred, x, _ = brute_force(segnet, [(images, torch.zeros(2, 32, 48, dtype=torch.long))])
    mu, sigma = stats.logit_mean.numpy(), stats.logit_std.numpy()
    sml = score("sml", segnet, images, stats).reshape(-1).double().numpy()
    assert np.allclose(sml, -(top - mu[pred]) / sigma[pred], atol=1e-4)
    P, means = stats.precision.numpy(), stats.feat_mean.numpy()[:4]  # class 4 left out
    diff = x[:, None, :] - means[None]
    expected = np.einsum("ncd,de,nce->nc", diff, P, diff).min(1)
    maha = score("mahalanobis", segnet, images, stats).reshape(-1).double().numpy()
    assert np.allclose(maha, expected, rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("name", ["sml", "mahalanobis"])
def test_batch_of_two_equals_images_alone(name, segnet):
    stats = toy_class_stats(NCLASS, 8)
    images = torch.randn(2, 3, 32, 48)
    whole = score(name, segnet, images, stats)
    alone = torch.cat([score(name, segnet, images[i:i + 1], stats) for i in range(2)])
    assert whole.shape == (2, 32, 48) and torch.allclose(whole, alone, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["sml", "mahalanobis"])
def test_missing_stats_is_one_line(name, segnet):
    with pytest.raises(ValueError, match="--fit_stats") as err:
        score(name, segnet, torch.randn(1, 3, 32, 48), None)
    assert "\n" not in str(err.value)


def test_cli_fit_stats_then_test(run_dir):
    missing = main_py(*TINY, *paths(run_dir), "--test_only", "--test_multi", "sml,mcp")
    assert missing.returncode != 0
    assert len(missing.stderr.strip().splitlines()) == 1 and "--fit_stats" in missing.stderr
    fitted = main_py(*TINY, *paths(run_dir), "--fit_stats")
    assert fitted.returncode == 0, fitted.stderr
    said = [line for line in fitted.stderr.splitlines() if "never predicted" in line or "no labelled" in line]
    assert all(line.startswith("main.py: warning: --fit_stats: class(es) ") for line in said), said
    assert stats_path(run_dir / "segnet.pth").is_file()
    again = main_py(*TINY, *paths(run_dir), "--fit_stats")
    assert again.returncode != 0 and "--overwrite" in again.stderr
    assert len(again.stderr.strip().splitlines()) == 1
    test = main_py(*TINY, *paths(run_dir), "--test_only", "--test_multi",
                   "sml,sml_post,mahalanobis,mcp")
    assert test.returncode == 0, test.stderr
    results = json.loads((run_dir / "logs" / "results_test_ood.json").read_text())
    assert set(results["methods"]) == {"sml", "sml_post", "mahalanobis", "mcp"}
    for entry in results["methods"].values():
        assert 0 <= entry["ood"]["auroc"] <= 1 and 0 <= entry["error"]["auroc"] <= 1
