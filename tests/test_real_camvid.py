"""The real-data recipe's plumbing, end to end on a tiny CamVid-layout folder (the real run is
benchmarks/real_camvid.py on ../shared/data/camvid, far too long for CI)."""
import json

import pytest

from benchmarks import real_camvid
from Dataset.synthetic import generate

TINY = ["--size", "32", "48", "--width_mult", "0.0625", "--seg_epochs", "1", "--obs_epochs", "1",
        "--T", "2", "--workers", "0"]


def test_recipe_runs_links_and_resumes(tmp_path, capsys):
    camvid = generate(tmp_path / "camvid", seed=0, n_train=8, n_val=4, n_test=2)
    listing = sorted(p.name for p in camvid.iterdir())
    out = tmp_path / "run"
    assert real_camvid.main(["--camvid", str(camvid), "--out", str(out), *TINY]) == 0
    printed = capsys.readouterr().out
    assert "split val_ood" in printed and "split val " in printed and "obsnet" in printed
    results = json.loads((out / "logs" / "val_ood" / "results.json").read_text())
    assert set(results["methods"]) == set(real_camvid.METHODS.split(","))
    assert "ood" in results["methods"]["obsnet"]  # val_ood has pasted anomalies
    assert "ood" not in json.loads((out / "logs" / "val" / "results.json").read_text())["methods"]["mcp"]
    assert (out / "data" / "train").is_symlink()
    assert sorted(p.name for p in camvid.iterdir()) == listing  # the source is only read
    # a second call finds every output and runs nothing
    assert real_camvid.main(["--camvid", str(camvid), "--out", str(out), *TINY]) == 0
    assert capsys.readouterr().out.count("exists, skipped") == len(real_camvid.recipe(
        real_camvid.build_parser().parse_args(["--camvid", str(camvid), "--out", str(out)])))


def test_missing_camvid_entries_are_one_line(tmp_path):
    (tmp_path / "camvid").mkdir()
    with pytest.raises(SystemExit, match="missing train, trainannot"):
        real_camvid.main(["--camvid", str(tmp_path / "camvid"), "--out", str(tmp_path / "run")])
