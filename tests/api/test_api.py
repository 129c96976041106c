"""The Python API (``obsnet.observe``, ``train_observer``, ``Observed.score``, ``OODMeter``):
docs/own-segmenter.md's example runs as written, and each name does what it says on a toy segmenter."""
import re

import pytest
import torch

import obsnet
from obsnet.models.generic import FeatureTap, LayerObserver
from tests.helpers import ROOT
from tests.helpers.api_toys import toy_loader, toy_segmenter


def readme_api_example() -> str:
    """The indented code block of docs/own-segmenter.md's "Python API" section, dedented."""
    text = (ROOT / "docs" / "own-segmenter.md").read_text()
    section = text.split("## Python API", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"(?:^    .*\n|^\n)+", section, flags=re.M)
    code = next(b for b in blocks if "import obsnet" in b)
    return "\n".join(line[4:] for line in code.splitlines()).strip() + "\n"


def test_readme_example_runs(tmp_path, monkeypatch):
    """The example is 15-25 lines, trains two epochs, prints an AUROC and saves the observer."""
    code = readme_api_example()
    assert 15 <= len([line for line in code.splitlines() if line.strip()]) <= 25
    monkeypatch.chdir(tmp_path)
    torch.manual_seed(0)
    scope = {}
    exec(compile(code, "docs/own-segmenter.md", "exec"), scope)
    assert len(scope["history"]) == 2
    assert 0 <= scope["meter"].compute()["auroc"] <= 1
    saved = torch.load(tmp_path / "observer.pth", weights_only=True)
    assert saved.keys() == scope["observed"].observer.state_dict().keys()


def test_observe_freezes_the_segmenter_and_reads_its_layers():
    """observe(): the segmenter is frozen (eval mode, no gradients), its top-level layers but
    the last (the upsampling) are read, and the observer's projections match their channels
    plus the logits'."""
    observed = obsnet.observe(toy_segmenter(), width_mult=0.25)
    assert isinstance(observed.segmenter, FeatureTap)
    assert isinstance(observed.observer, LayerObserver)
    assert observed.segmenter.layers == ("0", "1", "2")
    assert not observed.segmenter.training
    assert not any(p.requires_grad for p in observed.segmenter.parameters())
    channels = [p[0].in_channels for p in observed.observer.projections]
    assert channels == [8, 16, 4, 4]


def test_observe_takes_chosen_layers():
    observed = obsnet.observe(toy_segmenter(), layers=["1"], width_mult=0.25)
    assert observed.segmenter.layers == ("1",)
    with pytest.raises(ValueError, match=r"^layers 9: not a layer of segmenter \(Sequential\) "):
        obsnet.observe(toy_segmenter(), layers=["9"])


def test_score_is_a_probability_map_and_leaves_training_mode():
    observed = obsnet.observe(toy_segmenter(), width_mult=0.25)
    observed.observer.train()
    x = torch.randn(2, 3, 32, 48)
    prob = observed.score(x)
    assert prob.shape == (2, 1, 32, 48)
    assert ((prob >= 0) & (prob <= 1)).all()
    assert observed.observer.training
    logits, observer_logit = observed(x)
    assert logits.shape == (2, 4, 32, 48) and observer_logit.shape == (2, 1, 32, 48)


def test_train_observer_attacks_and_learns():
    """With the attack, each epoch reports the attack's flip rate; the observer's weights
    move while the segmenter's stay as they were."""
    torch.manual_seed(0)
    observed = obsnet.observe(toy_segmenter(), width_mult=0.25)
    before_seg = {k: v.clone() for k, v in observed.segmenter.state_dict().items()}
    before_obs = {k: v.clone() for k, v in observed.observer.state_dict().items()}
    settings = obsnet.TrainingSettings(attack="min_random_patch", epsilon=0.5, lr=0.1)
    history = obsnet.train_observer(observed, toy_loader(), epochs=2, settings=settings,
                                    progress=False)
    assert len(history) == 2 and all("attack_flip_rate" in h for h in history)
    assert history[-1]["attack_flip_rate"] > 0
    after_seg = observed.segmenter.state_dict()
    assert all(torch.equal(before_seg[k], after_seg[k]) for k in before_seg)
    assert any(not torch.equal(before_obs[k], v) for k, v in observed.observer.state_dict().items())


def test_train_observer_without_attack():
    observed = obsnet.observe(toy_segmenter(), width_mult=0.25)
    history = obsnet.train_observer(observed, toy_loader(), settings=obsnet.TrainingSettings(
        attack="none"), progress=False)
    assert "attack_flip_rate" not in history[0] and history[0]["loss"] > 0


def test_public_names_load_lazily():
    assert set(obsnet.__all__) == {"observe", "train_observer", "TrainingSettings", "Observed",
                                   "OODMeter"}
    assert all(getattr(obsnet, name) is not None for name in obsnet.__all__)
    with pytest.raises(AttributeError):
        obsnet.not_a_name  # noqa: B018
