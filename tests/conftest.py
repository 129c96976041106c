"""Shared test settings: the repository root importable, one thread, fixed seeds; one tiny
SegNet trained by main.py for the modules that test observers on it."""
import shutil
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
sys.path.insert(0, str(ROOT))
torch.set_num_threads(1)

from cli import TINY, main_py, paths  # noqa: E402  (imports from ROOT)
from obsnet.data.synthetic import generate  # noqa: E402


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
