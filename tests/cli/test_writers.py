"""Every writer (main.py's stages, python -m obsnet.export, inference.py, python -m obsnet.paste)
refuses an output that is, or would replace, one of its inputs, with or without --overwrite;
inference.py replaces only its own earlier outputs, locks --out and writes atomically; paste
--overwrite writes the new split aside and swaps it in at the end."""
import errno
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from obsnet import cli as obsnet_cli
from obsnet import export, inference, outputs
from obsnet import paste as paste_cli
from obsnet.data import paste
from tests.helpers import runner
from tests.helpers.nets import save_tiny_networks
from tests.helpers.pasted import NAMES, files_of, make_split, ood_files
from tests.helpers.runner import TINY_SERIAL as TINY, run_paths as paths

ENOSPC = os.strerror(errno.ENOSPC)


def run_main(capsys, *args) -> tuple[int, str]:
    """``main.py ARGS`` in this process: (exit code, stderr, which must be one line)."""
    capsys.readouterr()
    code = obsnet_cli.main([str(a) for a in args])
    torch.use_deterministic_algorithms(False)  # main seeded and set it for this process
    return code, one_line(capsys.readouterr().err)


def one_line(err: str) -> str:
    """The only line of ``err`` (no traceback, no second line)."""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def error_line(err: str, prog: str) -> str:
    """The one line of ``prog`` in ``err``, from the program's name on (progress bars may
    precede it on its line); no traceback."""
    lines = [line[line.index(f"{prog}: "):] for line in err.splitlines() if f"{prog}: " in line]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def snapshot(*files) -> dict:
    """The bytes of ``files`` (None for a missing one)."""
    return {str(f): (Path(f).read_bytes() if Path(f).is_file() else None) for f in files}


@pytest.fixture(scope="module")
def base(small_data):  # noqa: F811  (the imported fixture, by pytest)
    return small_data


# --------------------------------------------------------------------------- item 2: main.py

def test_observer_folder_holding_the_segnet_is_refused_even_with_overwrite(base, tmp_path, capsys):
    folder = tmp_path / "m"
    folder.mkdir()
    seg = folder / "best.pth"
    seg.write_bytes((base / "segnet.pth").read_bytes())
    before = snapshot(seg)
    argv = [*TINY, *paths(base), "--segnet_file", seg, "--obsnet_file", folder,
            "--tboard", tmp_path / "logs", "--epoch", "1"]
    for extra in ([], ["--overwrite"]):
        code, line = run_main(capsys, *argv, *extra)
        assert code == 2 and line == (
            f"main.py: error: --obsnet_file {folder}: best.pth there would replace --segnet_file "
            f"{seg}, an input of this run; choose another --obsnet_file"), line
    assert snapshot(seg) == before
    assert sorted(p.name for p in folder.iterdir()) == ["best.pth"]  # no lock, nothing else


def test_observer_checkpoints_every_five_epochs_are_planned_too(base, tmp_path, capsys):
    folder = tmp_path / "m"
    folder.mkdir()
    seg = folder / "epoch005.pth"
    seg.write_bytes((base / "segnet.pth").read_bytes())
    code, line = run_main(capsys, *TINY, *paths(base), "--segnet_file", seg, "--obsnet_file",
                          folder, "--tboard", tmp_path / "logs", "--epoch", "5", "--overwrite")
    assert code == 2 and "epoch005.pth there would replace --segnet_file" in line, line


def test_segnet_training_never_writes_over_its_initial_weights_or_the_dataset(base, tmp_path,
                                                                              capsys):
    seg = tmp_path / "s.pth"
    last = tmp_path / "s.last.pth"
    last.write_bytes(b"my VGG weights")
    code, line = run_main(capsys, *TINY, *paths(base), "--train_segnet", "--segnet_file", seg,
                          "--vgg_weights", last, "--epoch", "1", "--overwrite")
    assert code == 2 and line == (
        f"main.py: error: --segnet_file {seg}: {last} would replace --vgg_weights {last}, an "
        f"input of this run; choose another --segnet_file"), line
    assert last.read_bytes() == b"my VGG weights" and not seg.exists()
    listing = base / "data" / "train.txt"
    before = snapshot(listing)
    code, line = run_main(capsys, *TINY, *paths(base), "--train_segnet", "--segnet_file", listing,
                          "--tboard", tmp_path / "logs", "--epoch", "1", "--overwrite")
    assert code == 2 and line == (
        f"main.py: error: --segnet_file {listing}: would replace --dset_folder file {listing}, "
        f"an input of this run; choose another --segnet_file"), line
    assert snapshot(listing) == before


def test_tboard_files_never_replace_a_test_input(base, tmp_path, capsys):
    logs = tmp_path / "logs"
    logs.mkdir()
    seg = logs / "config_test_test_ood.json"
    seg.write_bytes((base / "segnet.pth").read_bytes())
    member = logs / "results_test_ood.csv"
    member.write_bytes((base / "segnet.pth").read_bytes())
    before = snapshot(seg, member)
    common = [*TINY, *paths(base), "--tboard", logs, "--test_only"]
    code, line = run_main(capsys, *common, "--segnet_file", seg, "--test_multi", "mcp")
    assert code == 2 and line == (
        f"main.py: error: --tboard {logs}: config_test_test_ood.json there would replace "
        f"--segnet_file {seg}, an input of this run; choose another --tboard"), line
    code, line = run_main(capsys, *common, "--test_multi", "ensemble", "--ensemble", member)
    assert code == 2 and line == (
        f"main.py: error: --tboard {logs}: results_test_ood.csv there would replace --ensemble "
        f"member {member}, an input of this run; choose another --tboard"), line
    assert snapshot(seg, member) == before


def test_fit_stats_never_replaces_its_segnet_through_a_link(base, tmp_path, capsys):
    seg = tmp_path / "s.pth"
    seg.write_bytes((base / "segnet.pth").read_bytes())
    stats = tmp_path / "s.stats.pth"
    os.link(seg, stats)  # a hard link: the same file under the statistics' name
    code, line = run_main(capsys, *TINY, *paths(base), "--segnet_file", seg, "--fit_stats",
                          "--tboard", tmp_path / "logs", "--overwrite")
    assert code == 2 and line == (
        f"main.py: error: --segnet_file {seg}: {stats} would replace --segnet_file {seg}, an "
        f"input of this run; {stats} must be a file of its own"), line
    assert os.path.samefile(seg, stats)


def test_a_real_main_py_refuses_the_observer_over_its_segnet(base, tmp_path):
    folder = tmp_path / "m"
    folder.mkdir()
    seg = folder / "last.pth"
    seg.write_bytes((base / "segnet.pth").read_bytes())
    out = runner.main_py(*TINY, *paths(base), "--segnet_file", str(seg), "--obsnet_file",
                      str(folder), "--tboard", str(tmp_path / "logs"), "--epoch", "1",
                      "--overwrite")
    assert out.returncode == 2, out.stderr
    assert one_line(out.stderr) == (
        f"main.py: error: --obsnet_file {folder}: last.pth there would replace --segnet_file "
        f"{seg}, an input of this run; choose another --obsnet_file")
    assert seg.read_bytes() == (base / "segnet.pth").read_bytes()


# --------------------------------------------------------------------------- item 2: export

@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    """A tiny SegNet checkpoint and an observer folder (inference.py's and export's inputs)."""
    return save_tiny_networks(tmp_path_factory.mktemp("ckpts"))


def export_main(capsys, ckpts, out, *extra) -> tuple[int, str]:
    capsys.readouterr()
    code = export.main(["--data", "CamVid", "--segnet_file", str(ckpts / "segnet.pth"),
                        "--obsnet_file", str(ckpts / "obsnet"), "--width_mult", "0.0625",
                        "--size", "32", "32", "--out", str(out), *extra])
    return code, one_line(capsys.readouterr().err)


def test_export_never_writes_over_its_checkpoints(ckpts, tmp_path, capsys):
    ckpts = Path(shutil.copytree(ckpts, tmp_path / "ckpts"))  # the module's stay intact if it fails
    seg, obs = ckpts / "segnet.pth", ckpts / "obsnet" / "best.pth"
    before = snapshot(seg, obs)
    link = tmp_path / "model.onnx"
    link.symlink_to(seg)
    cases = [(seg, f"--out {seg}: would replace --segnet_file {seg}"),
             (obs, f"--out {obs}: would replace --obsnet_file {obs}"),
             (link, f"--out {link}: would replace --segnet_file {seg}")]
    for out, start in cases:
        code, line = export_main(capsys, ckpts, out, "--overwrite")
        assert code == 2 and line == (f"python -m obsnet.export: error: {start}, an input of "
                                      f"this run; choose another --out"), line
    assert snapshot(seg, obs) == before and link.is_symlink()
    assert sorted(p.name for p in ckpts.iterdir()) == ["obsnet", "segnet.pth"]  # no lock left


# --------------------------------------------------------------------------- item 3: inference.py

def make_images(folder: Path, names=("a.png", "b.jpg")) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for name in names:
        Image.fromarray(rng.integers(0, 255, (36, 40, 3), dtype=np.uint8)).save(folder / name)
    return folder


def infer(capsys, ckpts, images, out, *extra) -> tuple[int, str]:
    """inference.py in this process: (exit code, its stderr's one line, or "" on success)."""
    capsys.readouterr()
    code = inference.main(["--segnet_file", str(ckpts / "segnet.pth"), "--obsnet_file",
                           str(ckpts / "obsnet"), "--img_folder", str(images), "--out", str(out),
                           "--width_mult", "0.0625", "--size", "32", "32", *map(str, extra)])
    return code, (error_line(capsys.readouterr().err, "inference.py") if code else "")


def test_inference_refuses_its_image_folder_as_out(ckpts, tmp_path, capsys):
    images = make_images(tmp_path / "photos", ("x.png", "x.png.png"))
    before = files_of(images)
    link = tmp_path / "link"
    link.symlink_to(images)
    for out in (images, link):
        for extra in ([], ["--overwrite"]):
            code, line = infer(capsys, ckpts, images, out, *extra)
            assert code == 2 and line == (
                f"inference.py: error: --out {out}: the same folder as --img_folder {images} (a "
                f"rerun would read the outputs as images); choose another --out"), line
    assert files_of(images) == before


def test_inference_never_writes_over_its_checkpoints(ckpts, tmp_path, capsys):
    images = make_images(tmp_path / "photos")
    out = tmp_path / "out"
    out.mkdir()
    seg = out / "a.png.npy"
    seg.write_bytes((ckpts / "segnet.pth").read_bytes())
    for extra in ([], ["--overwrite"]):
        code = inference.main(["--segnet_file", str(seg), "--obsnet_file", str(ckpts / "obsnet"),
                               "--img_folder", str(images), "--out", str(out), "--width_mult",
                               "0.0625", "--size", "32", "32", *extra])
        line = error_line(capsys.readouterr().err, "inference.py")
        assert code == 2 and line == (
            f"inference.py: error: --out {out}: a.png.npy there would replace --segnet_file {seg}, "
            f"an input of this run; choose another --out"), line
    assert seg.read_bytes() == (ckpts / "segnet.pth").read_bytes()


def test_inference_replaces_only_its_own_outputs_and_only_with_overwrite(ckpts, tmp_path, capsys):
    images = make_images(tmp_path / "photos")
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    assert infer(capsys, ckpts, images, out) == (0, "")
    first = files_of(out)
    code, line = infer(capsys, ckpts, images, out)
    assert code == 2 and line == (
        f"inference.py: error: --out {out}: outputs of an earlier run are there (a.png.png, "
        f"a.png.npy, b.jpg.png, ...); add --overwrite to replace them"), line
    assert files_of(out) == first
    ours = ["a.png.npy", "a.png.png", "b.jpg.npy", "b.jpg.png"]
    marker = json.loads((out / inference.MARKER).read_text())
    assert marker["files"] == ours and marker["written_by"] == "inference.py"
    assert sorted(p.name for p in out.iterdir()) == sorted([*ours, "notes.txt", inference.MARKER])
    (out / "a.png.npy").write_bytes(b"ours, changed")
    assert infer(capsys, ckpts, images, out, "--overwrite") == (0, "")
    assert files_of(out) == first  # replaced by the same maps; the user's notes kept
    # a user's file with an output's name is never replaced, even with --overwrite
    make_images(images, ("c.png",))
    (out / "c.png.npy").write_bytes(b"the user's own map")
    for extra in ([], ["--overwrite"]):
        code, line = infer(capsys, ckpts, images, out, *extra)
        assert code == 2 and line == (
            f"inference.py: error: --out {out}: c.png.npy there was not written by inference.py "
            f"(not listed in {inference.MARKER}); not replaced, even with --overwrite; choose "
            f"another --out"), line
    assert (out / "c.png.npy").read_bytes() == b"the user's own map"
    assert not (out / "c.png.png").exists()


def test_inference_locks_out(ckpts, tmp_path, capsys):
    images = make_images(tmp_path / "photos")
    out = tmp_path / "out"
    out.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (out / ".obsnet.lock").write_text(f"{holder.pid}\n")
        code, line = infer(capsys, ckpts, images, out)
    finally:
        holder.kill()
        holder.wait()
    assert code == 2 and line == (
        f"inference.py: error: --out {out}: in use by another run (PID {holder.pid}), which holds "
        f"{out / '.obsnet.lock'}; wait for it to end or choose another --out"), line
    assert sorted(p.name for p in out.iterdir()) == [".obsnet.lock"]


def test_inference_on_a_full_disk_leaves_no_empty_file(ckpts, tmp_path, capsys, monkeypatch):
    images = make_images(tmp_path / "photos")
    out = tmp_path / "out"
    real_write = outputs.Sink.write

    def full_for_maps(self, data):  # the disk is full once the first triptych is written
        if self.target.suffix == ".npy":
            real_write(self, bytes(data)[: len(data) // 2])
            raise OSError(errno.ENOSPC, ENOSPC)
        return real_write(self, data)

    monkeypatch.setattr(outputs.Sink, "write", full_for_maps)
    code, line = infer(capsys, ckpts, images, out)
    assert code == 1 and line == (f"inference.py: error: --out {out / 'a.png.npy'}: cannot be "
                                  f"written ({ENOSPC})"), line
    left = {p.name: p.stat().st_size for p in out.iterdir()}
    assert set(left) == {"a.png.png", inference.MARKER} and all(left.values()), left


def test_inference_out_a_file_is_one_line(ckpts, tmp_path):
    images = make_images(tmp_path / "photos")
    afile = tmp_path / "afile"
    afile.write_text("mine")
    run = runner.inference_py("--segnet_file", str(ckpts / "segnet.pth"), "--obsnet_file",
                           str(ckpts / "obsnet"), "--img_folder", str(images), "--out", str(afile),
                           "--width_mult", "0.0625")
    assert run.returncode == 1, run.stderr
    assert one_line(run.stderr) == (f"inference.py: error: --out {afile}: cannot be written (it "
                                    f"is a file; a folder is needed)")
    assert afile.read_text() == "mine"


# --------------------------------------------------------------------------- items 2, 6: paste

@pytest.fixture
def root(tmp_path) -> Path:
    return make_split(tmp_path / "camvid")


def run_paste(capsys, *argv) -> tuple[int, str]:
    capsys.readouterr()
    code = paste_cli.main([*map(str, argv)])
    return code, (error_line(capsys.readouterr().err, paste.PROG) if code else "")


def test_paste_never_writes_over_its_inputs(root, capsys):
    assert run_paste(capsys, "--root", root, "--split", "val") == (0, "")
    # a split made of the pasted frames: pasting it again would write over its own images
    (root / "val.txt").write_text("".join(f"val_ood/{n} valannot/{n}\n" for n in NAMES))
    before = files_of(root)
    code, line = run_paste(capsys, "--root", root, "--split", "val", "--overwrite")
    image = root / "val_ood" / NAMES[0]
    assert code == 2 and line == (
        f"python -m obsnet.paste: error: --out {root}: val_ood/{NAMES[0]} there would replace "
        f"--split val image {image}, an input of this run; choose another --out"), line
    assert files_of(root) == before
    # cut-outs kept where the output goes: --out o makes o/val_ood the objects' folder
    objects = root.parent / "o" / "val_ood"
    objects.mkdir(parents=True)
    cutout = np.zeros((8, 8, 4), np.uint8)
    cutout[2:6, 2:6] = 255
    Image.fromarray(cutout).save(objects / NAMES[1])
    code, line = run_paste(capsys, "--root", root, "--split", "val", "--out", root.parent / "o",
                           "--objects", objects, "--overwrite")
    assert code == 2 and line == (
        f"python -m obsnet.paste: error: --out {root.parent / 'o'}: val_ood/{NAMES[1]} there "
        f"would replace --objects file {objects / NAMES[1]}, an input of this run; choose "
        f"another --out"), line
    assert sorted(p.name for p in objects.iterdir()) == [NAMES[1]]


def test_paste_overwrite_refuses_a_file_its_marker_does_not_list(root, capsys):
    make_split(root, names=NAMES[:2])
    assert run_paste(capsys, "--root", root, "--split", "val") == (0, "")
    mine = root / "val_ood" / NAMES[2]
    mine.write_bytes(b"my own frame")
    make_split(root)  # val.txt now lists a third frame, whose output name is the user's file
    before = files_of(root)
    code, line = run_paste(capsys, "--root", root, "--split", "val", "--overwrite")
    assert code == 1 and line == (
        f"python -m obsnet.paste: error: {mine}: exists and is not listed in {paste.MARKER} (not "
        f"written by {paste.PROG}); not overwritten, even with --overwrite"), line
    assert files_of(root) == before


def test_paste_failure_at_a_frame_keeps_the_previous_output(root, capsys):
    assert run_paste(capsys, "--root", root, "--split", "val", "--seed", "0") == (0, "")
    before = ood_files(root)
    markers = snapshot(root / "val_ood" / paste.MARKER, root / "valannot_ood" / paste.MARKER)
    (root / "val" / NAMES[2]).write_bytes(b"not an image")  # the last frame fails
    code, line = run_paste(capsys, "--root", root, "--split", "val", "--seed", "1", "--overwrite")
    assert code == 1 and NAMES[2] in line and "cannot be read" in line, line
    assert ood_files(root) == before
    assert snapshot(*markers) == markers
    assert sorted(p.name for p in root.iterdir()) == [
        "val", "val.txt", "val_ood", "val_ood.txt", "valannot", "valannot_ood"]  # no temporary


def test_paste_leaves_no_temporary_folder_when_the_second_cannot_be_made(root, capsys,
                                                                          monkeypatch):
    real_temp_folder, made = paste.temp_folder, []

    def second_fails(target):
        if made:
            raise OSError(errno.ENOSPC, ENOSPC)
        made.append(real_temp_folder(target))
        return made[-1]

    monkeypatch.setattr(paste, "temp_folder", second_fails)
    code, _ = run_paste(capsys, "--root", root, "--split", "val")
    assert code == 1 and made and not made[0].exists()
    assert sorted(p.name for p in root.iterdir()) == ["val", "val.txt", "valannot"]


def test_paste_on_a_full_disk_names_the_file_and_keeps_the_previous_output(root, capsys,
                                                                          monkeypatch):
    assert run_paste(capsys, "--root", root, "--split", "val") == (0, "")
    before = ood_files(root)
    real_save, calls = Image.Image.save, []

    def full_at_second_file(self, fp, *args, **kwargs):
        calls.append(fp)
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, ENOSPC)
        return real_save(self, fp, *args, **kwargs)

    monkeypatch.setattr(Image.Image, "save", full_at_second_file)
    code, line = run_paste(capsys, "--root", root, "--split", "val", "--seed", "3", "--overwrite")
    assert code == 1 and line == (
        f"python -m obsnet.paste: error: --out {root}: valannot_ood/{NAMES[0]} cannot be written "
        f"({ENOSPC}); the previous output is unchanged"), line
    assert ood_files(root) == before
    assert not [p for p in root.iterdir() if p.name.startswith(".")]


def test_paste_removes_the_temporary_folders_of_a_killed_run(root, capsys):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = root / f".val_ood.{dead.pid}.0123abcd.tmp"
    stale.mkdir()
    (stale / NAMES[0]).write_bytes(b"half a run")
    foreign = root / ".val_ood.mine.tmp"
    foreign.mkdir()
    assert run_paste(capsys, "--root", root, "--split", "val") == (0, "")
    assert not stale.exists() and foreign.is_dir()


def test_paste_out_a_file_is_one_line(root, tmp_path):
    afile = tmp_path / "afile"
    afile.write_text("mine")
    run = runner.python("-m", "obsnet.paste", "--root", str(root), "--split", "val",
                     "--out", str(afile))
    assert run.returncode == 1, run.stderr
    assert one_line(run.stderr) == (f"python -m obsnet.paste: error: --out {afile}: cannot be "
                                    f"written (it is a file; a folder is needed)")
    assert afile.read_text() == "mine"
