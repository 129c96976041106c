"""main.py end to end as a user runs it: train the SegNet, train ObsNet, test; bad input."""
import json
import os
import subprocess
import sys

import pytest

from conftest import ROOT
from Dataset.synthetic import generate

TINY = ["--data", "Synthetic", "--size", "32", "48", "--width_mult", "0.0625", "--bsize", "4",
        "--seed", "0"]


def main_py(*args, cwd=ROOT):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, str(ROOT / "main.py"), *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("run")
    generate(root / "data", seed=0, n_train=8, n_val=4, n_test=4)
    return root


def paths(root):
    return ["--dset_folder", str(root / "data"), "--segnet_file", str(root / "segnet.pth"),
            "--obsnet_file", str(root / "obsnet"), "--tboard", str(root / "logs")]


def test_train_segnet_then_obsnet_then_test(run_dir):
    seg = main_py(*TINY, *paths(run_dir), "--train_segnet", "--epoch", "1", "--optim", "AdamW",
                  "--lr", "0.01")
    assert seg.returncode == 0, seg.stderr
    assert (run_dir / "segnet.pth").is_file()
    obs = main_py(*TINY, *paths(run_dir), "--epoch", "1", "--adv", "min_random_patch",
                  "--epsilon", "0.025", "--lr", "0.01")
    assert obs.returncode == 0, obs.stderr
    assert {"best.pth", "last.pth"} <= {p.name for p in (run_dir / "obsnet").iterdir()}
    test = main_py(*TINY, *paths(run_dir), "--test_only", "--test_multi", "obsnet,mcp,mc_dropout",
                   "--T", "2")
    assert test.returncode == 0, test.stderr
    results = json.loads((run_dir / "logs" / "results.json").read_text())
    assert results["split"] == "test_ood"
    assert set(results["methods"]) == {"obsnet", "mcp", "mc_dropout"}
    for entry in results["methods"].values():
        assert 0 <= entry["ood"]["auroc"] <= 1 and 0 <= entry["error"]["auroc"] <= 1
    assert "OOD AUROC" in test.stdout and "mc_dropout" in test.stdout
    assert any(p.name.startswith("events.out.tfevents") for p in (run_dir / "logs").iterdir())


@pytest.mark.parametrize("args,code,message", [
    (["--adv", "min_nowhere"], 2, "--adv: invalid choice"),
    (["--test_only", "--test_multi", "obsnet,odinn"], 2, "unknown method 'odinn'"),
    (["--epsilon", "-1"], 2, "--epsilon must be positive"),
    (["--nclass", "5"], 2, "--nclass 5 is smaller than the 12 classes"),
    (["--model", "deeplabv3plus"], 2, "not implemented yet"),
    (["--data", "StreetHazard", "--dset_folder", "x"], 2, "loader not implemented yet"),
])
def test_bad_input_is_one_line(args, code, message, tmp_path):
    out = main_py(*TINY, *paths(tmp_path), *args)
    assert out.returncode == code
    assert message in out.stderr
    assert "Traceback" not in out.stderr


def test_real_dataset_needs_a_folder():
    out = main_py("--data", "CamVid", "--test_only")
    assert out.returncode == 2 and "--dset_folder is required for --data CamVid" in out.stderr


def test_missing_segnet_file_is_explained(run_dir, tmp_path):
    out = main_py(*TINY, *paths(run_dir), "--segnet_file", str(tmp_path / "none.pth"), "--epoch", "1")
    assert out.returncode == 1
    assert "none.pth: file not found (train one with --train_segnet)" in out.stderr
