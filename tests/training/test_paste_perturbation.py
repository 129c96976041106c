"""``--adv paste`` and ``paste+ATTACK``: a procedural object pasted into training images, its
pixels errors for the observer (obsnet.attacks.perturb, obsnet.train.observer_step)."""
import pytest
import torch

import obsnet
from obsnet.attacks import (AttackConfig, _valid_range, parse_attack, paste_procedural, perturb,
                            smooth_texture)
from obsnet.losses import CRITERIA
from obsnet.train import ObserverConfig, observer_step
from obsnet.utils import autocast
from tests.helpers.nets import tiny_nets
from tests.helpers.api_toys import toy_loader, toy_segmenter
from tests.helpers.runner import TINY, main_py, paths
from tests.helpers.devices import DEVICES

REGION = (32, 40)
CPU = torch.device("cpu")


def config(adv="paste", **kw):
    mode, mask, paste = parse_attack(adv)
    kw = {"patch_size": (*REGION, 10, 16), **kw}
    return AttackConfig(mode=mode, mask=mask, paste=paste, epsilon=0.5, nclass=12,
                        mean=(0.4, 0.45, 0.5), std=(0.3, 0.25, 0.2), noise_std=0.0, **kw)


def batch(b=4, h=64, w=80, seed=1, device="cpu"):
    """Normalised images of [0, 1] pixels (config()'s mean / std) and random labels."""
    gen = torch.Generator().manual_seed(seed)
    lo, hi = _valid_range(config(), CPU)
    images = lo + (hi - lo) * torch.rand(b, 3, h, w, generator=gen)
    return images.to(device), torch.randint(0, 12, (b, h, w), generator=gen).to(device)


def pasted_at(images, seed=0, cfg=None):
    torch.manual_seed(seed)
    return paste_procedural(images, cfg or config())


def bbox(mask):
    rows, cols = mask.nonzero(as_tuple=True)
    return int(rows.max() - rows.min() + 1), int(cols.max() - cols.min() + 1)


@pytest.fixture(scope="module")
def nets():
    """The narrowest SegNet and observer (replaces conftest's ``nets``)."""
    return tiny_nets(0.0625, observer_first=True)


# ----------------------------------------------------------------------------- the generator

@pytest.mark.parametrize("device", DEVICES)
def test_one_object_per_image_inside_a_region_only_its_pixels_change(device):
    images, _ = batch(b=8, device=device)
    out, mask = pasted_at(images)
    assert out.device == images.device and out.shape == images.shape and out.dtype == images.dtype
    assert mask.dtype == torch.bool and mask.shape == (8, 64, 80)
    for m in mask:
        assert m.any()
        h, w = bbox(m)
        assert h <= REGION[0] and w <= REGION[1]
    outside = ~mask.unsqueeze(1).expand_as(images)
    assert torch.equal(out[outside], images[outside])
    far = torch.full_like(images, -100.0)  # no colour of a [0, 1] image: every pasted pixel moves
    out_far, mask_far = pasted_at(far)
    assert torch.equal((out_far != far).any(1), mask_far)


def test_values_stay_in_the_valid_range():
    lo, hi = _valid_range(config(), CPU)
    for bound in (lo, hi):  # images at either end of the range
        images = bound.expand(6, 3, 48, 64).clone()
        out, _ = pasted_at(images)
        assert torch.all(out >= lo - 1e-5) and torch.all(out <= hi + 1e-5)
    torch.manual_seed(0)
    texture = smooth_texture(16, 20, 24, CPU)
    assert texture.shape == (16, 3, 20, 24) and texture.min() >= 0 and texture.max() <= 1
    assert texture.std(dim=(2, 3)).max() > 0.01 and texture.mean(dim=(1, 2, 3)).std() > 0.05


def test_seeded_and_each_image_its_own():
    images, _ = batch()
    first, mask = pasted_at(images, seed=3)
    again, mask_again = pasted_at(images, seed=3)
    assert torch.equal(first, again) and torch.equal(mask, mask_again)
    other, mask_other = pasted_at(images, seed=4)
    assert not torch.equal(mask, mask_other)
    assert len({tuple(m.flatten().nonzero().flatten().tolist()) for m in mask}) == len(mask)
    changed = images.clone()
    changed[1] = 0.0  # another image's content changes nothing of image 0's paste
    out, mask_changed = pasted_at(changed, seed=3)
    assert torch.equal(mask, mask_changed) and torch.equal(out[0], first[0])


def test_uses_random_shapes_and_fractals(monkeypatch):
    """Each image draws its shape from one of the two families, both used (here replaced by
    a full region and a single corner pixel, to tell them apart)."""
    from obsnet import attacks
    monkeypatch.setattr(attacks, "random_shapes",
                        lambda b, h, w, smin, smax, device: torch.ones(b, h, w, dtype=torch.bool))
    corner = torch.zeros(32, *REGION)
    corner[:, 0, 0] = 1
    monkeypatch.setattr(attacks, "fractal_shapes", lambda b, h, w, device: corner[:b])
    _, mask = pasted_at(batch(b=32)[0])
    sizes = set(mask.flatten(1).sum(1).tolist())
    assert sizes == {1, REGION[0] * REGION[1]}


@pytest.mark.parametrize("amp", ["float16", "bfloat16"])
def test_under_autocast_as_in_float32(amp):
    images, _ = batch()
    plain, mask = pasted_at(images)
    with autocast(CPU, amp):
        out, mask_amp = pasted_at(images)
    assert out.dtype == torch.float32 and torch.equal(mask, mask_amp)
    assert torch.allclose(out, plain)


# ----------------------------------------------------------------------------- with the attack

def test_paste_then_attack_elsewhere(nets):
    segnet = nets[0]
    images, labels = batch()
    cfg = config("paste+min_random_patch")
    pasted_only, mask = pasted_at(images, seed=5)
    torch.manual_seed(5)
    out = perturb(images, labels, segnet, cfg)
    assert torch.equal(out.pasted, mask)
    attacked = out.attack.mask[:, 0] > 0
    assert attacked.any() and not (attacked & mask).any()  # the attack leaves the object as made
    keep = mask.unsqueeze(1).expand_as(images)
    assert torch.equal(out.images[keep], pasted_only[keep])
    untouched = ~(attacked | mask).unsqueeze(1).expand_as(images)
    assert torch.equal(out.images[untouched], images[untouched])
    assert not torch.equal(out.images[~untouched & ~keep], images[~untouched & ~keep])
    # the attack's "before" is the SegNet on the pasted image
    assert torch.equal(out.attack.pred_before, segnet(pasted_only).argmax(1))
    lo, hi = _valid_range(cfg, CPU)
    assert torch.all(out.images >= lo - 1e-5) and torch.all(out.images <= hi + 1e-5)


def test_paste_alone_has_no_fgsm_step(nets):
    images, labels = batch()
    torch.manual_seed(5)
    out = perturb(images, labels, nets[0], config("paste"))
    assert out.attack is None and out.pasted.any()
    assert torch.equal(out.images, pasted_at(images, seed=5)[0])


# ----------------------------------------------------------------------------- the observer's target

def step(nets, images, labels, cfg, seed=0):
    torch.manual_seed(seed)
    return observer_step(images, labels, *nets, CRITERIA["bce"](2.0), cfg)


def test_pasted_pixels_are_errors_even_where_the_segnet_is_right(nets):
    segnet = nets[0]
    images, _ = batch()
    seen, mask = pasted_at(images, seed=0)
    labels = segnet(seen).argmax(1)  # the SegNet is right everywhere on the pasted image
    loss, error, logits, counts = step(nets, images, labels, ObserverConfig(config("paste")))
    assert torch.equal(error, mask.float())  # errors exactly on the pasted pixels
    expected = CRITERIA["bce"](2.0)(logits.float(), mask.float())
    assert torch.allclose(loss, expected)
    n = mask.sum().item()
    assert counts.tolist() == [0, 0, 0, mask.numel() - n, 0, n]
    # the same step without a paste: no error at all, on the clean image
    clean_labels = segnet(images).argmax(1)
    _, clean_error, _, clean_counts = step(nets, images, clean_labels, ObserverConfig(None))
    assert not clean_error.any() and not clean_counts.any()


def test_pasted_pixels_are_never_ignored(nets):
    images, labels = batch()
    labels[:, :, :40] = 255  # the left half ignored
    cfg = ObserverConfig(config("paste"), ignore_id=255)
    loss, error, logits, counts = step(nets, images, labels, cfg)
    mask = pasted_at(images, seed=0)[1]
    assert (mask[:, :, :40]).any()  # some pasted pixels lie where the label is ignored
    keep = (labels != 255) | mask
    assert torch.allclose(loss, CRITERIA["bce"](2.0)(logits.float()[keep], error[keep]))
    assert counts[5] == mask.sum() and counts[3] == ((labels != 255) & ~mask).sum()


def test_epoch_summary_reports_the_paste(nets):
    from obsnet.train import ObserverJob, train_observer_epoch
    loader = [batch(b=2, seed=s) for s in range(2)]
    optimizer = torch.optim.SGD(nets[1].parameters(), lr=0.0)
    for adv, flip in (("paste", False), ("paste+min_random_patch", True)):
        torch.manual_seed(0)
        stats = train_observer_epoch(ObserverJob(
            model=nets[1], loader=loader, optimizer=optimizer, device=CPU, progress=False,
            segnet=nets[0], criterion=CRITERIA["bce"](2.0), config=ObserverConfig(config(adv))), 0)
        assert 0 < stats["pasted_share"] < 0.5 and 0 <= stats["segnet_error_outside_mask"] <= 1
        assert ("attack_flip_rate" in stats) == flip


# ----------------------------------------------------------------------------- faces

def test_python_api_takes_paste():
    torch.manual_seed(0)
    observed = obsnet.observe(toy_segmenter(), width_mult=0.25)
    settings = obsnet.TrainingSettings(attack="paste+max_fractal", epsilon=0.5, lr=0.1)
    history = obsnet.train_observer(observed, toy_loader(), settings=settings, progress=False)
    assert history[0]["pasted_share"] > 0 and "attack_flip_rate" in history[0]
    with pytest.raises(ValueError, match="attack: 'paste\\+fractal' is not one of"):
        obsnet.TrainingSettings(attack="paste+fractal")


@pytest.mark.parametrize("adv, extra", [("paste", []),
                                        ("paste+min_random_patch", ["--amp", "bfloat16"])])
def test_cli_trains_with_paste(run_dir, adv, extra):
    out = main_py(*TINY, *paths(run_dir), "--epoch", "1", "--adv", adv, "--epsilon", "0.25",
                  "--obsnet_file", str(run_dir / adv), "--tboard", str(run_dir / f"logs_{adv}"),
                  *extra)
    assert out.returncode == 0, out.stderr[-3000:]
    text = out.stdout + out.stderr
    assert "pasted " in text and ("attack flip rate" in text) == ("+" in adv)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    events = EventAccumulator(str(run_dir / f"logs_{adv}"))
    events.Reload()
    [share] = events.Scalars("Train/pasted_share")
    assert 0 < share.value < 1


@pytest.mark.parametrize("bad", ["paste+fractal", "paste+", "max_paste"])
def test_cli_refuses_bad_values_in_one_line(tmp_path, bad):
    """main.py's argparse: its usage, then one error line naming --adv and the value."""
    out = main_py(*TINY, *paths(tmp_path), "--epoch", "1", "--adv", bad)
    assert out.returncode == 2 and "Traceback" not in out.stderr
    line = out.stderr.strip().splitlines()[-1]
    assert line.startswith(f"main.py: error: argument --adv: invalid choice: '{bad}'"), line
    assert "paste+min_random_patch" in line  # the choices, new modes included
    assert not (tmp_path / "obsnet").exists()
