"""Uncertainty methods: shapes, batch independence, no side effects; evaluation pass."""
import pytest
import torch

from Dataset.specs import SPECS
from evaluation import evaluate
from Models.obsnet import Obsnet_Seg
from Models.segnet import SegNet, freeze
from Utils.uncertainty import METHODS, EvalBatch, MethodConfig, max_softmax_uncertainty, parse_methods


@pytest.fixture(scope="module")
def nets():
    torch.manual_seed(0)
    return freeze(SegNet(3, 12, width_mult=0.125)), Obsnet_Seg(3, 1, width_mult=0.125).eval()


def scores_for(name, nets, images, seed=0):
    segnet, obsnet = nets
    torch.manual_seed(seed)
    with torch.no_grad():
        batch = EvalBatch(images, segnet, obsnet, segnet(images, return_feat=True))
        return METHODS[name].fn(batch, MethodConfig(mc_passes=4))


@pytest.mark.parametrize("name", sorted(METHODS))
def test_shape_and_no_side_effects(name, nets):
    images = torch.randn(4, 3, 32, 48)
    before = {k: v.clone() for k, v in nets[0].state_dict().items()}
    scores = scores_for(name, nets, images)
    assert scores.shape == (4, 32, 48) and torch.isfinite(scores).all()
    assert not nets[0].training and not nets[1].training
    assert all(torch.equal(v, before[k]) for k, v in nets[0].state_dict().items())


@pytest.mark.parametrize("name", ["obsnet", "mcp"])
def test_deterministic_methods_are_batch_independent(name, nets):
    images = torch.randn(4, 3, 32, 48)
    whole = scores_for(name, nets, images)
    single = torch.cat([scores_for(name, nets, images[i:i + 1]) for i in range(4)])
    assert torch.allclose(whole, single, atol=1e-5)


def test_mc_dropout_scores_each_image_of_the_batch(nets):
    images = torch.randn(4, 3, 32, 48)
    images[3] = images[0]
    scores = scores_for("mc_dropout", nets, images)
    assert (scores >= 0).all() and (scores <= 1).all()
    # the same image in two slots gets the same distribution of scores, not one copied value
    assert not torch.equal(scores[0], scores[3])
    assert abs(scores[0].mean() - scores[3].mean()) < 0.05


def test_max_softmax_uncertainty_range():
    logits = torch.tensor([[[[10.0]], [[0.0]]], [[[0.0]], [[0.0]]]])
    u = max_softmax_uncertainty(logits)
    assert u[0].item() < 1e-4 and abs(u[1].item() - 0.5) < 1e-6


def test_parse_methods_aliases_and_errors():
    assert parse_methods("obsnet, mcp,mc_drop,mcp") == ["obsnet", "mcp", "mc_dropout"]
    with pytest.raises(ValueError, match="unknown method 'odinn'"):
        parse_methods("odinn")


def test_evaluate_results_schema(nets):
    segnet, obsnet = nets
    spec = SPECS["Synthetic"]
    images = torch.randn(6, 3, 32, 48)
    labels = torch.randint(0, 12, (6, 32, 48))
    labels[:, :4, :4] = 12  # anomaly pixels
    loader = [(images[:4], labels[:4]), (images[4:], labels[4:])]
    results, preview = evaluate(segnet, obsnet, loader, ["obsnet", "mcp", "mc_dropout"], spec,
                                torch.device("cpu"), MethodConfig(mc_passes=2), 12, "test_ood",
                                progress=False)
    assert results["split"] == "test_ood" and results["n_images"] == 6
    assert 0 <= results["segnet"]["miou"] <= 1 and 0 <= results["segnet"]["pixel_acc"] <= 1
    for entry in results["methods"].values():
        assert set(entry["ood"]) == {"auroc", "aupr", "fpr95"}
        assert set(entry["error"]) == {"auroc", "aupr_error", "aupr_success", "fpr95", "ace"}
        assert entry["ms_per_image"] > 0
        assert all(0 <= v <= 1 for v in entry["error"].values())
    assert preview["maps"]["obsnet"].shape == (4, 32, 48)
    no_ood = [(images, labels.clamp(max=11))]
    results, _ = evaluate(segnet, None, no_ood, ["mcp"], spec, torch.device("cpu"),
                          MethodConfig(), 12, "val", progress=False)
    assert "ood" not in results["methods"]["mcp"]
