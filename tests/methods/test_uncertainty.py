"""Shared uncertainty helpers and the evaluation pass (per-method tests: test_methods.py)."""
import math
import pytest
import torch

from obsnet.data.specs import SPECS
from obsnet.evaluate import evaluate
from obsnet.methods import MethodConfig, max_softmax_uncertainty, mean_softmax_uncertainty


def test_max_softmax_uncertainty_range():
    logits = torch.tensor([[[[10.0]], [[0.0]]], [[[0.0]], [[0.0]]]])
    u = max_softmax_uncertainty(logits)
    assert u[0].item() < 1e-4 and abs(u[1].item() - 0.5) < 1e-6


def test_mean_softmax_uncertainty_averages_probabilities():
    a = torch.tensor([[[[10.0]], [[0.0]]]])
    b = torch.tensor([[[[0.0]], [[10.0]]]])
    assert torch.allclose(mean_softmax_uncertainty([a], "mcp"), max_softmax_uncertainty(a))
    assert abs(mean_softmax_uncertainty([a, b], "mcp").item() - 0.5) < 1e-6  # not the mean of scores
    # The default, the original's: entropy (nats) of the mean softmax, log 2 for [a, b].
    assert abs(mean_softmax_uncertainty([a, b]).item() - math.log(2)) < 1e-6
    p = torch.softmax(a, 1)
    assert torch.allclose(mean_softmax_uncertainty([a]), -(p * p.log()).sum(1))
    with pytest.raises(ValueError, match="--sampling_score"):
        mean_softmax_uncertainty([a], "max")
    with pytest.raises(ValueError, match="no pass"):
        mean_softmax_uncertainty([])


def test_evaluate_results_schema(nets):
    segnet, obsnet = nets
    spec = SPECS["Synthetic"]
    images = torch.randn(6, 3, 32, 48)
    labels = torch.randint(0, 12, (6, 32, 48))
    labels[:, :4, :4] = 12  # anomaly pixels
    loader = [(images[:4], labels[:4]), (images[4:], labels[4:])]
    results, preview = evaluate(segnet, obsnet, loader, ["obsnet", "mcp", "mc_dropout"], spec,
                                torch.device("cpu"), MethodConfig(mc_passes=2), 12, "test_ood",
                                progress=False)[:2]
    assert results["split"] == "test_ood" and results["n_images"] == 6
    assert 0 <= results["segnet"]["miou"] <= 1 and 0 <= results["segnet"]["pixel_acc"] <= 1
    for entry in results["methods"].values():
        assert set(entry["ood"]) == {"auroc", "aupr", "fpr95"}
        assert {"auroc", "aupr_error", "aupr_success", "fpr95", "ace"} <= set(entry["error"])
        assert entry["ms_per_image"] > 0
        assert all(0 <= v <= 1 for v in entry["error"].values() if v is not None)
    assert preview["maps"]["obsnet"].shape == (4, 32, 48)
    no_ood = [(images, labels.clamp(max=11))]
    results = evaluate(segnet, None, no_ood, ["mcp"], spec, torch.device("cpu"),
                       MethodConfig(), 12, "val", progress=False)[0]
    assert "ood" not in results["methods"]["mcp"]
