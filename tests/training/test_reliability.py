"""What main.py does when things go wrong: a stop signal mid-epoch (exact --resume), a
checkpoint that would run code or is broken, and an unreadable training image."""
import pickle
import re
import signal
import subprocess
import sys

import pytest
import torch

from obsnet.data.synthetic import generate
from tests.helpers import ROOT
from tests.helpers.nets import segnet_file
from tests.helpers.runner import ENV, main_py, one_line_error
from tests.helpers.runner import TINY_SERIAL as TINY, run_paths as paths


@pytest.mark.slow
def test_sigterm_mid_epoch_then_resume_equals_uninterrupted(tmp_path):
    # 96 images: an epoch lasts long enough for the signal to land inside epoch 1
    generate(tmp_path / "data", seed=0, n_train=96, n_val=2, n_test=2, size=(32, 48))
    segnet_file(tmp_path / "segnet.pth")
    common = [*TINY, "--adv", "min_random_patch", "--lr", "0.05", "--epoch", "3"]
    straight = main_py(*common, *paths(tmp_path, obsnet="a"))
    assert straight.returncode == 0, straight.stderr

    cmd = [sys.executable, str(ROOT / "main.py"), *common, *paths(tmp_path, obsnet="b")]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    # signal once epoch 1's progress bar shows a finished step: a stop in mid-epoch
    seen, in_epoch_1 = "", re.compile(r"ObsNet epoch 1:\s+\d+%\|[^|]*\| [1-9]\d*/")
    while char := proc.stdout.read(1):
        seen += char
        if in_epoch_1.search(seen[-200:]):
            proc.send_signal(signal.SIGTERM)
            break
    stderr = seen + proc.communicate(timeout=120)[0]
    assert proc.returncode == 143, stderr
    message = stderr.strip().splitlines()[-1]
    assert message.startswith("main.py: interrupted (SIGTERM) during ObsNet epoch 1: "), stderr
    assert "run again with --resume to restart epoch 1" in message and "Traceback" not in stderr
    last = tmp_path / "b" / "last.pth"
    assert torch.load(last, weights_only=True)["epoch"] == 0
    assert not list((tmp_path / "b").glob(".*.tmp"))  # no half-written file left

    resumed = main_py(*common, *paths(tmp_path, obsnet="b"), "--resume")
    assert resumed.returncode == 0, resumed.stderr
    a = torch.load(tmp_path / "a" / "last.pth", weights_only=True)
    b = torch.load(last, weights_only=True)
    assert a["epoch"] == b["epoch"] == 2
    for key, value in a["model"].items():
        assert torch.equal(value, b["model"][key]), key


class RunsCode:
    """Unpickling this calls open(marker, "w"): a checkpoint that would run code."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.mark.parametrize("writer", ["torch.save", "pickle.dump"])
def test_checkpoint_that_would_run_code_is_refused(small_data, tmp_path, writer):
    marker = tmp_path / "MARKER"
    bad = tmp_path / "evil.pth"
    payload = {"model": RunsCode(marker)}
    if writer == "torch.save":
        torch.save(payload, bad)
    else:
        with open(bad, "wb") as f:
            pickle.dump(payload, f)
    out = main_py(*TINY, *paths(small_data, obsnet=f"evil_{writer}"), "--segnet_file", str(bad),
                  "--epoch", "1")
    assert out.returncode == 1, out.stderr
    one_line_error(out, str(bad), "cannot be loaded as a checkpoint (refused: it holds Python objects")
    assert not marker.exists()


def test_truncated_and_foreign_checkpoints(small_data, tmp_path):
    good = (small_data / "segnet.pth").read_bytes()
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(good[: len(good) // 2])
    out = main_py(*TINY, *paths(small_data, obsnet="trunc"), "--segnet_file", str(truncated),
                  "--epoch", "1")
    assert out.returncode == 1
    one_line_error(out, str(truncated), "cannot be loaded as a checkpoint")

    foreign = segnet_file(tmp_path / "wider.pth", width_mult=0.125)  # another model's weights
    out = main_py(*TINY, *paths(small_data, obsnet="foreign"), "--segnet_file", str(foreign),
                  "--epoch", "1")
    assert out.returncode == 1
    one_line_error(out, str(foreign), "does not fit the SegNet")


@pytest.fixture(scope="module")
def bad_image_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("bad")
    generate(root / "data", seed=0, n_train=8, n_val=2, n_test=2, size=(32, 48))
    segnet_file(root / "segnet.pth")
    first = (root / "data" / "train.txt").read_text().split()[0]
    image = root / "data" / first
    image.write_bytes(image.read_bytes()[:40])  # truncated PNG
    return root, image


@pytest.mark.parametrize("workers", ["0", "2"])
def test_unreadable_training_image_stops_with_one_line(bad_image_data, workers):
    root, image = bad_image_data
    out = main_py(*TINY, *paths(root, obsnet=f"stop{workers}"), "--epoch", "1",
                  "--num_workers", workers)
    assert out.returncode == 1, out.stderr
    one_line_error(out, f"image {image}: cannot be read")


def test_skip_bad_samples_counts_and_continues(bad_image_data):
    root, image = bad_image_data
    out = main_py(*TINY, *paths(root, obsnet="skip"), "--epoch", "2", "--skip_bad_samples")
    assert out.returncode == 0, out.stderr
    warnings = [line for line in out.stdout.splitlines() if line.startswith("warning: skipped")]
    assert len(warnings) == 1 and str(image) in warnings[0], out.stdout
    summary = [line for line in out.stdout.splitlines() if line.startswith("skipped ")]
    assert summary == [summary[0]] and summary[0].startswith(
        "skipped 1 unreadable sample(s) (2 time(s) in all): "), out.stdout
    assert str(image) in summary[0]
    assert (root / "skip" / "last.pth").is_file()


def test_first_best_checkpoint_is_kept_even_when_the_metric_is_undefined():
    from obsnet.fit import improves
    nan = float("nan")
    assert improves(nan, -1.0) and improves(0.0, -1.0)  # nothing kept yet: keep this one
    assert not improves(nan, 0.5) and not improves(0.4, 0.5)
    assert improves(0.6, 0.5)
