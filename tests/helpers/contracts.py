"""The contracts every attack mask and every uncertainty method passes, run by their test
modules (tests/training/test_attack.py, tests/methods/test_methods.py) over the registries and by
tests/docs/test_extending.py on docs/extending.md's toys. A new mask adds its expected coverage to
COVERAGE."""
import torch

import obsnet.methods as U
from obsnet.attacks import MASKS, AttackConfig
from obsnet.methods import METHODS, EvalBatch, MethodConfig
from obsnet.stats import toy_class_stats


def config(mask="random_patch", mode="min", eps=0.05, patch=(32, 40, 10, 16)):
    return AttackConfig(mode=mode, mask=mask, epsilon=eps, patch_size=patch, nclass=5,
                        mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25), noise_std=0.0)


def batch(b=3, h=64, w=80):
    return torch.randn(b, 3, h, w).clamp(-2, 2), torch.randint(0, 5, (b, h, w))

REGION = (32, 40)  # config()'s patch region (H, W)

PATCH_MASKS = ("square_patch", "random_patch", "fractal")  # one region of the patch size


def make_mask(name, images, labels, seed=0, **kw):
    torch.manual_seed(seed)
    return MASKS[name](images, labels, config(name, **kw))


def bbox(m):
    """(rows, cols) spanned by the nonzero pixels of an H×W mask."""
    rows, cols = m.nonzero(as_tuple=True)
    return int(rows.max() - rows.min() + 1), int(cols.max() - cols.min() + 1)


def mask_shape_binary_values_and_device(name, device):
    """A B×1×H×W float mask of 0 and 1 on the images' device, every image attacked somewhere."""
    images, labels = batch()
    mask = make_mask(name, images.to(device), labels.to(device))
    assert mask.shape == (3, 1, 64, 80) and mask.dtype == torch.float32
    assert mask.device.type == device
    assert set(mask.unique().tolist()) <= {0.0, 1.0}
    assert torch.all(mask.sum(dim=(1, 2, 3)) > 0)  # every image is attacked somewhere


def mask_stays_inside_bounds(name):
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


def mask_coverage(name):
    """The share and shape of the attacked region the mask promises (its COVERAGE check)."""
    assert name in COVERAGE, f"mask {name!r}: add its expected coverage to COVERAGE"
    b, (h, w) = (4, (384, 512)) if name == "pixels_sparse" else (32, (64, 80))
    images, labels = batch(b=b, h=h, w=w)
    if name == "class":
        labels[2] = 3  # an image with a single class
    COVERAGE[name](make_mask(name, images, labels), labels)


def each_image_of_a_batch_draws_its_own_mask(name):
    """8 copies of one image and its labels: the masks differ (the draw is per image)."""
    images, labels = batch(b=1)
    images, labels = images.expand(8, -1, -1, -1), labels.expand(8, -1, -1)
    mask = make_mask(name, images, labels)
    assert any(not torch.equal(mask[0], m) for m in mask[1:])


def mask_of_an_image_ignores_the_other_images_content(name):
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

SHAPE = (3, 32, 48)

CFG = MethodConfig(mc_passes=3, void_class=11, class_stats=toy_class_stats(12, 8))

PROBABILITY_SCORES = [n for n, m in METHODS.items() if m.to_prob is U._identity]


def make_batch(images, segnet, obsnet=None, ensemble=()):
    with torch.no_grad():
        return EvalBatch(images, segnet, obsnet, segnet(images, return_feat=True), ensemble)


def scores_for(name, nets, images, cfg=CFG, seed=0):
    segnet, obsnet, members = nets
    torch.manual_seed(seed)
    batch = make_batch(images, segnet, obsnet, members)
    with torch.no_grad():
        return METHODS[name].fn(batch, cfg)


def state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def same_state(model, before):
    return all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def shape_range_and_no_side_effects(name, nets):
    """B×H×W finite float32 scores (probabilities in [0, 1]), nothing changed: images, weights,
    eval mode, the SegNet's frozen parameters."""
    segnet, obsnet, members = nets
    images = torch.randn(2, *SHAPE)
    images_before = images.clone()
    before = [state(m) for m in (segnet, obsnet, *members)]
    scores = scores_for(name, nets, images)
    assert scores.shape == (2, 32, 48) and scores.dtype == torch.float32
    assert torch.isfinite(scores).all()
    if name in PROBABILITY_SCORES:
        assert (scores >= 0).all() and (scores <= 1).all()
    to_prob = METHODS[name].to_prob
    probs = None if to_prob is None else to_prob(scores, CFG)
    if probs is not None:
        assert probs.shape == scores.shape and (probs >= 0).all() and (probs <= 1).all()
    assert torch.equal(images, images_before)
    for model, saved in zip((segnet, obsnet, *members), before):
        assert not model.training and same_state(model, saved)
    assert all(not p.requires_grad for p in segnet.parameters())


def batch_of_four_equals_four_batches_of_one(name, nets):
    """Exact for every method (random draws are shared within a pass: same seed, same scores)."""
    images = torch.randn(4, *SHAPE)
    whole = scores_for(name, nets, images, seed=7)
    single = torch.cat([scores_for(name, nets, images[i:i + 1], seed=7) for i in range(4)])
    assert torch.allclose(whole, single, atol=1e-5)
