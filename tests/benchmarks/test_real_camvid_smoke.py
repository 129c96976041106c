"""The paper-scale path at smoke scale (CI): a CamVid-like tree packed by the packer, then
``benchmarks.real_camvid --scale smoke`` end to end (plan measured and printed, frames kept in
memory, val_ood_real from real-object cut-outs); the plan's arithmetic; the packer's refusals."""
import json

import numpy as np
import pytest
import torch
from PIL import Image

from benchmarks import pack_camvid, paper_scale, real_camvid
from obsnet.data.synthetic import generate
from tests.helpers.runner import SubprocessModule


def _cutouts(folder, count: int = 2):
    """``count`` RGBA cut-outs: a filled disc in an opaque colour, transparent around it."""
    folder.mkdir(parents=True)
    yy, xx = np.mgrid[:24, :24]
    disc = ((yy - 12) ** 2 + (xx - 12) ** 2 < 100).astype(np.uint8) * 255
    for i in range(count):
        rgba = np.zeros((24, 24, 4), np.uint8)
        rgba[..., i % 3], rgba[..., 3] = 255, disc
        Image.fromarray(rgba, "RGBA").save(folder / f"{i:03d}_disc.png")
    (folder / "README.md").write_text("generated discs, public domain\n")
    return folder


def _pack(tmp_path, objects=True):
    """A generated CamVid tree (ids 0..10 and void 11) packed as JPEG + PNG; the pack's root."""
    camvid = generate(tmp_path / "camvid", seed=0, n_train=8, n_val=4, n_test=2, size=(36, 48))
    argv = ["--camvid", str(camvid), "--out", str(tmp_path / "pack" / "camvid")]
    if objects:
        argv += ["--objects", str(_cutouts(tmp_path / "discs"))]
    assert pack_camvid.main(argv) == 0
    return tmp_path / "pack"


def test_packer_writes_camvid_layout_jpegs_and_the_objects(tmp_path):
    pack = _pack(tmp_path)
    lines = (pack / "camvid" / "train.txt").read_text().split("\n")
    image, label = lines[0].split()
    assert image.startswith("train/") and image.endswith(".jpg") and label.endswith(".png")
    assert len([line for line in lines if line]) == 8
    with Image.open(pack / "camvid" / image) as img:
        assert img.format == "JPEG" and img.size == (48, 36)
    source = tmp_path / "camvid" / "trainannot" / (label.split("/")[1])
    assert (pack / "camvid" / label).read_bytes() == source.read_bytes()  # labels as they were
    assert sorted(p.name for p in (pack / "objects").iterdir()) == [
        ".written_by_pack_camvid", "000_disc.png", "001_disc.png", "README.md"]
    from obsnet.data.camvid import CamVid  # the loader reads the JPEGs
    assert CamVid(pack / "camvid", "val")[0][0].shape == (3, 36, 48)


def test_packer_refuses_what_it_did_not_write_and_an_oversized_pack(tmp_path, capsys):
    camvid = generate(tmp_path / "camvid", seed=0, n_train=2, n_val=1, n_test=1, size=(36, 48))
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("a user's file")
    argv = ["--camvid", str(camvid), "--out", str(out)]
    assert pack_camvid.main(argv) == 2
    assert "has no .written_by_pack_camvid listing" in capsys.readouterr().err
    assert (out / "notes.txt").read_text() == "a user's file"
    packed = tmp_path / "pack"
    assert pack_camvid.main(["--camvid", str(camvid), "--out", str(packed)]) == 0
    assert pack_camvid.main(["--camvid", str(camvid), "--out", str(packed)]) == 2
    assert "--overwrite replaces it" in capsys.readouterr().err
    (packed / "val" / "extra.png").write_bytes(b"x")
    assert pack_camvid.main(["--camvid", str(camvid), "--out", str(packed), "--overwrite"]) == 2
    assert "val/extra.png was not written by pack_camvid" in capsys.readouterr().err
    (packed / "val" / "extra.png").unlink()
    before = sorted(p.name for p in tmp_path.iterdir())
    assert pack_camvid.main(["--camvid", str(camvid), "--out", str(packed), "--overwrite",
                             "--limit_mib", "0.001"]) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]  # after the progress bars
    assert last.startswith("pack_camvid: error: --out ") and "over --limit_mib 0.001; lower " \
        "--quality (now 95); nothing was written" in last
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # no temporary folder left
    assert pack_camvid.main(["--camvid", str(camvid), "--out", str(packed), "--overwrite"]) == 0


@pytest.mark.slow
def test_smoke_scale_runs_the_paper_path_end_to_end(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(real_camvid, "subprocess", SubprocessModule)  # each stage: a fresh process
    pack = _pack(tmp_path, objects=True)
    out = tmp_path / "run"
    argv = ["--camvid", str(pack / "camvid"), "--scale", "smoke", "--out", str(out),
            "--objects", str(pack / "objects")]
    assert real_camvid.main(argv) == 0
    printed = capsys.readouterr().out
    assert "[plan] measured on cpu" in printed and "SegNet 1 epochs, observer 1 epochs" in printed
    plan = json.loads((out / "plan.json").read_text())
    assert plan["seg_epochs"] == plan["obs_epochs"] == 1 and plan["key"]["scale"] == "smoke"
    commands = [line for line in printed.splitlines() if line.startswith("[real_camvid] ")]
    assert len(commands) == len(real_camvid.recipe(real_camvid.parse(argv)))
    for line in commands:
        if "main.py" in line:
            assert "--cache_frames" in line and "--size 32 48" in line
            assert "--amp" not in line  # bfloat16 and channels-last: paper scale on CUDA only
    assert any("--test_only" in line and "--T 2 " in line for line in commands)
    for split in ("val_ood_real", "val_ood", "val"):
        assert f"split {split} " in printed
        results = json.loads((out / "logs" / split / f"results_{split}.json").read_text())
        assert set(results["methods"]) == set(real_camvid.METHODS.split(","))
    assert "ood" in json.loads((out / "logs" / "val_ood_real" / "results_val_ood_real.json")
                               .read_text())["methods"]["obsnet"]
    # a second call reuses the plan and skips every stage
    assert real_camvid.main(argv) == 0
    printed = capsys.readouterr().out
    assert "planned by an earlier run" in printed and "[plan] measured" not in printed


# --------------------------------------------------------------------------- the plan

TP = paper_scale.Throughput(seg_train=0.02, seg_eval=0.004, obs_train=0.03, obs_eval=0.002)
SPLITS = paper_scale.Splits(367, 101, ("val_ood_real", "val_ood", "val"), ("val_ood", "val_ood_real"))


def test_plan_fills_the_budget_and_no_more():
    budget = 8 * 60
    plan = paper_scale.plan(TP, SPLITS, 50, budget)
    seg_epoch, obs_epoch = paper_scale.epoch_seconds(TP, SPLITS)
    assert seg_epoch == pytest.approx(367 * 0.02 + 101 * 0.004)
    assert plan.seconds["test val"] == pytest.approx(
        paper_scale.STAGE_OVERHEAD_S + 101 * (0.004 * 51 + 0.002))
    assert plan.seg_epochs >= 1 and plan.obs_epochs >= 1 and plan.total_s <= budget
    assert plan.total_s + obs_epoch > budget  # one more observer epoch would not fit
    assert set(plan.seconds) == {"train SegNet", "train ObsNet", "paste val_ood",
                                 "paste val_ood_real", "test val_ood_real", "test val_ood", "test val"}
    training = plan.seconds["train SegNet"] + plan.seconds["train ObsNet"]
    assert plan.seconds["train SegNet"] - paper_scale.STAGE_OVERHEAD_S == pytest.approx(
        plan.seg_epochs * seg_epoch)
    assert plan.seconds["train SegNet"] > 0.6 * training  # the SegNet gets the larger share


def test_plan_keeps_given_epochs_and_says_zero_when_nothing_fits():
    plan = paper_scale.plan(TP, SPLITS, 50, 8 * 60, seg_epochs=3)
    assert plan.seg_epochs == 3 and plan.obs_epochs > 3  # the rest goes to the observer
    plan = paper_scale.plan(TP, SPLITS, 50, 8 * 60, obs_epochs=2)
    assert plan.obs_epochs == 2 and plan.total_s <= 8 * 60
    slow = paper_scale.Throughput(seg_train=2.0, seg_eval=0.5, obs_train=3.0, obs_eval=0.3)
    assert paper_scale.plan(slow, SPLITS, 50, 8 * 60).seg_epochs == 0
    plan = paper_scale.plan(slow, SPLITS, 50, 8 * 60, seg_epochs=1, obs_epochs=1)
    assert plan.total_s > 8 * 60  # kept as given, over the budget (the recipe warns)


def test_paper_scale_on_a_slow_device_refuses_in_one_line(tmp_path, monkeypatch):
    camvid = generate(tmp_path / "camvid", seed=0, n_train=4, n_val=2, n_test=1, size=(36, 48))
    slow = paper_scale.Throughput(seg_train=60.0, seg_eval=5.0, obs_train=90.0, obs_eval=3.0)
    monkeypatch.setattr(paper_scale, "measure", lambda setting, device: slow)
    monkeypatch.setattr(real_camvid, "run_stages", lambda *a: pytest.fail("a stage started"))
    with pytest.raises(SystemExit, match="one SegNet epoch and one observer epoch do not fit "
                                         "--budget_min 8"):
        real_camvid.main(["--camvid", str(camvid), "--scale", "paper", "--out", str(tmp_path / "r")])
    assert not (tmp_path / "r" / "logs").exists()  # no stage ran


def test_a_flag_given_wins_over_its_scale(monkeypatch):
    args = real_camvid.parse(["--camvid", "x", "--scale", "smoke", "--seg_epochs", "3", "--T", "4"])
    assert (args.seg_epochs, args.T, args.size, args.obs_epochs) == (3, 4, [32, 48], 1)
    args = real_camvid.parse(["--camvid", "x", "--scale", "paper", "--no-cache_frames"])
    assert args.size == [360, 480] and args.width_mult == 1.0 and args.T == 50
    assert args.seg_epochs is None and not args.cache_frames
    assert real_camvid.parse(["--camvid", "x"]).size == [180, 240]  # cpu: today's run
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    args = real_camvid.parse(["--camvid", "x", "--scale", "paper"])
    assert real_camvid.speed_args(args) == ["--cache_frames", *real_camvid.GPU_SPEEDUPS]
    assert real_camvid.speed_args(real_camvid.parse(["--camvid", "x"])) == []


def test_observer_flags_and_objects_reach_their_stages(tmp_path):
    args = real_camvid.parse(["--camvid", "x", "--out", str(tmp_path), "--objects", "objs",
                              "--obs_inputs", "logits", "--obs_kind", "layer"])
    stages = {name: cmd for name, cmd, _ in real_camvid.recipe(args)}
    observer = stages["train ObsNet"]
    assert observer[observer.index("--obs_inputs") + 1] == "logits"
    assert observer[observer.index("--obs_kind") + 1] == "layer"
    assert list(stages)[:2] == ["paste val_ood", "paste val_ood_real"]
    paste_real = stages["paste val_ood_real"]
    assert paste_real[paste_real.index("--suffix") + 1] == "ood_real"
    assert paste_real[paste_real.index("--objects") + 1] == "objs"
    assert [n for n in stages if n.startswith("test")] == [
        "test val_ood_real", "test val_ood", "test val"]
    plain = real_camvid.parse(["--camvid", "x", "--out", str(tmp_path)])
    stages = {name: cmd for name, cmd, _ in real_camvid.recipe(plain)}
    observer = stages["train ObsNet"]
    assert "paste val_ood_real" not in stages and "--obs_kind" not in observer  # main.py's
    assert observer[observer.index("--obs_inputs") + 1] == "maps"  # the recipe's default
    assert observer[observer.index("--adv") + 1] == "paste+min_random_patch"
