"""Shared test settings: the repository root importable, one thread, fixed seeds; the fixtures
more than one test module uses: a tiny SegNet trained by main.py (``run_dir``), a small
Synthetic folder with a fresh SegNet (``small_data``) and two tiny networks (``nets``)."""
import shutil
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository: tests.helpers, obsnet
torch.set_num_threads(1)

from obsnet.data.synthetic import generate  # noqa: E402
from tests.helpers.nets import segnet_file, tiny_nets  # noqa: E402
from tests.helpers.runner import TINY, main_py, paths  # noqa: E402


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def _trained_segnet(tmp_path_factory):
    """Synthetic data (8 train, 4 val, 4 test) and a SegNet trained one epoch on it by
    ``main.py --train_segnet`` (TINY sizes, AdamW, lr 0.01); read only: see ``run_dir``."""
    root = tmp_path_factory.mktemp("segnet")
    generate(root / "data", seed=0, n_train=8, n_val=4, n_test=4)
    seg = main_py(*TINY, *paths(root), "--train_segnet", "--epoch", "1", "--optim", "AdamW",
                  "--lr", "0.01")
    assert seg.returncode == 0, seg.stderr
    return root


@pytest.fixture(scope="module")
def run_dir(_trained_segnet, tmp_path_factory):
    """This module's own copy of the trained SegNet's folder (``paths(run_dir)``)."""
    root = tmp_path_factory.mktemp("run")
    shutil.copytree(_trained_segnet, root, dirs_exist_ok=True)
    return root


@pytest.fixture(scope="module")
def small_data(tmp_path_factory):
    """This module's Synthetic folder (8 train, 2 val, 2 test, 32×48) and a freshly initialised
    SegNet (``segnet.pth``): enough to train an observer (``run_paths(small_data)``)."""
    root = tmp_path_factory.mktemp("small")
    generate(root / "data", seed=0, n_train=8, n_val=2, n_test=2, size=(32, 48))
    segnet_file(root / "segnet.pth")
    return root


@pytest.fixture(scope="module")
def nets():
    """A frozen SegNet and an observer in eval mode (width_mult 0.125, seed 0)."""
    return tiny_nets(0.125)
