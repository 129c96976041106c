"""main.py never loses a user's data or compute: it refuses to generate synthetic data over a
real dataset, to replace an earlier run's checkpoints, to share its outputs with a running
run; it stops a diverged run without saving it; it probes its outputs before any work; every
problem with a checkpoint or a write is one line naming the flag and the file."""
import errno
import os
import random
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from obsnet import cli as obsnet_cli
from obsnet import outputs
from obsnet.data.errors import DatasetError
from obsnet.data.synthetic import MARKER, OWNER, generate, refusal
from obsnet.models.registry import build_segmenter
from tests.helpers import ROOT, runner
from tests.helpers.runner import ENV, one_line_error
from tests.helpers.runner import TINY_SERIAL as TINY, run_paths as paths


def main_py(*args, umask=None):
    """``python main.py ARGS`` as a new process (a new interpreter with ``umask`` when given,
    else one forked from the test runner's preloaded server: see ``cli``)."""
    if umask is None:
        return runner.main_py(*args, env=ENV)
    return subprocess.run([sys.executable, str(ROOT / "main.py"), *args], cwd=ROOT, env=ENV,
                          capture_output=True, text=True, timeout=300,
                          preexec_fn=lambda: os.umask(umask))


def main_in_process(capsys, *args) -> tuple[int, str]:
    """``obsnet_cli.main(ARGS)`` in this process (cheaper than a subprocess); (exit code, the last
    line of stderr)."""
    capsys.readouterr()
    code = obsnet_cli.main([str(a) for a in args])
    err = capsys.readouterr().err.strip().splitlines()
    torch.use_deterministic_algorithms(False)  # main seeded and set it for this process
    return code, (err[-1] if err else "")


def listing(root: Path) -> dict:
    """Every file under ``root`` with its size and modification time."""
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(root.rglob("*"))}


@pytest.fixture(scope="module")
def base(small_data):
    """Tiny synthetic data and a SegNet checkpoint (conftest's ``small_data``)."""
    return small_data


# --------------------------------------------------------------------------- 1. data loss

def test_synthetic_data_is_never_written_over_a_real_dataset(base, tmp_path):
    real = tmp_path / "camvid"  # a dataset in the same layout, not written by the generator
    shutil.copytree(base / "data", real)
    for marker in (MARKER, OWNER):
        (real / marker).unlink()
    (real / "train" / "train_00000.png").rename(real / "train" / "0001TP_006690.png")
    before = listing(real)
    out = main_py(*TINY, *paths(base, obsnet="dataloss"), "--dset_folder", str(real), "--epoch", "1")
    assert out.returncode == 2, out.stderr
    one_line_error(out, f"--dset_folder {real}: it holds files the synthetic generator did not "
                        f"write (test, test.txt, test_ood, test_ood.txt, ...); nothing was changed")
    assert listing(real) == before and not (base / "dataloss").exists()
    with pytest.raises(DatasetError, match="did not write"):  # python -m obsnet.synthetic, tests
        generate(real, seed=0, n_train=1, n_val=1, n_test=1, size=(32, 48))
    assert listing(real) == before


def test_synthetic_folders_it_may_write(tmp_path):
    assert refusal(tmp_path / "new") is None
    (tmp_path / "empty").mkdir()
    assert refusal(tmp_path / "empty") is None
    (tmp_path / "file").write_text("x")
    assert "is a file" in refusal(tmp_path / "file")
    # complete, written by an earlier generator version (no owner marker, other version): ours
    old = generate(tmp_path / "old", seed=0, n_train=1, n_val=1, n_test=1, size=(32, 48))
    (old / OWNER).unlink()
    (old / MARKER).write_text('{"version": 0}')
    assert refusal(old) is None
    generate(old, seed=0, n_train=2, n_val=1, n_test=1, size=(32, 48))
    assert (old / OWNER).is_file() and len((old / "train.txt").read_text().splitlines()) == 2
    # interrupted (owner marker, no .complete): ours, redone
    (old / MARKER).unlink()
    assert refusal(old) is None
    # interrupted by an earlier version (no marker at all): only its names, so ours ...
    (old / OWNER).unlink()
    assert refusal(old) is None
    # ... unless anything else is there, e.g. an image of another name (a real dataset)
    (old / "train" / "train_00000.png").rename(old / "train" / "0001TP_006690.png")
    assert "did not write (test, test.txt" in refusal(old)


def test_demo_reruns_over_its_own_files(tmp_path, monkeypatch, capsys):
    """``python main.py`` twice (at a tiny size): the SegNet stage is skipped, the observer
    and test stages replace the demo's own observer and results (--overwrite), nothing is
    refused."""
    monkeypatch.chdir(tmp_path)
    generate(tmp_path / "data" / "Synthetic", seed=0, n_train=8, n_val=2, n_test=2, size=(32, 48))
    (tmp_path / "data" / "Synthetic" / OWNER).unlink()  # as earlier versions left it
    monkeypatch.setattr(obsnet_cli, "DEMO_COMMON", obsnet_cli.DEMO_COMMON + [
        "--size", "32", "48", "--width_mult", "0.0625", "--bsize", "4", "--num_workers", "0"])
    monkeypatch.setattr(obsnet_cli, "DEMO_STAGES", [
        ["1" if previous in ("--epoch", "--T") else a for previous, a in zip([None, *s], s)]
        for s in obsnet_cli.DEMO_STAGES])
    for _ in range(2):
        code, last = main_in_process(capsys, *[])
        assert code == 0, last
    torch.use_deterministic_algorithms(False)
    assert (tmp_path / "ckpt" / "demo" / "best.pth").is_file()
    assert (tmp_path / "logs" / "demo" / "results_test_ood.json").is_file()


# --------------------------------------------------------------------------- 2. divergence

def test_diverged_training_stops_with_one_line_and_saves_nothing(base, tmp_path):
    seg = tmp_path / "seg" / "segnet.pth"
    out = main_py(*TINY, *paths(base, obsnet="nan"), "--segnet_file", str(seg),
                  "--train_segnet", "--lr", "1e30", "--epoch", "2")
    assert out.returncode == 1, out.stderr
    line = one_line_error(out, "main.py: error: SegNet training diverged: ")
    assert re.search(r"the loss is (nan|inf|-inf) at epoch 0, step \d+; nothing of epoch 0 was "
                     r"saved \(lower --lr\)$", line), line
    assert list(seg.parent.iterdir()) == []  # no checkpoint, no temporary file, no lock


# --------------------------------------------------------------------------- 3. overwrite, lock

def test_earlier_checkpoints_are_not_replaced_without_resume_or_overwrite(base, tmp_path, capsys):
    folder = tmp_path / "obs"
    folder.mkdir()
    (folder / "best.pth").write_bytes(b"an earlier run")
    code, line = main_in_process(capsys, *TINY, *paths(base), "--obsnet_file", folder,
                                 "--epoch", "1")
    assert code == 2 and line == (f"main.py: error: --obsnet_file {folder}: checkpoints of an "
                                  f"earlier run are there (best.pth); add --resume to continue "
                                  f"that run or --overwrite to replace them")
    assert (folder / "best.pth").read_bytes() == b"an earlier run"
    seg = base / "segnet.pth"
    code, line = main_in_process(capsys, *TINY, *paths(base), "--train_segnet", "--epoch", "1")
    assert code == 2 and line == (f"main.py: error: --segnet_file {seg}: checkpoints of an earlier "
                                  f"run are there (segnet.pth); add --resume to continue that "
                                  f"run or --overwrite to replace them")
    code, line = main_in_process(capsys, *TINY, *paths(base), "--obsnet_file", str(folder),
                                 "--resume", "--overwrite")
    assert code == 2 and "give one of them" in line


def test_a_live_run_holds_its_outputs(base, tmp_path, capsys):
    folder = tmp_path / "busy"
    folder.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (folder / ".obsnet.lock").write_text(f"{holder.pid}\n")
        code, line = main_in_process(capsys, *TINY, *paths(base), "--obsnet_file", folder,
                                     "--epoch", "1")
    finally:
        holder.kill()
        holder.wait()
    assert code == 2 and line == (
        f"main.py: error: --obsnet_file {folder}: in use by another run (PID {holder.pid}), "
        f"which holds {folder / '.obsnet.lock'}; wait for it to end or choose another --obsnet_file")
    assert (folder / ".obsnet.lock").read_text() == f"{holder.pid}\n"  # not ours: left alone


@pytest.fixture(scope="module")
def rerun(base):
    """``python main.py`` training an observer with --overwrite (umask 027) into a folder
    holding an earlier run's checkpoints, the lock of a killed run and temporary files of a
    killed save (the subprocess test of the refusals, the lock and the file hygiene)."""
    folder = base / "rerun"
    folder.mkdir()
    for name in ("best.pth", "last.pth"):
        (folder / name).write_bytes(b"an earlier run")
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (folder / ".obsnet.lock").write_text(f"{dead.pid}\n")
    planted = {"stale": folder / f".last.pth.{dead.pid}.0123abcd.tmp",  # our pattern, writer gone
               "legacy": folder / ".best.pth.k2j_x9ab.tmp",  # mkstemp's, earlier versions
               "foreign": folder / ".last.pth.mine.tmp", "notes": folder / "notes.txt"}
    for path in planted.values():
        path.write_bytes(b"half")
    out = main_py(*TINY, *paths(base, obsnet="rerun"), "--epoch", "1", "--overwrite", umask=0o027)
    return folder, out, planted


def test_overwrite_replaces_only_our_files_and_a_stale_lock_is_taken_over(rerun):
    folder, out, planted = rerun
    assert out.returncode == 0, out.stderr
    assert torch.load(folder / "last.pth", weights_only=True)["epoch"] == 0
    assert not (folder / ".obsnet.lock").exists()  # released at exit
    assert not planted["stale"].exists() and not planted["legacy"].exists()
    assert planted["foreign"].read_bytes() == planted["notes"].read_bytes() == b"half"


# --------------------------------------------------------------------------- 4. late checks

def test_outputs_are_probed_before_any_work(base, tmp_path, capsys):
    not_a_folder = tmp_path / "obsnet.pth"
    not_a_folder.write_bytes(b"x")
    no_data = ["--data", "CamVid", "--dset_folder", str(tmp_path / "no_data"), "--size", "32",
               "48", "--width_mult", "0.0625", "--segnet_file", str(base / "segnet.pth"),
               "--tboard", str(tmp_path / "logs")]
    out = main_py(*no_data, "--obsnet_file", str(not_a_folder), "--epoch", "1")
    assert out.returncode == 1, out.stderr
    one_line_error(out, f"main.py: error: --obsnet_file {not_a_folder}: cannot be written (it is "
                        f"a file; a folder is needed)")
    blocked = not_a_folder / "segnet.pth"
    code, line = main_in_process(capsys, *no_data, "--train_segnet", "--segnet_file", blocked)
    assert code == 1 and line == (f"main.py: error: --segnet_file {blocked}: cannot be written "
                                  f"(a part of the path is a file, not a folder)")
    assert not (tmp_path / "logs").exists() or not any((tmp_path / "logs").iterdir())


@pytest.mark.skipif(not Path("/sys/kernel").is_dir(), reason="needs Linux's read-only /sys")
def test_a_permission_error_names_the_flag_and_the_path(base, capsys):
    code, line = main_in_process(capsys, *TINY, *paths(base), "--tboard", "/sys/obsnet_probe/logs",
                                 "--test_only", "--test_multi", "mcp")
    assert code == 1 and re.fullmatch(r"main.py: error: --tboard /sys/obsnet_probe/logs: cannot be "
                                      r"written \((Operation not permitted|Permission denied)\)", line)


# --------------------------------------------------------------------------- 5, 6. checkpoints

def test_a_dict_without_weights_is_one_line(base, tmp_path):
    bad = tmp_path / "model5.pth"
    torch.save({"model": 5}, bad)
    out = main_py(*TINY, *paths(base), "--segnet_file", str(bad), "--test_only", "--test_multi", "mcp",
                  "--tboard", str(tmp_path / "logs"))
    assert out.returncode == 1, out.stderr
    one_line_error(out, f"--segnet_file {bad}: not a model checkpoint (it holds the number 5 as "
                        f"its 'model', not a state_dict of weights)")


def _nan_segnet(path):
    """A SegNet checkpoint whose first weight holds NaN (saved from a diverged run)."""
    state = build_segmenter("segnet", 12, 0.0625).state_dict()
    key = next(k for k in state if k.endswith("weight"))
    state[key] = state[key] * float("nan")
    torch.save({"model": state}, path)


CONTENTS = {
    "tensor.pth": (lambda p: torch.save(torch.zeros(3), p),
                   "not a model checkpoint (it holds a tensor, not a state_dict of weights)"),
    "list.pth": (lambda p: torch.save([1, 2], p),
                 "not a model checkpoint (it holds a list, not a state_dict of weights)"),
    "random.pth": (lambda p: p.write_bytes(random.Random(1).randbytes(4096)),
                   "not a checkpoint (not a PyTorch file: Unsupported operand"),
    "nan.pth": (_nan_segnet, "holds NaN or infinite weights (first: "),
}


@pytest.mark.parametrize("name", sorted(CONTENTS))
def test_what_a_segnet_file_holds_is_said_in_one_line(base, tmp_path, capsys, name):
    make, message = CONTENTS[name]
    path = tmp_path / name
    make(path)
    code, line = main_in_process(capsys, *TINY, *paths(base), "--segnet_file", path, "--test_only",
                                 "--test_multi", "mcp", "--tboard", tmp_path / "logs")
    assert code == 1 and line.startswith(f"main.py: error: --segnet_file {path}: {message}"), line
    assert "could run code" not in line


def test_a_missing_ensemble_member_is_named(base, tmp_path, capsys):
    missing = tmp_path / "member2.pth"
    code, line = main_in_process(capsys, *TINY, *paths(base), "--test_only", "--test_multi",
                                 "ensemble", "--ensemble", f"{base / 'segnet.pth'},{missing}",
                                 "--tboard", tmp_path / "logs")
    assert code == 1 and line == f"main.py: error: --ensemble member {missing}: file not found"


def test_resume_from_another_optimizer_or_plain_weights(rerun, tmp_path, capsys):
    base = rerun[0].parent
    folder = tmp_path / "obs"
    shutil.copytree(rerun[0], folder)
    code, line = main_in_process(capsys, *TINY, *paths(base), "--obsnet_file", folder, "--resume",
                                 "--epoch", "2", "--optim", "AdamW", "--tboard", tmp_path / "logs")
    assert code == 1 and line == (
        f"main.py: error: --resume {folder / 'last.pth'}: this run was trained with --optim SGD, "
        f"not --optim AdamW; resume with --optim SGD, or start over with --overwrite")
    plain = torch.load(folder / "last.pth", weights_only=True)["model"]
    torch.save(plain, folder / "last.pth")
    code, line = main_in_process(capsys, *TINY, *paths(base), "--obsnet_file", folder, "--resume",
                                 "--epoch", "2", "--tboard", tmp_path / "logs")
    assert code == 1 and line == (
        f"main.py: error: --resume {folder / 'last.pth'}: holds weights but no training state "
        f"(optimizer, epoch, best missing); --resume continues from the last.pth a training run "
        f"wrote: start over with --overwrite")


def test_a_full_disk_is_one_line_and_keeps_the_previous_checkpoint(rerun, tmp_path, capsys,
                                                                   monkeypatch):
    base = rerun[0].parent
    folder = tmp_path / "obs"
    shutil.copytree(rerun[0], folder)
    before = {p.name: p.read_bytes() for p in folder.glob("*.pth")}
    real_write = outputs.Sink.write

    def full_after_epoch_0(self, data):  # the disk fills up once last.pth of epoch 0 exists
        if (self.target.parent / "last.pth").exists() and self.target.parent == folder:
            real_write(self, bytes(data)[: len(data) // 2])
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_write(self, data)

    monkeypatch.setattr(outputs.Sink, "write", full_after_epoch_0)
    code, line = main_in_process(capsys, *TINY, *paths(base), "--obsnet_file", folder, "--resume",
                                 "--epoch", "2", "--tboard", tmp_path / "logs")
    assert code == 1 and re.fullmatch(
        rf"main.py: error: --obsnet_file {re.escape(str(folder))}/(best|last).pth: cannot be "
        rf"written \(No space left on device\); the previous file is unchanged", line), line
    assert {p.name: p.read_bytes() for p in folder.glob("*.pth")} == before
    assert sorted(p.name for p in folder.iterdir() if p.name.startswith(".")) == [
        ".last.pth.mine.tmp"]  # no temporary file and no lock left; the user's file kept


# --------------------------------------------------------------------------- 7. hygiene

def test_outputs_follow_the_umask(rerun):
    folder, out, _ = rerun
    assert out.returncode == 0, out.stderr
    for path in (folder / "best.pth", folder / "last.pth",
                 folder.parent / "logs_rerun" / "config_train_obsnet.json",
                 folder.parent / "logs_rerun" / ".obsnet-written.json"):
        assert path.stat().st_mode & 0o777 == 0o640, path


def test_the_temporary_file_is_synced_before_the_rename(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(outputs.os, "fsync", lambda fd: calls.append("fsync"))
    real_replace = os.replace
    monkeypatch.setattr(outputs.os, "replace", lambda a, b: (calls.append("replace"),
                                                             real_replace(a, b)))
    outputs.atomic_write(tmp_path / "x.json", lambda f: f.write(b"{}"))
    assert calls[:2] == ["fsync", "replace"] and (tmp_path / "x.json").read_bytes() == b"{}"
