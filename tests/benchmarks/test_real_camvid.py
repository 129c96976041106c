"""The real-data recipe's plumbing, end to end on a tiny CamVid-layout folder (the real run is
benchmarks/real_camvid.py on ../shared/data/camvid, far too long for CI)."""
import json
import subprocess

import pytest

from benchmarks import real_camvid
from benchmarks import real_camvid_ablations as ablations
from obsnet.data.synthetic import generate
from tests.helpers import ROOT
from tests.helpers.runner import SubprocessModule

TINY = ["--size", "32", "48", "--width_mult", "0.0625", "--seg_epochs", "1", "--obs_epochs", "1",
        "--T", "2", "--workers", "0"]


@pytest.mark.slow
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

def _entry(ood, ood_fpr, err, err_fpr, ms=40.0):
    return {"ood": {"auroc": ood, "fpr95": ood_fpr}, "error": {"auroc": err, "fpr95": err_fpr},
            "ms_per_image": ms}


def _recipe_args(tmp_path, *extra):
    return real_camvid.build_parser().parse_args(["--camvid", "x", "--out", str(tmp_path), *extra])


def test_ablation_commands_change_only_the_variants_observer(tmp_path):
    args = _recipe_args(tmp_path)
    base = ablations.recipe_variant(args)
    assert base == ablations.Variant("maps", "mirror", "paste+min_random_patch", args.obs_epochs)
    variant = ablations.Variant("maps", "layer", "paste+min_random_patch", 3)
    train, tests = ablations.variant_commands(args, variant)
    for flag, value in (("--obs_inputs", "maps"), ("--obs_kind", "layer"),
                        ("--adv", "paste+min_random_patch"), ("--epoch", "3"),
                        ("--epsilon", str(args.epsilon)), ("--obs_head", args.obs_head)):
        assert train[train.index(flag) + 1] == value, flag
    folder = tmp_path / "ablations" / "maps-layer-paste+min_random_patch-3ep"
    assert train[train.index("--obsnet_file") + 1] == str(folder / "ckpt" / "obsnet")
    assert [t[t.index("--test_split") + 1] for t in tests] == ["val_ood_real", "val_ood"]
    assert all(t[t.index("--test_multi") + 1] == "obsnet" for t in tests)
    assert ablations.variant_results(args, variant, "val_ood") == \
        folder / "logs" / "val_ood" / "results_val_ood.json"
    # the recipe's own observer is the recipe's folders: never trained again
    assert ablations.variant_folder(args, base) == tmp_path
    ablations.run_variant(args, base, tmp_path / "log")
    assert not (tmp_path / "ablations").exists() and not (tmp_path / "log").exists()


def test_groups_change_one_thing_of_the_recipes_observer(tmp_path):
    args = _recipe_args(tmp_path, "--obs_inputs", "maps", "--adv", "paste")
    base = ablations.recipe_variant(args)
    for name, variants in ablations.groups(args).items():
        if name == "previous":
            assert variants == [ablations.Variant("features", "mirror", "min_random_patch",
                                                  args.obs_epochs)]
            continue
        assert base in variants, name
        for variant in variants:
            assert sum(a != b for a, b in zip(variant, base)) <= 1, variant
    picked = ablations.chosen_variants(args, ["kind", base.name, "inputs"])
    assert picked[:2] == [base, base._replace(kind="layer")]
    assert [v.inputs for v in picked[2:]] == ["features", "logits"]
    with pytest.raises(SystemExit, match="--only bogus: not a group"):
        ablations.chosen_variants(args, ["bogus"])


def test_a_variant_wins_only_ahead_of_every_rival_with_both_fpr95_below_100():
    rivals = [_entry(0.70, 0.8, 0.78, 0.8), _entry(0.75, 0.7, 0.77, 0.8)]
    assert ablations.wins(_entry(0.76, 0.6, 0.80, 0.7), rivals)
    assert not ablations.wins(_entry(0.74, 0.6, 0.80, 0.7), rivals)  # behind on OOD AUROC
    assert not ablations.wins(_entry(0.76, 0.6, 0.75, 0.7), rivals)  # behind on error AUROC
    assert not ablations.wins(_entry(0.76, 0.6, 0.80, 1.0), rivals)  # error FPR95 = 100%
    assert not ablations.wins(_entry(0.76, 1.0, 0.80, 0.7), rivals)  # OOD FPR95 = 100%


def test_table_collects_every_variant_with_results_its_cost_and_verdict(tmp_path):
    args = _recipe_args(tmp_path)
    variant = ablations.Variant("maps", "mirror", "min_random_patch", args.obs_epochs)
    for split, entry in (("val_ood_real", _entry(0.80, 0.5, 0.90, 0.4, ms=55.0)),
                         ("val_ood", _entry(0.70, 0.6, 0.85, 0.5))):
        path = ablations.variant_results(args, variant, split)
        path.parent.mkdir(parents=True)
        path.write_text(json.dumps({"methods": {"obsnet": entry}}))
    (ablations.variant_folder(args, variant) / "seconds.json").write_text('{"seconds": 600}')
    found = ablations.collect(args)
    assert list(found) == [variant] and found[variant]["seconds"] == 600
    baselines = {m: {"val_ood_real": _entry(0.75, 0.7, 0.85, 0.6), "val_ood": None}
                 for m in ablations.RIVALS}
    cost = {"gflops": 1.234, "segnet_gflops": 5.0, "params": 2_000_000}
    text = ablations.table(baselines, found, lambda v: cost)
    assert ("| observer | maps | mirror | min_random_patch | 10 | 80.0 | 50.0 | 90.0 | 40.0 | "
            "70.0 | 85.0 | 55 | 1.23 | 2.00M | yes | 10 |") in text
    assert "| mcp | | | | | 75.0 | 70.0 | 85.0 | 60.0 | n/a | n/a | 40 | 5.00 (SegNet) |" in text
    assert "| 5.00 x T (SegNet) |" in text  # MC dropout: one SegNet pass per sample
    baselines["energy"]["val_ood_real"] = _entry(0.81, 0.7, 0.85, 0.6)  # ahead on OOD AUROC
    assert "| 2.00M | no |" in ablations.table(baselines, found, lambda v: cost)


def test_gflops_of_a_convolution_by_hand():
    import torch
    conv = torch.nn.Conv2d(3, 4, 3, padding=1, bias=False)
    # 2 FLOPs (multiply, add) per weight per output pixel: 2 * 3 * 4 * 3 * 3 * 8 * 8
    assert ablations.gflops(conv, torch.zeros(1, 3, 8, 8)) * 1e9 == 2 * 3 * 4 * 9 * 64


def test_costs_count_the_observer_apart_from_the_segnet():
    mirror = ablations.costs(0.0625, ablations.Variant("maps", "mirror", "none", 1))
    layer = ablations.costs(0.0625, ablations.Variant("maps", "layer", "none", 1))
    assert mirror["segnet_gflops"] == layer["segnet_gflops"] > 0
    assert 0 < layer["gflops"] < mirror["gflops"] and layer["params"] < mirror["params"]


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
    variant = ablations.recipe_variant(args)._replace(adv="none")
    train, _ = ablations.variant_commands(args, variant)
    assert "--overwrite" in train  # its own folder holds no last.pth


def test_segnet_class_weights_option_reaches_its_stage(tmp_path):
    parse = real_camvid.build_parser().parse_args
    for given, expected in (([], "sqrt_median_freq"), (["--seg_class_weights", "none"], "none"),
                            (["--seg_class_weights", "median_freq"], "median_freq")):
        stages = real_camvid.recipe(parse(["--camvid", "x", "--out", str(tmp_path), *given]))
        command = dict((name, cmd) for name, cmd, _ in stages)["train SegNet"]
        assert command[command.index("--class_weights") + 1] == expected
