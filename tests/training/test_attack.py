"""Local adversarial attacks: masks, FGSM direction, no weight gradients."""
import re

import pytest
import torch
import torch.nn.functional as F

from obsnet.attacks import MASKS, attack_choices, fgsm, parse_attack, select_attack
from obsnet.models.segnet import SegNet, freeze
from tests.helpers import contracts
from tests.helpers.contracts import batch, bbox, config, make_mask
from tests.helpers.devices import DEVICES


@pytest.fixture(scope="module")
def segnet():
    torch.manual_seed(1)
    return freeze(SegNet(3, 5, width_mult=0.125))




# ----------------------------------------------------------------------------- the mask contract

@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", sorted(MASKS))
def test_mask_shape_binary_values_and_device(name, device):
    contracts.mask_shape_binary_values_and_device(name, device)


@pytest.mark.parametrize("name", sorted(MASKS))
def test_mask_stays_inside_bounds(name):
    contracts.mask_stays_inside_bounds(name)


@pytest.mark.parametrize("name", sorted(MASKS))
def test_mask_coverage(name):
    contracts.mask_coverage(name)


@pytest.mark.parametrize("name", sorted(set(MASKS) - {"all_image"}))
def test_each_image_of_a_batch_draws_its_own_mask(name):
    contracts.each_image_of_a_batch_draws_its_own_mask(name)


@pytest.mark.parametrize("name", sorted(MASKS))
def test_mask_of_an_image_ignores_the_other_images_content(name):
    contracts.mask_of_an_image_ignores_the_other_images_content(name)


def test_fractal_masks_depend_on_the_seed_only():
    images, labels = batch(b=4)
    first = make_mask("fractal", images, labels, seed=1)
    assert torch.equal(first, make_mask("fractal", images, labels, seed=1))
    assert not torch.equal(first, make_mask("fractal", images, labels, seed=2))


def test_fractal_coverage_at_a_large_region():
    """The dilation grows with the region: ~15–55% (5–95% quantiles) at 128×160."""
    images, labels = batch(b=8, h=160, w=200)
    mask = make_mask("fractal", images, labels, patch=(128, 160, 60, 80))
    share = mask.sum(dim=(1, 2, 3)) / (128 * 160)
    assert torch.all(share > 0.05) and torch.all(share < 0.9)
    assert all(bbox(m) == (128, 160) for m in mask[:, 0])


@pytest.mark.parametrize("mode", ["min", "max"])
def test_fgsm_only_inside_mask_and_moves_loss(segnet, mode):
    images, labels = batch()
    cfg = config("square_patch", mode=mode)
    torch.manual_seed(3)
    adv, mask, _ = select_attack(images, labels, segnet, cfg)
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
    adv, _ = fgsm(segnet, images, labels, mask, config("all_image", mode="max", eps=0.05))
    torch.manual_seed(5)
    fake = torch.randint(0, 5, (1, 1, 1)).expand_as(labels)
    assert F.cross_entropy(segnet(adv), fake) < F.cross_entropy(segnet(images), fake)


def test_attack_keeps_pixels_in_valid_range(segnet):
    images, labels = batch()
    images[:] = 2.0  # the upper bound of (1 - 0.5) / 0.25
    adv = select_attack(images, labels, segnet, config("all_image", eps=1.0)).images
    assert adv.max() <= 2.0 + 1e-6


def test_parse_attack():
    assert parse_attack("none") is None
    assert parse_attack("fractal") == ("max", "fractal", False)  # the original's --adv fractal
    assert parse_attack("min_fractal") == ("min", "fractal", False)
    assert parse_attack("min_random_patch") == ("min", "random_patch", False)
    assert parse_attack("max_all_image") == ("max", "all_image", False)
    assert parse_attack("paste") == (None, None, True)
    assert parse_attack("paste+min_random_patch") == ("min", "random_patch", True)
    for bad in ("mid_square_patch", "paste+fractal", "paste+none", "paste+paste", "paste_min_class",
                "min_random_patch+paste", "paste+"):
        with pytest.raises(ValueError, match=re.escape(f"--adv {bad}: expected one of")):
            parse_attack(bad)


def test_attack_choices_cover_every_mode_and_mask():
    expected = {f"{mode}_{mask}" for mode in ("min", "max") for mask in MASKS}
    pasted = {f"paste+{name}" for name in expected}
    assert set(attack_choices()) == expected | pasted | {"none", "fractal", "paste"}
    assert all(parse_attack(name) or name == "none" for name in attack_choices())
