"""main.py end to end as a user runs it: train the SegNet, train ObsNet, test; bad input.
``run_dir`` (conftest) holds the data and a SegNet trained by ``main.py --train_segnet``."""
import json

import pytest

from obsnet.data.synthetic import generate
from tests.helpers.runner import TINY, main_py, paths


@pytest.fixture(scope="module")
def trained(run_dir):
    obs = main_py(*TINY, *paths(run_dir), "--epoch", "1", "--adv", "min_random_patch",
                  "--epsilon", "0.025", "--lr", "0.01")
    assert obs.returncode == 0, obs.stderr
    return run_dir


def test_train_segnet_then_obsnet_then_test(trained):
    run_dir = trained
    assert (run_dir / "segnet.pth").is_file()  # written by the fixture's --train_segnet run
    assert {"best.pth", "last.pth"} <= {p.name for p in (run_dir / "obsnet").iterdir()}
    test = main_py(*TINY, *paths(run_dir), "--test_only", "--test_multi", "obsnet,mcp,mc_dropout",
                   "--T", "2")
    assert test.returncode == 0, test.stderr
    results = json.loads((run_dir / "logs" / "results_test_ood.json").read_text())
    assert results["split"] == "test_ood"
    assert set(results["methods"]) == {"obsnet", "mcp", "mc_dropout"}
    for entry in results["methods"].values():
        assert 0 <= entry["ood"]["auroc"] <= 1 and 0 <= entry["error"]["auroc"] <= 1
    assert "OOD AUROC" in test.stdout and "mc_dropout" in test.stdout
    assert any(p.name.startswith("events.out.tfevents") for p in (run_dir / "logs").iterdir())


def test_every_method_and_every_output_file(trained):
    import csv
    logs = trained / "all_methods"
    methods = ("obsnet,mcp,temp_scale,entropy,max_logit,energy,odin,void,mc_drop,gauss,mcda,"
               "ensemble")
    segnet = str(trained / "segnet.pth")
    test = main_py(*TINY, *paths(trained), "--tboard", str(logs), "--test_only", "--test_multi",
                   methods, "--T", "2", "--ensemble", f"{segnet},{segnet}")
    assert test.returncode == 0, test.stderr
    results = json.loads((logs / "results_test_ood.json").read_text())
    expected = set(methods.replace("mc_drop", "mc_dropout").split(","))
    assert set(results["methods"]) == expected
    for name, entry in results["methods"].items():
        assert entry["ms_per_image"] > 0
        # ACE/ECE (JSON null otherwise) only for a probability that the SegNet is wrong; the
        # sampling methods score the entropy by default (--sampling_score).
        no_probability = {"entropy", "max_logit", "energy", "odin", "void", "mc_dropout", "gauss",
                          "mcda", "ensemble"}
        assert (entry["error"]["ace"] is None) == (name in no_probability), name
        assert (entry["error"]["ece"] is None) == (name in no_probability), name
    rows = list(csv.DictReader(open(logs / "results_test_ood.csv")))
    assert {r["method"] for r in rows} == expected
    assert len(results["segnet"]["iou"]) == 12
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    events = EventAccumulator(str(logs), size_guidance={"tensors": 0, "images": 0})
    events.Reload()
    assert "Test/obsnet/ood" in events.Tags()["tensors"]  # a PR curve
    assert any(tag.startswith("Test/") for tag in events.Tags()["images"])


@pytest.mark.parametrize("args,code,message", [
    (["--adv", "min_nowhere"], 2, "--adv: invalid choice"),
    (["--test_only", "--test_multi", "obsnet,odinn"], 2, "unknown method 'odinn'"),
    (["--epsilon", "-1"], 2, "--epsilon must be positive"),
    (["--nclass", "5"], 2, "--nclass 5 is smaller than the 12 classes"),
    (["--model", "deeplabv3plus", "--width_mult", "0.5"], 2, "takes neither --width_mult"),
    (["--model", "deeplabv3plus", "--width_mult", "1", "--vgg_weights", "x.pth"], 2,
     "use --backbone_weights"),
    (["--test_only", "--test_multi", "ensemble"], 2, "needs --ensemble FILE,FILE"),
    (["--odin_eps", "-0.1"], 2, "--odin_eps must be >= 0"),
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
    out = main_py(*TINY, *paths(run_dir), "--segnet_file", str(tmp_path / "none.pth"), "--epoch", "1",
                  "--obsnet_file", str(tmp_path / "obsnet"),  # run_dir/obsnet holds a run
                  "--tboard", str(tmp_path / "logs"))  # and run_dir/logs its config
    assert out.returncode == 1
    assert "none.pth: file not found (train one with --train_segnet)" in out.stderr


def test_resume_continues_at_the_next_epoch(run_dir):
    common = [*TINY, *paths(run_dir), "--adv", "max_square_patch", "--lr", "0.01",
              "--tboard", str(run_dir / "resumed_logs")]
    first = main_py(*common, "--epoch", "1", "--obsnet_file", str(run_dir / "resumed"))
    assert first.returncode == 0, first.stderr
    again = main_py(*common, "--epoch", "2", "--resume", "--obsnet_file", str(run_dir / "resumed"))
    assert again.returncode == 0, again.stderr
    assert "Resumed from" in again.stdout and "at epoch 1" in again.stdout
    import torch
    state = torch.load(run_dir / "resumed" / "last.pth", weights_only=True)
    assert state["epoch"] == 1 and {"optimizer", "scheduler", "best", "args"} <= set(state)


def test_small_observer_with_focal_loss_noise_dropout_amp_channels_last(run_dir):
    out = main_py(*TINY, *paths(run_dir), "--epoch", "1", "--obs_mlp", "--focal", "--noise", "0.1",
                  "--drop", "--adv", "min_class", "--optim", "AdamW", "--lr", "0.001",
                  "--channels_last", "--amp",
                  "--obsnet_file", str(run_dir / "small"), "--tboard", str(run_dir / "small_logs"))
    assert out.returncode == 0, out.stderr
    test = main_py(*TINY, *paths(run_dir), "--obs_mlp", "--test_only", "--obsnet_file",
                   str(run_dir / "small" / "best.pth"), "--tboard", str(run_dir / "small_logs"))
    assert test.returncode == 0, test.stderr
    assert "obsnet" in json.loads((run_dir / "small_logs" / "results_test_ood.json").read_text())["methods"]


README_COMMANDS = {  # the original README's flags; --bsize lowered to fit the tiny folders
    "StreetHazard": (["--bsize", "2", "--adv", "max_random_patch", "--epsilon", "0.001",
                      "--lr", "0.02", "--nclass", "14"], ["--nclass", "14"]),
    "BddAnomaly": (["--bsize", "2", "--adv", "max_random_patch", "--epsilon", "0.001",
                    "--lr", "0.02", "--nclass", "19"], ["--nclass", "19"]),
}


@pytest.mark.parametrize("name", sorted(README_COMMANDS))
def test_readme_commands_on_generated_real_layouts(name, tmp_path):
    from tests.helpers.anomaly_seg import MAKERS
    data = MAKERS[name](tmp_path / "data")
    train_flags, test_flags = README_COMMANDS[name]
    common = ["--dset_folder", f"{data}/", "--segnet_file", str(tmp_path / "segnet.pth"),
              "--obsnet_file", str(tmp_path / "ckpt/"), "--data", name, "--tboard",
              str(tmp_path / "logs"), "--num_workers", "0", "--size", "32", "48",
              "--width_mult", "0.0625", "--epoch", "1"]
    seg = main_py(*common, "--train_segnet", "--bsize", "2", "--nclass", train_flags[-1])
    assert seg.returncode == 0, seg.stderr
    obs = main_py(*common, *train_flags)
    assert obs.returncode == 0, obs.stderr
    test = main_py(*common, *test_flags, "--test_only", "--test_multi", "obsnet,mcp,mc_dropout",
                   "--T", "2")
    assert test.returncode == 0, test.stderr
    results = json.loads((tmp_path / "logs" / "results_test.json").read_text())
    assert results["split"] == "test" and set(results["methods"]) == {"obsnet", "mcp", "mc_dropout"}
    assert all("ood" in entry for entry in results["methods"].values())  # anomaly pixels found


@pytest.mark.slow
def test_deeplabv3plus_end_to_end(tmp_path):
    generate(tmp_path / "data", seed=0, n_train=4, n_val=2, n_test=2)
    common = ["--model", "deeplabv3plus", "--data", "Synthetic", "--dset_folder",
              str(tmp_path / "data"), "--size", "64", "64", "--bsize", "2", "--seed", "0",
              "--segnet_file", str(tmp_path / "seg.pth"), "--obsnet_file", str(tmp_path / "obs"),
              "--tboard", str(tmp_path / "logs"), "--epoch", "1"]
    seg = main_py(*common, "--train_segnet")
    assert seg.returncode == 0, seg.stderr
    assert "randomly initialised" in seg.stdout  # no --backbone_weights: said so
    obs = main_py(*common, "--adv", "max_fractal")
    assert obs.returncode == 0, obs.stderr
    test = main_py(*common, "--test_only", "--test_multi", "obsnet,mcp,mc_dropout", "--T", "2")
    assert test.returncode == 0, test.stderr
    results = json.loads((tmp_path / "logs" / "results_test_ood.json").read_text())
    assert set(results["methods"]) == {"obsnet", "mcp", "mc_dropout"}


def test_nclass_that_does_not_fit_the_checkpoint_says_both(run_dir):
    out = main_py(*TINY, *paths(run_dir), "--nclass", "13", "--test_only", "--test_multi", "mcp",
                  "--tboard", str(run_dir / "nclass_logs"))
    assert out.returncode == 1 and "Traceback" not in out.stderr
    assert "segnet.pth: does not fit" in out.stderr
    assert "12x4x3x3 in the file, 13x4x3x3 in the model" in out.stderr


def test_unwritable_output_folder_is_one_line(run_dir, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    out = main_py(*TINY, *paths(run_dir), "--tboard", str(blocker / "logs"), "--test_only",
                  "--test_multi", "mcp")
    assert out.returncode == 1 and "Traceback" not in out.stderr
    assert str(blocker) in out.stderr and len(out.stderr.strip().splitlines()) == 1
