"""The Python API checks what it is given (``obsnet.observe``, ``train_observer``,
``Observed.score``, ``TrainingSettings``): a ValueError or TypeError naming the argument and
saying what is expected, never a raw torch error or a silent NaN, and never a command-line
flag in the message. Values that convert without harm (float64 or half images, int32 labels)
are converted."""
import math

import numpy as np
import pytest
import torch
import torch.nn as nn
from torch.utils.data import DataLoader, TensorDataset

import obsnet
from tests.helpers import toy_segmenter

NCLASS = 4
SIZE = (32, 48)


def segmenter() -> nn.Sequential:
    return toy_segmenter.build(NCLASS)


@pytest.fixture(scope="module")
def observed():
    torch.manual_seed(0)
    return obsnet.observe(segmenter(), width_mult=0.25)


def images(batch: int = 2, dtype=torch.float32) -> torch.Tensor:
    return torch.randn(batch, 3, *SIZE, generator=torch.Generator().manual_seed(0)).to(dtype)


def labels(batch: int = 2, dtype=torch.int64) -> torch.Tensor:
    generator = torch.Generator().manual_seed(1)
    return torch.randint(0, NCLASS, (batch, *SIZE), generator=generator).to(dtype)


def train(observed, loader, **kwargs):
    return obsnet.train_observer(observed, loader, progress=False, **kwargs)


def no_flag(message: str) -> str:
    """``message``, checked to name no command-line flag."""
    assert "--" not in message, message
    return message


# ----------------------------------------------------------------------------- score

def test_score_refuses_nan_and_inf_images(observed):
    for bad in (float("nan"), float("inf"), -float("inf")):
        x = images()
        x[1, 2, 5, 7] = bad
        with pytest.raises(ValueError) as error:
            observed.score(x)
        assert no_flag(str(error.value)) == "images: hold NaN or infinite values"


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.bfloat16])
def test_score_converts_float64_and_half_images(observed, dtype):
    """float64 and half images are scored as float32 (to their own precision)."""
    x = images(dtype=dtype)
    prob = observed.score(x)
    assert prob.dtype == torch.float32 and prob.shape == (2, 1, *SIZE)
    torch.testing.assert_close(prob, observed.score(x.float()))


BAD_IMAGES = [
    pytest.param(lambda: (255 * torch.rand(2, 3, *SIZE)).to(torch.uint8), TypeError,
                 "images: uint8 values, expected float images normalised as the segmenter takes "
                 "them (from uint8: images.float() / 255, then the mean and std)", id="uint8"),
    pytest.param(lambda: images().permute(0, 2, 3, 1), ValueError,
                 "images: shape 2×32×48×3 (B×H×W×3, channels last), expected B×3×H×W; use "
                 "images.permute(0, 3, 1, 2)", id="channels-last"),
    pytest.param(lambda: images().numpy(), TypeError,
                 "images: expected a torch.Tensor B×3×H×W, got numpy.ndarray "
                 "(torch.from_numpy(a).permute(0, 3, 1, 2) for B×H×W×3 arrays)", id="numpy"),
    pytest.param(lambda: images()[0], ValueError, "images: shape 3×32×48, expected B×3×H×W",
                 id="no-batch-dim"),
    pytest.param(lambda: images().to(torch.complex64), TypeError,
                 "images: complex64 values, expected float images normalised as the segmenter "
                 "takes them (from uint8: images.float() / 255, then the mean and std)",
                 id="complex"),
]


@pytest.mark.parametrize("make,kind,message", BAD_IMAGES)
def test_score_refuses_bad_images(observed, make, kind, message):
    with pytest.raises(kind) as error:
        observed.score(make())
    assert no_flag(str(error.value)) == message


# ----------------------------------------------------------------------------- observe

BAD_OBSERVE = [
    pytest.param(dict(width_mult=0), ValueError,
                 "width_mult: must be a positive finite number (got 0)", id="width-0"),
    pytest.param(dict(width_mult=-0.5), ValueError,
                 "width_mult: must be a positive finite number (got -0.5)", id="width-negative"),
    pytest.param(dict(width_mult=math.nan), ValueError,
                 "width_mult: must be a positive finite number (got nan)", id="width-nan"),
    pytest.param(dict(width_mult="1"), TypeError, "width_mult: expected a number, got str",
                 id="width-str"),
    pytest.param(dict(layers=3), TypeError, "layers: expected module names, as a str of "
                 "comma-separated names or a list of str, got int", id="layers-int"),
    pytest.param(dict(layers=["stem", 1]), TypeError, "layers: expected module names, as a str of "
                 "comma-separated names or a list of str, got list holding non-str items",
                 id="layers-mixed"),
    pytest.param(dict(layers=" , "), ValueError, "layers: no module name given (None observes "
                 "the default layers)", id="layers-empty"),
    pytest.param(dict(layers="stem,nope"), ValueError, "layers nope: not a layer of segmenter "
                 "(Sequential) (module names, e.g. stem, down, mid, head, up)",
                 id="layers-unknown"),
    pytest.param(dict(image_size=(0, 48)), ValueError,
                 "image_size: both sides must be at least 1 (got (0, 48))", id="size-zero"),
    pytest.param(dict(image_size=32), TypeError, "image_size: expected (H, W), two ints, got 32",
                 id="size-int"),
]


@pytest.mark.parametrize("kwargs,kind,message", BAD_OBSERVE)
def test_observe_checks_its_arguments(kwargs, kind, message):
    with pytest.raises(kind) as error:
        obsnet.observe(segmenter(), **kwargs)
    assert no_flag(str(error.value)) == message


def test_observe_reads_comma_separated_layers():
    """``layers="stem,mid"`` is two layers (not five characters), as ["stem", "mid"] is."""
    observed = obsnet.observe(segmenter(), layers="stem, mid", width_mult=0.25)
    assert observed.segmenter.layers == ("stem", "mid")
    assert obsnet.observe(segmenter(), layers=("stem", "mid")).segmenter.layers == ("stem", "mid")


def test_observe_refuses_what_is_not_a_module():
    with pytest.raises(TypeError) as error:
        obsnet.observe(lambda x: x)
    assert no_flag(str(error.value)) == "segmenter: expected a torch.nn.Module, got function"


FLAWED_SEGMENTERS = [
    pytest.param(toy_segmenter.dict_without_out, "segmenter (DictWithoutOut): its output is a "
                 "dict without \"out\" (keys: logits, aux); return the logits, or "
                 "{\"out\": logits} as torchvision's models do", id="dict-without-out"),
    pytest.param(toy_segmenter.half, "segmenter (Sequential): its weights are float16 (first: "
                 "stem.0.weight), and segmenters run in float32 here; convert it with .float() "
                 "(torch.autocast gives mixed precision)", id="half"),
    pytest.param(toy_segmenter.fixed_size, "segmenter (FixedSize): the probe pass at "
                 "image_size=(64, 64) failed (RuntimeError: The size of tensor a (64) must match "
                 "the size of tensor b (48) at non-singleton dimension 3): one random image "
                 "through the network, before the run, to find the maps to observe; give "
                 "image_size a size the network takes", id="probe-size"),
    pytest.param(toy_segmenter.scripted, "segmenter (RecursiveScriptModule): a TorchScript module "
                 "(torch.jit.script or torch.jit.trace), whose layers cannot be observed (forward "
                 "hooks do not run inside TorchScript); give the nn.Module it was made from",
                 id="torchscript"),
    pytest.param(toy_segmenter.classifier, "segmenter (Classifier): not a segmentation network: "
                 "its output is 1×4 (B×C, a classifier's), and B×C×H×W class logits are needed",
                 id="classifier"),
    pytest.param(toy_segmenter.nan_output, "segmenter (Sequential): gives NaN or infinite values "
                 "for a random image at image_size=(64, 64) (first: layer head) before anything "
                 "was trained; check how it is built (its weights)", id="nan-output"),
]


@pytest.mark.parametrize("factory,message", FLAWED_SEGMENTERS)
def test_observe_refuses_flawed_segmenters(factory, message):
    """A segmenter that cannot be observed: one ValueError naming the segmenter argument and
    the API's own arguments (image_size, layers), not the command line's flags."""
    with pytest.raises(ValueError) as error:
        obsnet.observe(factory(NCLASS), width_mult=0.25)
    assert no_flag(str(error.value)) == message


def test_observe_probes_at_image_size():
    """A segmenter that takes only 32x48 images is observed with image_size=(32, 48)."""
    observed = obsnet.observe(toy_segmenter.fixed_size(NCLASS), width_mult=0.25, image_size=SIZE)
    assert observed.score(images()).shape == (2, 1, *SIZE)


def test_in_place_segmenter_trains_with_the_attack_and_leaves_images_alone():
    """A segmenter that clamps its input in place: the attack trains (its image requires
    grad), and score leaves the caller's images as they were."""
    torch.manual_seed(0)
    observed = obsnet.observe(toy_segmenter.in_place_input(NCLASS), width_mult=0.25)
    loader = DataLoader(TensorDataset(4 * images(4), labels(4)), batch_size=2)
    history = train(observed, loader, settings=obsnet.TrainingSettings(epsilon=0.5))
    assert history[0]["attack_flip_rate"] >= 0 and math.isfinite(history[0]["loss"])
    x = 4 * images()
    before = x.clone()
    observed.score(x)
    assert torch.equal(x, before)


# ----------------------------------------------------------------------------- TrainingSettings

BAD_SETTINGS = [
    pytest.param(dict(epsilon=-1), ValueError, "epsilon: must be a positive finite number (got -1)",
                 id="epsilon-negative"),
    pytest.param(dict(epsilon=0), ValueError, "epsilon: must be a positive finite number (got 0)",
                 id="epsilon-0"),
    pytest.param(dict(lr=math.inf), ValueError, "lr: must be a positive finite number (got inf)",
                 id="lr-inf"),
    pytest.param(dict(pos_weight="2"), TypeError, "pos_weight: expected a number, got str",
                 id="pos-weight-str"),
    pytest.param(dict(std=(0, 0, 0)), ValueError,
                 "std: each of the three values must be positive finite (got (0, 0, 0))",
                 id="std-zero"),
    pytest.param(dict(mean=(0.5, 0.5)), TypeError,
                 "mean: expected three numbers, one per RGB channel, got (0.5, 0.5)",
                 id="mean-two"),
    pytest.param(dict(mean=(0.5, math.nan, 0.5)), ValueError,
                 "mean: each of the three values must be finite (got (0.5, nan, 0.5))",
                 id="mean-nan"),
    pytest.param(dict(attack="fgsm"), ValueError, "attack: 'fgsm' is not one of none, ",
                 id="attack-unknown"),
    pytest.param(dict(ignore_index=255.0), TypeError,
                 "ignore_index: expected an int or None, got float", id="ignore-float"),
]


@pytest.mark.parametrize("kwargs,kind,message", BAD_SETTINGS)
def test_training_settings_are_checked(kwargs, kind, message):
    with pytest.raises(kind) as error:
        obsnet.TrainingSettings(**kwargs)
    assert no_flag(str(error.value)).startswith(message)


def test_training_settings_keep_valid_values():
    settings = obsnet.TrainingSettings(mean=[0.5, 0.4, 0.3], std=(1, 1, 1), ignore_index=None)
    assert settings.mean == (0.5, 0.4, 0.3) and settings.std == (1.0, 1.0, 1.0)


# ----------------------------------------------------------------------------- train_observer

def loader_of(x, y, batch_size=2) -> DataLoader:
    return DataLoader(TensorDataset(x, y), batch_size=batch_size)


class Batches:
    """A re-iterable list of batches, as a user's own loader may be."""

    def __init__(self, *batches):
        self.batches = batches

    def __iter__(self):
        return iter(self.batches)

    def __len__(self):
        return len(self.batches)


BAD_LOADERS = [
    pytest.param(lambda: loader_of(images(0), labels(0)), ValueError,
                 "loader: yields no batch (an empty dataset, or drop_last=True with fewer samples "
                 "than batch_size)", id="empty"),
    pytest.param(lambda: Batches({"image": images(), "label": labels()}), TypeError,
                 "loader: batch 0 is a dict (keys: image, label), expected an (images, labels) "
                 "pair (a dataset that returns (image, label), or a collate_fn that makes one)",
                 id="dict-batches"),
    pytest.param(lambda: Batches((images(), labels(), ["a", "b"])), TypeError,
                 "loader: batch 0 is a tuple of 3, expected an (images, labels) pair",
                 id="triples"),
    pytest.param(lambda: (b for b in [(images(), labels())]), TypeError,
                 "loader: a generator can be read only once; give an iterable that can be read "
                 "every epoch (a DataLoader, a list of batches)", id="generator"),
    pytest.param(lambda: 7, TypeError, "loader: expected an iterable of (images, labels) batches "
                 "(e.g. a DataLoader), got int", id="not-iterable"),
    pytest.param(lambda: loader_of((255 * torch.rand(2, 3, *SIZE)).to(torch.uint8), labels()),
                 TypeError, "loader: batch 0's images: uint8 values, expected float images "
                 "normalised", id="uint8-images"),
    pytest.param(lambda: Batches((images().permute(0, 2, 3, 1), labels())), ValueError,
                 "loader: batch 0's images: shape 2×32×48×3 (B×H×W×3, channels last), expected "
                 "B×3×H×W", id="channels-last"),
    pytest.param(lambda: Batches((images().numpy(), labels())), TypeError,
                 "loader: batch 0's images: expected a torch.Tensor B×3×H×W, got numpy.ndarray",
                 id="numpy-images"),
    pytest.param(lambda: loader_of(images(), labels()[:, None]), ValueError,
                 "loader: batch 0's labels: shape 2×1×32×48, expected B×H×W = 2×32×48, the "
                 "images'; use labels.squeeze(1)", id="labels-with-channel"),
    pytest.param(lambda: loader_of(images(), labels()[:, :16]), ValueError,
                 "loader: batch 0's labels: shape 2×16×48, expected B×H×W = 2×32×48, the images'",
                 id="labels-other-size"),
    pytest.param(lambda: loader_of(images(), labels().float()), TypeError,
                 "loader: batch 0's labels: float32 values, expected integer class indices "
                 "(int64)", id="float-labels"),
    pytest.param(lambda: Batches((images(), labels().numpy())), TypeError,
                 "loader: batch 0's labels: expected a torch.Tensor B×H×W of class indices, got "
                 "numpy.ndarray", id="numpy-labels"),
]


@pytest.mark.parametrize("make,kind,message", BAD_LOADERS)
def test_train_observer_checks_the_loader(observed, make, kind, message):
    before = {k: v.clone() for k, v in observed.observer.state_dict().items()}
    with pytest.raises(kind) as error:
        train(observed, make())
    assert no_flag(str(error.value)).startswith(message)
    after = observed.observer.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # no step was made


def test_train_observer_refuses_nan_images_before_the_step(observed):
    """NaN or infinite images in a batch: a ValueError naming the loader and the batch, before
    any step on it (not a 'training diverged' error)."""
    for bad in (float("nan"), float("inf")):
        x = images(4)
        x[3, 0, 0, 0] = bad
        before = {k: v.clone() for k, v in observed.observer.state_dict().items()}
        with pytest.raises(ValueError) as error:
            train(observed, loader_of(x, labels(4)))
        assert no_flag(str(error.value)) == "loader: batch 1's images hold NaN or infinite values"
        assert all(torch.isfinite(v).all() for v in observed.observer.state_dict().values())
        assert any(not torch.equal(before[k], v)
                   for k, v in observed.observer.state_dict().items())  # batch 0 did train


def test_nonfinite_images_noted_on_the_device_are_reported_once():
    """Off the CPU the check makes no synchronisation per batch: ``note`` keeps the first bad
    batch on the device, ``check`` reports it (exercised here with CPU tensors)."""
    from obsnet.api import CheckedBatches

    batches = CheckedBatches([])
    batches.check()  # nothing noted
    for index, finite in enumerate([True, False, True, False]):
        batches.note(torch.tensor(finite), index)
    with pytest.raises(ValueError, match=r"^loader: batch 1's images hold NaN or infinite values$"):
        batches.check()


def test_train_observer_checks_epochs_and_settings(observed):
    loader = loader_of(images(), labels())
    for epochs, kind, message in [(-3, ValueError, "epochs: must be at least 1 (got -3)"),
                                  (0, ValueError, "epochs: must be at least 1 (got 0)"),
                                  (1.5, TypeError, "epochs: expected an int, got float")]:
        with pytest.raises(kind) as error:
            train(observed, loader, epochs=epochs)
        assert str(error.value) == message
    with pytest.raises(TypeError,
                       match=r"^settings: expected an obsnet.TrainingSettings, got dict$"):
        train(observed, loader, settings={"lr": 0.1})
    with pytest.raises(TypeError, match=r"^observed: expected what obsnet.observe returns, got "
                                        r"Sequential$"):
        obsnet.train_observer(segmenter(), loader)


def test_train_observer_converts_harmless_types(observed):
    """float64 and half images, int32 and uint8 labels train as float32 / int64 would."""
    for x, y in [(images(dtype=torch.float64), labels(dtype=torch.int32)),
                 (images(dtype=torch.float16), labels(dtype=torch.uint8))]:
        history = train(observed, loader_of(x, y), settings=obsnet.TrainingSettings(attack="none"))
        assert math.isfinite(history[0]["loss"])


def test_divergence_names_the_setting_not_the_flag():
    """A learning rate that makes the loss diverge is named as the API's setting."""
    torch.manual_seed(0)
    observed = obsnet.observe(segmenter(), width_mult=0.25)
    settings = obsnet.TrainingSettings(attack="none", lr=1e30)
    with pytest.raises(FloatingPointError) as error:
        train(observed, loader_of(images(8), labels(8)), settings=settings)
    message = no_flag(str(error.value))
    assert message.startswith("ObsNet training diverged: the loss is "), message
    assert message.endswith("(lower settings.lr)"), message


def test_numpy_arrays_are_not_images(observed):
    """A B×H×W×3 numpy image (as PIL gives) is refused with the conversion to make."""
    array = np.zeros((2, *SIZE, 3), dtype=np.float32)
    with pytest.raises(TypeError, match=r"torch.from_numpy\(a\).permute\(0, 3, 1, 2\)"):
        observed.score(array)
