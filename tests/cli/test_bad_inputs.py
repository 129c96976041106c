"""Bad inputs a user can give main.py, inference.py and ``python -m obsnet.check``: NaN or
infinite flag values, signals to a process group with data workers, a worker killed by the
out-of-memory killer, over-large images (PIL's DecompressionBombError), deeply nested
``.odgt`` JSON, list files with a byte-order mark, labels with every pixel ignored, 16-bit
images, colliding output names, NaN checkpoints, an unwritable results file."""
import os
import re
import shutil
import signal
import struct
import subprocess
import sys
import warnings
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

from obsnet import cli as obsnet_cli
from obsnet import inference
from obsnet.exit_codes import run_friendly
from obsnet.data.specs import SPECS
from obsnet.data.synthetic import generate
from obsnet.errors import ObsnetWarning
from obsnet.models.checkpoint import save_checkpoint
from obsnet.models.obsnet import Obsnet_Seg
from obsnet.models.registry import build_segmenter
from obsnet.models.segnet import SegNet
from tests.helpers import ROOT
from tests.helpers.runner import ENV, python
from tests.helpers.runner import run_paths as paths

TINY = ["--data", "Synthetic", "--size", "32", "48", "--width_mult", "0.0625", "--bsize", "4",
        "--seed", "0", "--epoch", "1"]


def cli(*args, timeout=300):
    """Run ``python ARGS`` from the repository root (args[0]: main.py, inference.py, -m ...)."""
    return python(*args, env=ENV, timeout=timeout)


def last_line(out, program, rc):
    """The single error line of a failed run, checked: exit code, no traceback."""
    assert out.returncode == rc, out.stdout[-2000:] + out.stderr[-3000:]
    assert "Traceback" not in out.stderr and "DataLoader worker" not in out.stderr, out.stderr
    line = out.stderr.strip().splitlines()[-1]
    assert line.startswith(f"{program}: "), out.stderr
    return line


def bomb_png(path, width=20000, height=10000):
    """A valid all-black 1-bit PNG of 2e8 pixels (25 KB): over twice PIL's default
    MAX_IMAGE_PIXELS, so PIL refuses to open it (DecompressionBombError)."""
    def chunk(kind, data):
        return (struct.pack(">I", len(data)) + kind + data
                + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))
    packer, row, parts = zlib.compressobj(9), b"\0" * (1 + width // 8), []
    parts += [packer.compress(row) for _ in range(height)]
    idat = b"".join(parts) + packer.flush()
    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", idat)
                     + chunk(b"IEND", b""))
    return path


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """96 training scenes (an epoch lasts long enough to be signalled in its middle) and a
    freshly initialised SegNet checkpoint."""
    root = tmp_path_factory.mktemp("bad_inputs")
    generate(root / "data", seed=0, n_train=96, n_val=2, n_test=2, size=(32, 48))
    torch.manual_seed(0)
    net = build_segmenter("segnet", SPECS["Synthetic"].nclass, 0.0625)
    save_checkpoint(root / "segnet.pth", {"model": net.state_dict()})
    return root


def variant(base, name, train_lines=8):
    """A copy of the base dataset whose train.txt lists its first ``train_lines`` lines."""
    data = base / name
    shutil.copytree(base / "data", data)
    lines = (data / "train.txt").read_text().splitlines()[:train_lines]
    (data / "train.txt").write_text("\n".join(lines) + "\n")
    return data


def listed(data, split, k):
    """(image, label) paths of line ``k`` (1-based) of ``split``.txt."""
    fields = (data / f"{split}.txt").read_text().splitlines()[k - 1].split()
    return data / fields[0], data / fields[1]


def ignore_everything(label_path):
    with Image.open(label_path) as label:
        size = label.size
    Image.new("L", size, 255).save(label_path)


def add_bom(list_file):
    list_file.write_bytes("\ufeff".encode() + list_file.read_bytes())


@pytest.fixture(scope="module")
def bad_data(base):
    """train.txt with a byte-order mark, its line 2 an over-large image, its line 3 a label
    with every pixel ignored; test.txt line 1 a label with every pixel ignored."""
    data = variant(base, "bad_data")
    add_bom(data / "train.txt")
    bomb_png(listed(data, "train", 2)[0])
    ignore_everything(listed(data, "train", 3)[1])
    ignore_everything(listed(data, "test", 1)[1])
    return data


# ------------------------------------------------------------------------ 1. flag values

FLOAT_FLAGS = [a.option_strings[0] for a in obsnet_cli.build_parser()._actions if a.type is float]


@pytest.mark.parametrize("flag", FLOAT_FLAGS)
@pytest.mark.parametrize("value", ["nan", "inf", "-inf"])
def test_every_float_flag_refuses_nan_and_inf(flag, value, capsys):
    assert obsnet_cli.main([*TINY, f"{flag}={value}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"main.py: error: {flag} must be a finite number (got {float(value)})"]


def test_inference_flags_are_checked(tmp_path, capsys):
    common = ["--segnet_file", "s.pth", "--obsnet_file", "o", "--img_folder", str(tmp_path),
              "--out", str(tmp_path / "out")]
    for extra, message in ((["--width_mult", "nan"], "--width_mult must be a finite number"),
                           (["--nclass", "0"], "--nclass 0 is smaller than the 12 classes"),
                           (["--size", "1", "1"], "--size 1 1: both sides must be at least 32")):
        assert run_friendly("inference.py", inference.run, [*common, *extra]) == 2
        assert message in capsys.readouterr().err


@pytest.mark.parametrize("program, args, message", [
    ("main.py", ["--odin_temp", "inf", "--test_only", "--test_multi", "odin"],
     "main.py: error: --odin_temp must be a finite number (got inf)"),
    ("main.py", ["--seed", str(2**32)],
     f"main.py: error: --seed must be -1 (not seeded) or in 0..{2**32 - 1} (got {2**32})"),
    ("inference.py", ["--size", "-5", "48"],
     "inference.py: error: --size -5 48: both sides must be at least 32"),
])
def test_bad_flag_values_are_usage_errors(base, program, args, message):
    if program == "main.py":
        out = cli("main.py", *TINY, *paths(base), *args)
    else:
        out = cli("inference.py", "--segnet_file", str(base / "segnet.pth"), "--obsnet_file",
                  str(base / "obsnet"), "--img_folder", str(base / "data" / "test"), "--out",
                  str(base / "never"), "--width_mult", "0.0625", *args)
    assert last_line(out, program, 2) == message


# ------------------------------------------------------------------ 2. signals and workers

def start_training(base, name, *extra):
    """main.py training the observer with one data worker, in its own process group."""
    cmd = [sys.executable, "main.py", *TINY, *paths(base, obsnet=name), "--num_workers", "1",
           "--adv", "min_random_patch", *extra]
    return subprocess.Popen(cmd, cwd=ROOT, env=ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)


def wait_for_step(proc, epoch):
    """Read the output until the progress bar of ``epoch`` shows a finished step."""
    seen, bar = "", re.compile(rf"ObsNet epoch {epoch}:\s+\d+%\|[^|]*\| [1-9]\d*/")
    while char := proc.stdout.read(1):
        seen += char
        if bar.search(seen[-200:]):
            return seen
    raise AssertionError(seen + f"\nrc {proc.wait()}")


def finish(proc, seen):
    out = seen + proc.communicate(timeout=120)[0]
    assert "Traceback" not in out and "DataLoader worker" not in out, out
    return out.strip().splitlines()[-1]


@pytest.mark.slow
def test_sigterm_to_the_process_group_stops_gracefully(base):
    proc = start_training(base, "term", "--epoch", "2")
    seen = wait_for_step(proc, 1)
    os.killpg(proc.pid, signal.SIGTERM)  # as scancel / systemd: the workers get it too
    line = finish(proc, seen)
    assert proc.returncode == 143, line
    assert line.startswith("main.py: interrupted (SIGTERM) during ObsNet epoch 1: "), line
    assert line.endswith("run again with --resume to restart epoch 1"), line


def test_second_signal_exits_with_128_plus_its_number(base):
    proc = start_training(base, "double")
    seen = wait_for_step(proc, 0)
    os.killpg(proc.pid, signal.SIGINT)
    os.killpg(proc.pid, signal.SIGTERM)
    line = finish(proc, seen)
    assert proc.returncode == 143, line
    assert line == ("main.py: interrupted again (SIGTERM) while stopping: stopped at once, "
                    "nothing saved from the current epoch")


def test_worker_killed_by_the_oom_killer_is_one_line(base):
    proc = start_training(base, "oom")
    seen = wait_for_step(proc, 0)
    with open(f"/proc/{proc.pid}/task/{proc.pid}/children") as f:
        worker = int(f.read().split()[0])
    os.kill(worker, signal.SIGKILL)
    line = finish(proc, seen)
    assert proc.returncode == 1, line
    assert line == (f"main.py: error: data loading worker (pid {worker}) was killed by SIGKILL, "
                    "often the out-of-memory killer's doing; try fewer --num_workers or a "
                    "smaller --bsize")


# ---------------------------------------------------------------------------------- 3. data

def test_dataset_check_reports_bombs_and_unlabelled_labels_and_reads_bom(bad_data):
    out = cli("-m", "obsnet.check", "--data", "Synthetic", "--dset_folder", str(bad_data),
              "--workers", "1")
    assert out.returncode == 1 and "Traceback" not in out.stderr, out.stdout + out.stderr
    problems = [line.strip() for line in out.stdout.splitlines() if line.startswith("  ")]
    bomb = listed(bad_data, "train", 2)[0]
    assert (f"{bad_data / 'train.txt'}:2: image {bomb}: cannot be read: Image size (200000000 "
            f"pixels) exceeds limit of 178956970 pixels, could be decompression bomb DOS "
            f"attack.") in problems, problems
    for where, split, k in (("train.txt:3", "train", 3), ("test.txt:1", "test", 1)):
        label = listed(bad_data, split, k)[1]
        assert (f"{bad_data / where}: annotation {label}: every pixel is the ignore id 255 "
                f"(nothing to learn or score)") in problems, problems
    assert len(problems) == 3, problems  # the byte-order mark is no problem


def test_deeply_nested_odgt_is_one_problem(tmp_path):
    root = tmp_path / "street"
    root.mkdir()
    (root / "train.odgt").write_text("[" * 100_000 + "]" * 100_000 + "\n")
    out = cli("-m", "obsnet.check", "--data", "StreetHazard", "--dset_folder", str(root),
              "--splits", "train")
    assert out.returncode == 1 and "Traceback" not in out.stderr, out.stderr
    assert (f"  {root / 'train.odgt'}:1: invalid JSON: nested too deeply (an entry is a JSON "
            f"object inside at most one array)") in out.stdout.splitlines(), out.stdout


def test_bad_training_samples_skipped_and_counted(base, bad_data):
    out = cli("main.py", *TINY, *paths(base, data="bad_data", obsnet="skip"), "--bsize", "1",
              "--skip_bad_samples")
    assert out.returncode == 0, out.stderr[-3000:]
    bomb = listed(bad_data, "train", 2)[0]
    warnings = [line for line in out.stdout.splitlines() if line.startswith("warning: skipped")]
    assert warnings == [f"warning: skipped unreadable sample: {bad_data / 'train.txt'}:2: image "
                        f"{bomb}: cannot be read: Image size (200000000 pixels) exceeds limit of "
                        f"178956970 pixels, could be decompression bomb DOS attack."], out.stdout
    epoch = [line for line in out.stdout.splitlines() if line.startswith("ObsNet epoch 0:")]
    assert len(epoch) == 1 and "loss nan" not in epoch[0], out.stdout
    assert epoch[0].endswith(" (1 batch(es) skipped: every pixel is the ignore label)"), epoch


def test_over_large_training_image_stops_with_one_line(base, bad_data):
    out = cli("main.py", *TINY, *paths(base, data="bad_data", obsnet="bomb"), "--num_workers", "1")
    bomb = listed(bad_data, "train", 2)[0]
    assert last_line(out, "main.py", 1) == (
        f"main.py: error: {bad_data / 'train.txt'}:2: image {bomb}: cannot be read: Image size "
        f"(200000000 pixels) exceeds limit of 178956970 pixels, could be decompression bomb DOS "
        f"attack.")


def test_skipping_every_sample_is_an_error_and_saves_nothing(base):
    data = variant(base, "unreadable", train_lines=4)
    for k in range(1, 5):
        image = listed(data, "train", k)[0]
        image.write_bytes(image.read_bytes()[:40])  # truncated PNG
    out = cli("main.py", *TINY, *paths(base, data="unreadable", obsnet="none_left"),
              "--skip_bad_samples")
    line = last_line(out, "main.py", 1)
    assert line.startswith(f"main.py: error: {data / 'train.txt'}: ObsNet epoch 0 made no training "
                           f"step, every batch was left out (4 unreadable sample(s) skipped, 0 "
                           f"batch(es) with every pixel ignored); nothing saved; first: "), line
    assert not (base / "none_left").exists() or not list((base / "none_left").iterdir())


# ----------------------------------------------------------------------------- 5. inference

@pytest.fixture(scope="module")
def nets(tmp_path_factory):
    root = tmp_path_factory.mktemp("inference_nets")
    torch.manual_seed(0)
    save_checkpoint(root / "segnet.pth", {"model": SegNet(3, 12, width_mult=0.0625).state_dict()})
    obsnet = Obsnet_Seg(3, 1, width_mult=0.0625).state_dict()
    save_checkpoint(root / "obsnet" / "best.pth", {"model": obsnet})
    next(v for v in obsnet.values() if v.is_floating_point())[...] = float("nan")
    save_checkpoint(root / "nan_obsnet" / "best.pth", {"model": obsnet})
    return root


def run_inference(nets, folder, out, obsnet="obsnet"):
    return cli("inference.py", "--data", "CamVid", "--segnet_file", str(nets / "segnet.pth"),
               "--obsnet_file", str(nets / obsnet), "--img_folder", str(folder), "--out", str(out),
               "--width_mult", "0.0625", "--size", "32", "48")


def test_inference_names_16_bit_and_bad_images(nets, tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for name in ("a.png", "a.jpg"):
        Image.fromarray(rng.integers(0, 255, (40, 60, 3), dtype=np.uint8)).save(folder / name)
    Image.fromarray(np.full((40, 60), 0x8080, np.uint16)).save(folder / "grey16.png")
    assert Image.open(folder / "grey16.png").mode.startswith("I")
    out = run_inference(nets, folder, tmp_path / "out")
    assert out.returncode == 0, out.stderr
    for name in ("a.png", "a.jpg", "grey16.png"):
        assert np.load(tmp_path / "out" / f"{name}.npy").shape == (40, 60)
    with Image.open(tmp_path / "out" / "grey16.png.png") as triptych:
        left = np.asarray(triptych.convert("RGB"))[:, :60]
    assert np.all(left == 128), np.unique(left)  # 0x8080 / 257, not clipped to white

    bomb_png(folder / "huge.png")
    out = run_inference(nets, folder, tmp_path / "out2")
    assert last_line(out, "inference.py", 1) == (
        f"inference.py: error: image {folder / 'huge.png'}: cannot be read: Image size "
        f"(200000000 pixels) exceeds limit of 178956970 pixels, could be decompression bomb DOS "
        f"attack.")


def test_inference_with_nan_weights_names_the_checkpoint(nets, tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    Image.new("RGB", (48, 32), (90, 120, 30)).save(folder / "x.png")
    out = run_inference(nets, folder, tmp_path / "out", obsnet="nan_obsnet")
    line = last_line(out, "inference.py", 1)
    assert line.startswith(f"inference.py: error: --obsnet_file {nets / 'nan_obsnet' / 'best.pth'}: "
                           "holds NaN or infinite weights (first: "), line


def test_viridis_survives_nan_and_inf():
    from obsnet.visual import viridis
    maps = torch.tensor([[[float("nan"), 0.5], [float("inf"), -float("inf")]]])
    for lo, hi in ((None, None), (0.0, 1.0)):
        assert viridis(maps, lo, hi).shape == (1, 3, 2, 2)


# ------------------------------------------------------------------------ 6. one-liners

def test_table_printed_before_results_files_and_unpool_warning_in_our_words(base):
    from obsnet.utils import UNPOOL_NOTE
    logs = base / "logs_csv"
    (logs / "results_test_ood.csv").mkdir(parents=True)  # cannot be written as a file
    # listed as an earlier run's (else refused before any work), replaced with --overwrite
    (logs / ".obsnet-written.json").write_text('{"files": ["results_test_ood.csv"]}')
    out = cli("main.py", *TINY, *paths(base, obsnet="csv"), "--test_only", "--test_multi", "mcp",
              "--overwrite")
    line = last_line(out, "main.py", 1)
    assert "results_test_ood.csv" in line and "Is a directory" in line, line
    assert any(row.startswith("Method ") for row in out.stdout.splitlines()), out.stdout
    assert out.stdout.count(UNPOOL_NOTE) == 1 and "UserWarning" not in out.stderr, out.stderr


def test_batches_with_every_pixel_ignored_are_skipped_in_both_stages():
    from obsnet.data.errors import DatasetError
    from obsnet.train import ObserverConfig, ObserverJob, SegNetJob, train_observer_epoch, train_segnet_epoch
    from obsnet.losses import CRITERIA
    torch.manual_seed(0)
    segnet, obsnet = SegNet(3, 12, width_mult=0.0625), Obsnet_Seg(3, 1, width_mult=0.0625)
    images = torch.randn(2, 3, 32, 48)
    labelled, ignored = torch.randint(0, 12, (2, 32, 48)), torch.full((2, 32, 48), 255)
    cpu, bce = torch.device("cpu"), CRITERIA["bce"](2.0)
    observer = ObserverConfig(None, ignore_id=255)
    for loader, unlabelled in (([(images, ignored), (images, labelled)], 1), ([(images, ignored)], None)):
        for epoch in (partial_observer(train_observer_epoch, ObserverJob, obsnet, segnet, bce, cpu,
                                       observer),
                      partial_segnet(train_segnet_epoch, SegNetJob, segnet, cpu)):
            if unlabelled is None:
                with pytest.raises(DatasetError, match="made no training step"):
                    epoch(loader)
                continue
            stats = epoch(loader)
            assert stats["unlabelled_batches"] == 1 and np.isfinite(stats["loss"]), stats


def partial_observer(fn, job, obsnet, segnet, criterion, device, cfg):
    optimizer = torch.optim.SGD(obsnet.parameters(), lr=0.01)
    return lambda loader: fn(job(model=obsnet, loader=loader, optimizer=optimizer, device=device,
                                 progress=False, segnet=segnet, criterion=criterion, config=cfg), 0)


def partial_segnet(fn, job, segnet, device):
    optimizer = torch.optim.SGD(segnet.parameters(), lr=0.01)
    return lambda loader: fn(job(model=segnet, loader=loader, optimizer=optimizer, device=device,
                                 progress=False, nclass=12), 0)


def test_our_warnings_print_as_one_line_others_pass_on(capsys):
    def warn_twice(argv):
        warnings.warn("class(es) 3 never predicted", ObsnetWarning)
        warnings.warn("a library's own warning", UserWarning)
        return 0
    with pytest.warns(UserWarning) as passed_on:
        assert run_friendly("main.py", warn_twice, []) == 0
    assert capsys.readouterr().err == "main.py: warning: class(es) 3 never predicted\n"
    assert [str(w.message) for w in passed_on] == ["a library's own warning"]
    with pytest.warns(UserWarning) as passed_on:
        assert run_friendly("main.py", warn_twice, ["--debug"]) == 0
    assert capsys.readouterr().err == ""
    assert len(passed_on) == 2
