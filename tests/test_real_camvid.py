"""The real-data recipe's plumbing, end to end on a tiny CamVid-layout folder (the real run is
benchmarks/real_camvid.py on ../shared/data/camvid, far too long for CI)."""
import json
import subprocess

import pytest

from benchmarks import real_camvid
from benchmarks import real_camvid_ablations as ablations
from cli import ROOT, SubprocessModule
from obsnet.data.synthetic import generate

TINY = ["--size", "32", "48", "--width_mult", "0.0625", "--seg_epochs", "1", "--obs_epochs", "1",
        "--T", "2", "--workers", "0"]


def test_recipe_runs_links_and_resumes(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(real_camvid, "subprocess", SubprocessModule)  # each stage: a fresh process
    camvid = generate(tmp_path / "camvid", seed=0, n_train=8, n_val=4, n_test=2)
    listing = sorted(p.name for p in camvid.iterdir())
    out = tmp_path / "run"
    assert real_camvid.main(["--camvid", str(camvid), "--out", str(out), *TINY]) == 0
    printed = capsys.readouterr().out
    assert "split val_ood" in printed and "split val " in printed and "obsnet" in printed
    results = json.loads((out / "logs" / "val_ood" / "results_val_ood.json").read_text())
    assert set(results["methods"]) == set(real_camvid.METHODS.split(","))
    assert "ood" in results["methods"]["obsnet"]  # val_ood has pasted anomalies
    assert "ood" not in json.loads((out / "logs" / "val" / "results_val.json").read_text())["methods"]["mcp"]
    assert (out / "data" / "train").is_symlink()
    header = (out / "recipe.log").read_text().splitlines()[0]  # which code wrote these files
    git = subprocess.run(["git", "describe", "--always", "--dirty"], cwd=ROOT, capture_output=True,
                         text=True)
    expected = git.stdout.strip() if git.returncode == 0 else "unknown (not a git checkout)"
    assert f" code {expected}: " in header, header
    assert sorted(p.name for p in camvid.iterdir()) == listing  # the source is only read
    # a second call finds every output and runs nothing
    assert real_camvid.main(["--camvid", str(camvid), "--out", str(out), *TINY]) == 0
    assert capsys.readouterr().out.count("exists, skipped") == len(real_camvid.recipe(
        real_camvid.build_parser().parse_args(["--camvid", str(camvid), "--out", str(out)])))


def test_missing_camvid_entries_are_one_line(tmp_path):
    (tmp_path / "camvid").mkdir()
    with pytest.raises(SystemExit, match="missing train, trainannot"):
        real_camvid.main(["--camvid", str(tmp_path / "camvid"), "--out", str(tmp_path / "run")])


# --------------------------------------------------------------------------- ablations

def _entry(ood, ood_fpr, err, err_fpr):
    return {"ood": {"auroc": ood, "fpr95": ood_fpr}, "error": {"auroc": err, "fpr95": err_fpr}}


def test_ablation_commands_change_only_their_flag(tmp_path):
    args = real_camvid.build_parser().parse_args(["--camvid", "x", "--out", str(tmp_path)])
    for change, flag, value in (({"adv": "none"}, "--adv", "none"),
                                ({"epsilon": 0.05}, "--epsilon", "0.05"),
                                ({"obs_head": "original"}, "--obs_head", "original"),
                                ({"obs_epochs_factor": 2}, "--epoch", str(2 * args.obs_epochs))):
        train, test, results = ablations.variant_commands(args, change)
        assert train[train.index(flag) + 1] == value
        assert "--test_split" in test and test[test.index("--test_split") + 1] == "val_ood"
        assert results.parent.parent.name == ablations.variant_name(change)
    train, _, _ = ablations.variant_commands(args, {"no_pretrained": True})
    assert "--no_pretrained" in train
    assert "--no_pretrained" not in ablations.variant_commands(args, {"adv": "none"})[0]


def test_a_variant_wins_only_ahead_of_every_rival_with_both_fpr95_below_100():
    rivals = [_entry(0.70, 0.8, 0.78, 0.8), _entry(0.75, 0.7, 0.77, 0.8)]
    assert ablations.wins(_entry(0.76, 0.6, 0.80, 0.7), rivals)
    assert not ablations.wins(_entry(0.74, 0.6, 0.80, 0.7), rivals)  # behind on OOD AUROC
    assert not ablations.wins(_entry(0.76, 0.6, 0.80, 1.0), rivals)  # error FPR95 = 100%
    text = ablations.table({"mcp": rivals[0]}, {"adv-none": {"entry": rivals[1], "seconds": 120}})
    assert "| mcp (recipe) | 70.0 | 80.0 | 78.0 | 80.0 |" in text and "| adv-none |" in text


def test_variants_equal_to_the_recipe_are_not_trained_and_only_picks_single_variants(tmp_path):
    args = real_camvid.build_parser().parse_args(["--camvid", "x", "--out", str(tmp_path)])
    assert ablations.same_as_recipe(args, {"adv": "min_random_patch"})
    assert ablations.same_as_recipe(args, {"epsilon": 0.025})
    assert not ablations.same_as_recipe(args, {"epsilon": 0.05})
    assert not ablations.same_as_recipe(args, {"no_pretrained": True})
    ablations.run_variant(args, {"epsilon": 0.025}, tmp_path / "log")  # nothing to run
    assert not (tmp_path / "ablations").exists()
    picked = ablations.chosen_changes(["adv-none", "epsilon", "epsilon-0.1"])
    assert [ablations.variant_name(c) for c in picked] == [
        "adv-none", "epsilon-0.01", "epsilon-0.025", "epsilon-0.05", "epsilon-0.1"]


def test_table_collects_every_variant_with_results_and_its_time(tmp_path):
    args = real_camvid.build_parser().parse_args(["--camvid", "x", "--out", str(tmp_path)])
    recipe, none = _entry(0.60, 0.7, 0.85, 0.6), _entry(0.55, 0.7, 0.84, 0.6)
    folder = ablations.variant_folder(args, {"adv": "none"})
    (folder / "val_ood").mkdir(parents=True)
    (folder / "val_ood" / "results_val_ood.json").write_text(json.dumps({"methods": {"obsnet": none}}))
    (folder / "seconds.json").write_text(json.dumps({"seconds": 600}))
    variants = ablations.collect(args, recipe)
    assert list(variants) == ["adv-none", "adv-min_random_patch (= recipe)",
                              "epsilon-0.025 (= recipe)"]
    assert variants["adv-none"]["seconds"] == 600
    mcp = _entry(0.5, 0.8, 0.8, 0.7)
    text = ablations.table({"obsnet": recipe, "mcp": mcp, "mc_dropout": mcp}, variants)
    # the recipe's observer beats MCP, MC dropout and adv none: it wins though it is "obsnet"
    assert "| adv-min_random_patch (= recipe) | 60.0 | 70.0 | 85.0 | 60.0 | yes |  |" in text
    assert "| adv-none | 55.0 | 70.0 | 84.0 | 60.0 | (no attack) | 10 |" in text


def test_an_interrupted_training_stage_is_resumed(tmp_path):
    """A training stage is done when its last.pth holds its last epoch; an interrupted one
    runs again with --resume, one that left no last.pth with --overwrite (main.py refuses to
    replace checkpoints without one of them)."""
    import torch
    args = real_camvid.build_parser().parse_args(["--camvid", "x", "--out", str(tmp_path)])
    stages = {name: (cmd, out) for name, cmd, out in real_camvid.recipe(args)}
    command, last = stages["train ObsNet"]
    assert last.name == "last.pth" and "--overwrite" in command and "--resume" not in command
    last.parent.mkdir(parents=True)
    torch.save({"epoch": 3, "args": {"epoch": args.obs_epochs}}, last)  # stopped after epoch 3
    assert not real_camvid.finished(last)
    command = {name: cmd for name, cmd, _ in real_camvid.recipe(args)}["train ObsNet"]
    assert "--resume" in command and "--overwrite" not in command
    torch.save({"epoch": args.obs_epochs - 1, "args": {"epoch": args.obs_epochs}}, last)
    assert real_camvid.finished(last)
    train, _, _ = ablations.variant_commands(args, {"adv": "none"})
    assert "--overwrite" in train  # its own folder holds no last.pth


def test_segnet_class_weights_option_reaches_its_stage(tmp_path):
    parse = real_camvid.build_parser().parse_args
    for given, expected in (([], "sqrt_median_freq"), (["--seg_class_weights", "none"], "none"),
                            (["--seg_class_weights", "median_freq"], "median_freq")):
        stages = real_camvid.recipe(parse(["--camvid", "x", "--out", str(tmp_path), *given]))
        command = dict((name, cmd) for name, cmd, _ in stages)["train SegNet"]
        assert command[command.index("--class_weights") + 1] == expected
