"""Every uncertainty method of the registry: contract (shape, range, batch independence, no
side effects) and the behaviour that defines each one."""
import math

import pytest
import torch
import torch.nn as nn

import obsnet.methods as U
from obsnet.methods import ALIASES, METHODS, EvalBatch, MethodConfig, parse_methods
from obsnet.models.segnet import SegNet, freeze
from tests.helpers import contracts
from tests.helpers.contracts import CFG, SHAPE, make_batch, same_state, scores_for, state
from tests.helpers.nets import tiny_nets

DETERMINISTIC = ["obsnet", "mcp", "temp_scale", "entropy", "max_logit", "energy", "odin",
                 "void", "ensemble", "sml", "sml_post", "mahalanobis"]
SEEDED = ["gauss", "mcda", "mc_dropout"]  # random, one draw per pass shared by the batch


@pytest.fixture(scope="module")
def nets():
    """A SegNet, an observer and a two-member ensemble (replaces conftest's ``nets``)."""
    return tiny_nets(0.125, members=2)


def test_registry_names_and_descriptions():
    expected = {"obsnet", "mcp", "mc_dropout", "temp_scale", "entropy", "max_logit", "energy",
                "odin", "void", "gauss", "mcda", "ensemble", "sml", "sml_post", "mahalanobis"}
    assert set(METHODS) == expected and ALIASES == {"mc_drop": "mc_dropout"}
    for method in METHODS.values():
        assert method.description and "\n" not in method.description
        assert method.to_prob is None or callable(method.to_prob)
    # ACE/ECE only where the score is the method's probability that the SegNet is wrong.
    assert {n for n, m in METHODS.items() if m.to_prob is None} == {
        "entropy", "max_logit", "energy", "odin", "void", "sml", "sml_post", "mahalanobis"}
    sampled = torch.rand(2, 3)
    for name in ("mc_dropout", "gauss", "mcda", "ensemble"):
        assert METHODS[name].to_prob(sampled, CFG) is None  # entropy: no probability
        assert METHODS[name].to_prob(sampled, MethodConfig(sampling_score="mcp")) is sampled


@pytest.mark.parametrize("name", sorted(METHODS))
def test_shape_range_and_no_side_effects(name, nets):
    contracts.shape_range_and_no_side_effects(name, nets)


@pytest.mark.parametrize("name", DETERMINISTIC + SEEDED)
def test_batch_of_four_equals_four_batches_of_one(name, nets):
    contracts.batch_of_four_equals_four_batches_of_one(name, nets)


def test_mc_dropout_masks_are_shared_by_the_batch(nets):
    """One dropout mask per pass for the whole batch: the same image in two slots gets the
    same scores, and another seed gives other scores."""
    images = torch.randn(4, *SHAPE)
    images[3] = images[0]
    cfg = MethodConfig(mc_passes=4, sampling_score="mcp")
    scores = scores_for("mc_dropout", nets, images, cfg, seed=1)
    assert (scores >= 0).all() and (scores <= 1).all()
    assert torch.allclose(scores[0], scores[3], atol=1e-6)
    entropy = scores_for("mc_dropout", nets, images, MethodConfig(mc_passes=4), seed=1)
    assert (entropy >= 0).all() and (entropy <= math.log(12) + 1e-5).all()  # nats, 12 classes
    other = scores_for("mc_dropout", nets, images, cfg, seed=2)
    assert not torch.allclose(scores, other)


def test_seeded_methods_are_random_across_seeds(nets):
    images = torch.randn(1, *SHAPE)
    for name in SEEDED:
        assert not torch.equal(scores_for(name, nets, images, seed=1),
                               scores_for(name, nets, images, seed=2))


# --------------------------------------------------------------------------- one forward

def batch_of_logits(logits, ensemble=()):
    """A batch whose shared forward gives ``logits`` (for the logit-only methods)."""
    return EvalBatch(torch.zeros(logits.shape[0], 3, *logits.shape[2:]), None, None,
                     [logits], ensemble)


def test_temp_scale_at_one_is_mcp_and_softens_above(nets):
    images = torch.randn(2, *SHAPE)
    mcp = scores_for("mcp", nets, images)
    assert torch.allclose(scores_for("temp_scale", nets, images, MethodConfig(temperature=1.0)),
                          mcp, atol=1e-6)
    assert (scores_for("temp_scale", nets, images, MethodConfig(temperature=3.0)) >= mcp - 1e-6).all()


def test_entropy_bounds():
    logits = torch.zeros(2, 5, 1, 1)
    logits[1, 2] = 100.0
    h = METHODS["entropy"].fn(batch_of_logits(logits), CFG)
    assert h[0].item() == pytest.approx(math.log(5), abs=1e-6) and 0 <= h[1].item() < 1e-6


def test_energy_and_max_logit_with_one_dominant_logit():
    logits = torch.zeros(3, 4, 1, 2)
    for i, big in enumerate((2.0, 10.0, 30.0)):
        logits[i, 1] = big
    batch = batch_of_logits(logits)
    e = METHODS["energy"].fn(batch, CFG)
    expected = torch.tensor([-(b + math.log1p(3 * math.exp(-b))) for b in (2.0, 10.0, 30.0)])
    assert torch.allclose(e[:, 0, 0], expected, atol=1e-5)
    assert (e[1:] < e[:-1]).all()  # a more confident pixel is less OOD
    assert torch.equal(METHODS["max_logit"].fn(batch, CFG)[:, 0, 0], -torch.tensor([2.0, 10.0, 30.0]))


def test_void_picks_the_void_channel():
    logits = torch.randn(2, 12, 4, 6)
    logits[0, 11] = 20.0
    logits[1, 3] = 20.0
    v = METHODS["void"].fn(batch_of_logits(logits), MethodConfig(void_class=11))
    assert torch.equal(v, logits[:, 11])  # the raw logit, as the original
    v3 = METHODS["void"].fn(batch_of_logits(logits), MethodConfig(void_class=3))
    assert torch.equal(v3, logits[:, 3])
    with pytest.raises(ValueError, match="void class"):
        METHODS["void"].fn(batch_of_logits(logits), MethodConfig(void_class=None))
    with pytest.raises(ValueError, match="class 12 is not one"):
        METHODS["void"].fn(batch_of_logits(logits), MethodConfig(void_class=12))


def test_void_class_per_dataset_is_the_originals():
    from obsnet.data.specs import SPECS
    from obsnet.config import TestConfig
    from obsnet.eval_stages import method_config
    test = TestConfig(T=2, Temp=1.0, odin_eps=0.0, odin_temp=1.0, gauss_lambda=0.0)
    assert method_config(test, SPECS["BddAnomaly"], 19).void_class == 18  # the last output
    assert method_config(test, SPECS["StreetHazard"], 19).void_class == 3  # "other"
    assert method_config(test, SPECS["CamVid"], 12).void_class == 11


# --------------------------------------------------------------------------- ODIN

def tempered_log_mcp(model, images, t):
    return torch.log_softmax(model(images).double() / t, 1).amax(1)


def test_odin_raises_the_tempered_max_softmax_of_most_pixels():
    """A pointwise model (each output pixel sees only its input pixel, classes varied): the
    ODIN step must raise max softmax(f/odin_temp) almost everywhere. Double precision, since
    the change at T=1000 is below float32 resolution. A target built from anything but the
    argmax (e.g. the original's max probabilities, i.e. class 0) would lower it often."""
    torch.manual_seed(1)
    model = nn.Conv2d(3, 12, 1).double().eval()
    images = torch.randn(2, *SHAPE, dtype=torch.float64)
    t, eps = CFG.odin_temp, CFG.odin_eps
    with torch.no_grad():  # as in evaluation: the gradient w.r.t. the input must still work
        assert model(images).argmax(1).unique().numel() >= 6
        perturbed = U.odin_perturb(model, images, eps, t)
        clean = tempered_log_mcp(model, images, t)
        assert torch.allclose((perturbed - images).abs(), torch.full_like(images, eps), atol=1e-9)
        assert (tempered_log_mcp(model, perturbed, t) > clean).double().mean() > 0.95
        assert (tempered_log_mcp(model, 2 * images - perturbed, t) < clean).double().mean() > 0.95


def test_odin_step_raises_the_summed_objective_of_a_conv_net():
    """With 3x3 receptive fields the step follows the gradient of the loss summed over
    pixels: the tempered log-probability of each pixel's clean argmax class, summed, goes up
    (and down for the opposite step)."""
    torch.manual_seed(2)
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.Tanh(),
                          nn.Conv2d(16, 12, 3, padding=1)).double().eval()
    images = torch.randn(2, *SHAPE, dtype=torch.float64)
    t = CFG.odin_temp

    def objective(x):
        return torch.log_softmax(model(x) / t, 1).gather(1, target.unsqueeze(1)).sum()

    with torch.no_grad():
        target = model(images).argmax(1)
        perturbed = U.odin_perturb(model, images, CFG.odin_eps, t)
        assert objective(perturbed) > objective(images) > objective(2 * images - perturbed)


def test_odin_on_the_segnet_touches_only_the_input(nets):
    segnet = nets[0]
    images = torch.randn(2, *SHAPE)
    with torch.no_grad():
        perturbed = U.odin_perturb(segnet, images, CFG.odin_eps, CFG.odin_temp)
    assert not perturbed.requires_grad
    assert (perturbed - images).abs().max() <= CFG.odin_eps * (1 + 1e-3)
    assert all(p.grad is None and not p.requires_grad for p in segnet.parameters())


# --------------------------------------------------------------------------- gauss

def test_gauss_with_zero_noise_is_mcp(nets):
    images = torch.randn(2, *SHAPE)
    as_mcp = {"mc_passes": 2, "sampling_score": "mcp"}
    assert torch.allclose(scores_for("gauss", nets, images, MethodConfig(gauss_lambda=0.0, **as_mcp)),
                          scores_for("mcp", nets, images), atol=1e-6)
    assert torch.allclose(scores_for("gauss", nets, images, MethodConfig(mc_passes=2, gauss_lambda=0.0)),
                          scores_for("entropy", nets, images), atol=1e-5)
    assert not torch.allclose(scores_for("gauss", nets, images, MethodConfig(gauss_lambda=0.05, **as_mcp)),
                              scores_for("mcp", nets, images), atol=1e-4)


class FailOnSecondPass(nn.Module):
    """Wraps a SegNet; the 2nd forward checks the weights are perturbed, then raises."""

    def __init__(self, net, originals):
        super().__init__()
        self.net, self.originals, self.calls = net, originals, 0

    def forward(self, x, **kwargs):
        self.calls += 1
        if self.calls == 2:
            assert not same_state(self.net, self.originals)
            raise RuntimeError("boom on pass 2")
        return self.net(x, **kwargs)


def test_gauss_restores_the_weights_exactly_after_an_exception():
    torch.manual_seed(3)
    segnet = freeze(SegNet(3, 12, width_mult=0.125))
    before = state(segnet)
    wrapped = FailOnSecondPass(segnet, before).eval()
    images = torch.randn(1, *SHAPE)
    batch = make_batch(images, wrapped)
    wrapped.calls = 0
    with torch.no_grad(), pytest.raises(RuntimeError, match="boom on pass 2"):
        METHODS["gauss"].fn(batch, MethodConfig(mc_passes=4, gauss_lambda=0.1))
    assert wrapped.calls == 2 and same_state(segnet, before)


# --------------------------------------------------------------------------- mcda

def test_mcda_augment_stays_in_pixel_range_and_shares_the_draw():
    mean, std = (0.4, 0.5, 0.6), (0.2, 0.25, 0.3)
    m, s = torch.tensor(mean).view(1, 3, 1, 1), torch.tensor(std).view(1, 3, 1, 1)
    images = (torch.rand(3, *SHAPE) - m) / s
    images[2] = images[0]
    out, _ = U.mcda_augment(images, mean, std)
    pixels = out * s + m
    assert pixels.min() >= -1e-6 and pixels.max() <= 1 + 1e-6
    assert torch.equal(out[0], out[2])  # one augmentation (noise included) for the batch
    assert 0 < (out - images).abs().mean() < 0.5


@pytest.mark.parametrize("flip_p", [0.0, 1.0])
def test_mcda_unflips_the_outputs(flip_p, monkeypatch):
    """With a pointwise model and no photometric change, every pass, flipped or not, must
    give back the plain prediction at the same pixel."""
    monkeypatch.setattr(U, "MCDA_FLIP_P", flip_p)
    for knob in ("MCDA_BRIGHTNESS", "MCDA_CONTRAST", "MCDA_NOISE"):
        monkeypatch.setattr(U, knob, 0.0)
    cfg = MethodConfig(mc_passes=2)
    pointwise = nn.Conv2d(3, 12, 1).eval()
    m, s = torch.tensor(cfg.mean).view(1, 3, 1, 1), torch.tensor(cfg.std).view(1, 3, 1, 1)
    images = (torch.rand(2, *SHAPE) - m) / s
    with torch.no_grad():
        batch = EvalBatch(images, pointwise, None, [pointwise(images)])
        assert torch.allclose(METHODS["mcda"].fn(batch, cfg), METHODS["entropy"].fn(batch, cfg),
                              atol=1e-5)


# --------------------------------------------------------------------------- ensemble

def test_ensemble_of_identical_members_is_mcp(nets):
    segnet = nets[0]
    images = torch.randn(2, *SHAPE)
    batch = make_batch(images, segnet, ensemble=(segnet, segnet))
    with torch.no_grad():
        mcp_cfg = MethodConfig(mc_passes=3, sampling_score="mcp")
        assert torch.allclose(METHODS["ensemble"].fn(batch, mcp_cfg), METHODS["mcp"].fn(batch, CFG),
                              atol=1e-6)
        assert torch.allclose(METHODS["ensemble"].fn(batch, CFG), METHODS["entropy"].fn(batch, CFG),
                              atol=1e-5)


def test_ensemble_averages_the_main_segnet_with_the_members(nets):
    segnet, _, members = nets
    images = torch.randn(2, *SHAPE)
    batch = make_batch(images, segnet, ensemble=members[:1])
    with torch.no_grad():
        mean = (segnet(images).softmax(1) + members[0](images).softmax(1)) / 2
        mcp_cfg = MethodConfig(mc_passes=3, sampling_score="mcp")
        assert torch.allclose(METHODS["ensemble"].fn(batch, mcp_cfg), 1 - mean.amax(1), atol=1e-6)
        entropy = -(mean * mean.log()).sum(1)  # in nats, not normalised (the original's)
        assert torch.allclose(METHODS["ensemble"].fn(batch, CFG), entropy, atol=1e-5)


def test_ensemble_needs_members(nets):
    batch = make_batch(torch.randn(1, *SHAPE), nets[0])
    with pytest.raises(ValueError, match="--ensemble FILE,FILE,... is required"):
        METHODS["ensemble"].fn(batch, CFG)


# --------------------------------------------------------------------------- parsing

def test_parse_methods_aliases_and_errors():
    assert parse_methods("obsnet, mcp,mc_drop,mcp") == ["obsnet", "mcp", "mc_dropout"]
    assert parse_methods("energy,odin,gauss") == ["energy", "odin", "gauss"]
    with pytest.raises(ValueError, match="unknown method 'odinn'") as err:
        parse_methods("odinn")
    assert all(name in str(err.value) for name in list(METHODS) + list(ALIASES))


@pytest.mark.parametrize("name", ["odin", "gauss"])
def test_gradient_methods_leave_a_trainable_segnet_untouched(name):
    """Weights that require grad (an unfrozen SegNet): no .grad, same values, same flags."""
    torch.manual_seed(4)
    segnet = SegNet(3, 12, width_mult=0.125).eval()
    before = state(segnet)
    batch = make_batch(torch.randn(1, *SHAPE), segnet)
    with torch.no_grad():
        METHODS[name].fn(batch, MethodConfig(mc_passes=2))
    assert same_state(segnet, before) and not segnet.training
    assert all(p.requires_grad and p.grad is None for p in segnet.parameters())
