"""Local adversarial attacks: masks, FGSM direction, no weight gradients."""
import pytest
import torch
import torch.nn.functional as F

from Models.segnet import SegNet, freeze
from Utils.adv_attack import MASKS, AttackConfig, fgsm, parse_attack, select_attack


def config(mask="random_patch", mode="min", eps=0.05, patch=(32, 40, 10, 16)):
    return AttackConfig(mode=mode, mask=mask, epsilon=eps, patch_size=patch, nclass=5,
                        mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25), noise_std=0.0)


@pytest.fixture(scope="module")
def segnet():
    torch.manual_seed(1)
    return freeze(SegNet(3, 5, width_mult=0.125))


def batch(b=3, h=64, w=80):
    return torch.randn(b, 3, h, w).clamp(-2, 2), torch.randint(0, 5, (b, h, w))


@pytest.mark.parametrize("name", sorted(MASKS))
def test_mask_shape_and_values(name):
    images, labels = batch()
    mask = MASKS[name](images, labels, config(name))
    assert mask.shape == (3, 1, 64, 80)
    assert set(mask.unique().tolist()) <= {0.0, 1.0}
    assert mask.sum() > 0


def test_patch_masks_stay_inside_one_region():
    images, labels = batch(b=16)
    for name in ("square_patch", "random_patch"):
        mask = MASKS[name](images, labels, config(name))[:, 0]
        for m in mask:
            rows, cols = m.nonzero(as_tuple=True)
            assert rows.max() - rows.min() < 32 and cols.max() - cols.min() < 40
    square = MASKS["square_patch"](images, labels, config("square_patch"))
    assert torch.all(square.sum(dim=(1, 2, 3)) == 32 * 40)
    shapes = MASKS["random_patch"](images, labels, config("random_patch")).sum(dim=(1, 2, 3))
    assert torch.all(shapes < 32 * 40) and torch.all(shapes > 10 * 10 / 2)
    assert len(set(shapes.tolist())) > 1  # each image draws its own shapes


def test_class_mask_covers_one_present_class_per_image():
    images, labels = batch(b=4)
    labels[2] = 3  # an image with a single class
    mask = MASKS["class"](images, labels, config("class"))[:, 0].bool()
    for m, lab in zip(mask, labels):
        chosen = lab[m].unique()
        assert len(chosen) == 1 and torch.equal(m, lab == chosen)


@pytest.mark.parametrize("mode", ["min", "max"])
def test_fgsm_only_inside_mask_and_moves_loss(segnet, mode):
    images, labels = batch()
    cfg = config("square_patch", mode=mode)
    torch.manual_seed(3)
    adv, mask = select_attack(images, labels, segnet, cfg)
    outside = mask.expand_as(images) == 0
    assert torch.equal(adv[outside], images[outside])
    assert (adv - images).abs().max() <= cfg.epsilon + 1e-6
    assert all(p.grad is None for p in segnet.parameters())
    if mode == "min":  # the true class's loss goes up
        before = F.cross_entropy(segnet(images), labels)
        assert F.cross_entropy(segnet(adv), labels) > before


def test_max_mode_pushes_towards_the_random_class(segnet):
    images, labels = batch(b=1)
    mask = torch.ones_like(images[:, :1])
    torch.manual_seed(5)
    adv = fgsm(segnet, images, labels, mask, config("all_image", mode="max", eps=0.05))
    torch.manual_seed(5)
    fake = torch.randint(0, 5, (1, 1, 1)).expand_as(labels)
    assert F.cross_entropy(segnet(adv), fake) < F.cross_entropy(segnet(images), fake)


def test_attack_keeps_pixels_in_valid_range(segnet):
    images, labels = batch()
    images[:] = 2.0  # the upper bound of (1 - 0.5) / 0.25
    adv, _ = select_attack(images, labels, segnet, config("all_image", eps=1.0))
    assert adv.max() <= 2.0 + 1e-6


def test_parse_attack():
    assert parse_attack("none") is None
    assert parse_attack("min_random_patch") == ("min", "random_patch")
    assert parse_attack("max_all_image") == ("max", "all_image")
    with pytest.raises(ValueError):
        parse_attack("mid_square_patch")
