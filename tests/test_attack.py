"""Local adversarial attacks: masks, FGSM direction, no weight gradients."""
import re

import pytest
import torch
import torch.nn.functional as F

from obsnet.attacks import (ATTACK_CHOICES, MASKS, AttackConfig, fgsm, parse_attack,
                            select_attack)
from obsnet.models.segnet import SegNet, freeze


def config(mask="random_patch", mode="min", eps=0.05, patch=(32, 40, 10, 16)):
    return AttackConfig(mode=mode, mask=mask, epsilon=eps, patch_size=patch, nclass=5,
                        mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25), noise_std=0.0)


@pytest.fixture(scope="module")
def segnet():
    torch.manual_seed(1)
    return freeze(SegNet(3, 5, width_mult=0.125))


def batch(b=3, h=64, w=80):
    return torch.randn(b, 3, h, w).clamp(-2, 2), torch.randint(0, 5, (b, h, w))


REGION = (32, 40)  # config()'s patch region (H, W)
PATCH_MASKS = ("square_patch", "random_patch", "fractal")  # one region of the patch size
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="no CUDA device"))]


def make_mask(name, images, labels, seed=0, **kw):
    torch.manual_seed(seed)
    return MASKS[name](images, labels, config(name, **kw))


def bbox(m):
    """(rows, cols) spanned by the nonzero pixels of an H×W mask."""
    rows, cols = m.nonzero(as_tuple=True)
    return int(rows.max() - rows.min() + 1), int(cols.max() - cols.min() + 1)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", sorted(MASKS))
def test_mask_shape_binary_values_and_device(name, device):
    images, labels = batch()
    mask = make_mask(name, images.to(device), labels.to(device))
    assert mask.shape == (3, 1, 64, 80) and mask.dtype == torch.float32
    assert mask.device.type == device
    assert set(mask.unique().tolist()) <= {0.0, 1.0}
    assert torch.all(mask.sum(dim=(1, 2, 3)) > 0)  # every image is attacked somewhere


@pytest.mark.parametrize("name", sorted(MASKS))
def test_mask_stays_inside_bounds(name):
    """Patch masks: within one region of the patch size; shrunk to fit a smaller image."""
    images, labels = batch(b=16)
    mask = make_mask(name, images, labels)[:, 0]
    region = REGION if name in PATCH_MASKS else (64, 80)  # the others: the image
    for m in mask:
        h, w = bbox(m)
        assert h <= region[0] and w <= region[1]
    small, small_labels = batch(b=4, h=20, w=24)  # smaller than the region: shrunk to the image
    mask = make_mask(name, small, small_labels, patch=(32, 40, 30, 36))
    assert mask.shape == (4, 1, 20, 24) and torch.all(mask.sum(dim=(1, 2, 3)) > 0)


def check_all_image(mask, labels):
    assert torch.all(mask == 1)


def check_pixels_sparse(mask, labels):
    share = mask.mean(dim=(1, 2, 3))  # 196,608 pixels per image: binomial sd 0.05 %
    assert torch.all((share - 0.05).abs() < 0.005)


def check_class(mask, labels):
    for m, lab in zip(mask[:, 0].bool(), labels):
        chosen = lab[m].unique()
        assert len(chosen) == 1 and torch.equal(m, lab == chosen)


def check_square_patch(mask, labels):
    assert torch.all(mask.sum(dim=(1, 2, 3)) == REGION[0] * REGION[1])
    assert all(bbox(m) == REGION for m in mask[:, 0])  # one solid rectangle


def check_random_patch(mask, labels):
    """6 to 10 shapes of 10–16 px: ~35–65% of the 32×40 region (5–95% quantiles)."""
    share = mask.sum(dim=(1, 2, 3)) / (REGION[0] * REGION[1])
    assert torch.all(share > 10 * 10 / 2 / (32 * 40)) and torch.all(share < 1)
    assert 0.3 < share.median() < 0.7


def check_fractal(mask, labels):
    """Stretched to the region; ~30–65% of it at 32×40 (5–95% quantiles), never 0 or all."""
    share = mask.sum(dim=(1, 2, 3)) / (REGION[0] * REGION[1])
    assert torch.all(share > 0.05) and torch.all(share < 0.95)
    assert 0.3 < share.median() < 0.6
    assert all(bbox(m) == REGION for m in mask[:, 0])


COVERAGE = {"all_image": check_all_image, "pixels_sparse": check_pixels_sparse,
            "class": check_class, "square_patch": check_square_patch,
            "random_patch": check_random_patch, "fractal": check_fractal}


@pytest.mark.parametrize("name", sorted(MASKS))
def test_mask_coverage(name):
    assert name in COVERAGE, f"mask {name!r}: add its expected coverage to COVERAGE"
    b, (h, w) = (4, (384, 512)) if name == "pixels_sparse" else (32, (64, 80))
    images, labels = batch(b=b, h=h, w=w)
    if name == "class":
        labels[2] = 3  # an image with a single class
    COVERAGE[name](make_mask(name, images, labels), labels)


@pytest.mark.parametrize("name", sorted(set(MASKS) - {"all_image"}))
def test_each_image_of_a_batch_draws_its_own_mask(name):
    """8 copies of one image and its labels: the masks differ (the draw is per image)."""
    images, labels = batch(b=1)
    images, labels = images.expand(8, -1, -1, -1), labels.expand(8, -1, -1)
    mask = make_mask(name, images, labels)
    assert any(not torch.equal(mask[0], m) for m in mask[1:])


@pytest.mark.parametrize("name", sorted(MASKS))
def test_mask_of_an_image_ignores_the_other_images_content(name):
    """Same seed, image 0's pixels and labels changed: images 1.. keep their masks.

    Holds for every mask: each reads only its own image's labels (class) or nothing but the
    batch's shape, and the random draws do not depend on the content. (A mask still depends on
    the batch size and the image's position in it, through the shared RNG stream.)
    """
    images, labels = batch(b=4)
    other_images, other_labels = images.clone(), labels.clone()
    other_images[0], other_labels[0] = -images[0], (labels[0] + 1) % 5
    mask = make_mask(name, images, labels, seed=7)
    other = make_mask(name, other_images, other_labels, seed=7)
    assert torch.equal(mask[1:], other[1:])


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
    assert set(ATTACK_CHOICES) == expected | pasted | {"none", "fractal", "paste"}
    assert all(parse_attack(name) or name == "none" for name in ATTACK_CHOICES)
