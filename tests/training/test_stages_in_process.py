"""The stages run from Python with a frozen run config (``obsnet.config``), no subprocess: the
command line's config is the one a user builds by hand, and a test run in-process writes what
main.py writes."""
import dataclasses
import json

import pytest

from obsnet import cli
from obsnet.config import (DataConfig, ModelConfig, OptimConfig, PathsConfig, RunConfig,
                           TestConfig)
from obsnet.data.specs import SPECS
from obsnet.stages import run_stage
from obsnet.utils import seed_everything
from tests.helpers.runner import main_py

SPEC = SPECS["Synthetic"]


def resolved(argv, namespace=None):
    """The run config main.py builds from ``argv``, and its spec (``namespace``: a dict that
    receives the resolved flags)."""
    args = cli.build_parser().parse_args(argv)
    cfg_spec = cli.resolve_config(args, frozenset())
    if namespace is not None:
        namespace.update(vars(args))
    return cfg_spec


def by_hand(root, stage: str, **test) -> RunConfig:
    """The run config of a tiny Synthetic run in ``root`` (``small_data``), built without
    the command line."""
    return RunConfig(
        stage=stage, seed=0,
        data=DataConfig(name="Synthetic", folder=str(root / "data"), size=(32, 48), bsize=4),
        model=ModelConfig(nclass=SPEC.nclass, width_mult=0.0625),
        optim=OptimConfig(epoch=1, lr=0.01),
        paths=PathsConfig(segnet_file=str(root / "segnet.pth"), obsnet_file=str(root / "obs"),
                          tboard=str(root / "logs")),
        test=TestConfig(**({"split": SPEC.test_split} | test)))


def argv_of(root, *extra):
    return ["--data", "Synthetic", "--dset_folder", str(root / "data"), "--size", "32", "48",
            "--width_mult", "0.0625", "--bsize", "4", "--seed", "0", "--epoch", "1", "--lr",
            "0.01", "--segnet_file", str(root / "segnet.pth"), "--obsnet_file", str(root / "obs"),
            "--tboard", str(root / "logs"), *extra]


def test_command_line_config_is_frozen_typed_and_equals_the_hand_built_one(small_data):
    flags = {}
    cfg, spec = resolved(argv_of(small_data), flags)
    assert spec is SPEC and cfg == by_hand(small_data, "train_obsnet")
    # every resolved flag is in the config, and comes back as it was (--debug aside)
    flags.pop("debug")
    assert cfg.as_flags() == {k: list(v) if isinstance(v, tuple) else v for k, v in flags.items()}
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.optim.lr = 1.0  # nothing below the command line changes its config
    test, _ = resolved(argv_of(small_data, "--test_only", "--test_multi", "obsnet,mcp,mcp",
                               "--ensemble", "a.pth, ,b.pth"))
    assert test.stage == "test" and test.test.methods == ("obsnet", "mcp")  # parsed once, here
    assert test.paths.ensemble == ("a.pth", "b.pth") and test.data.size == (32, 48)
    assert test.paths.stats_file == small_data / "segnet.stats.pth"
    stats, _ = resolved(argv_of(small_data, "--fit_stats"))
    assert stats.stage == "fit_stats" and not stats.training
    with pytest.raises(ValueError, match="RunConfig.stage 'train'"):
        RunConfig(stage="train")


def test_stages_run_in_process_as_main_py_runs_them(small_data, tmp_path):
    """Train an observer and test it from Python; main.py --test_only on the same checkpoint
    writes the same results."""
    seed_everything(0)
    run_stage(by_hand(small_data, "train_obsnet"), SPEC)
    assert (small_data / "obs" / "best.pth").is_file()
    recorded = json.loads((small_data / "logs" / "config_train_obsnet.json").read_text())
    assert recorded == by_hand(small_data, "train_obsnet").as_flags()
    run_stage(by_hand(small_data, "test", methods=("obsnet", "mcp")), SPEC)
    ours = json.loads((small_data / "logs" / f"results_{SPEC.test_split}.json").read_text())
    cli_logs = tmp_path / "cli_logs"
    done = main_py(*argv_of(small_data)[:-2], "--tboard", str(cli_logs), "--test_only",
                   "--test_multi", "obsnet,mcp")
    assert done.returncode == 0, done.stderr
    theirs = json.loads((cli_logs / f"results_{SPEC.test_split}.json").read_text())
    for name in ("obsnet", "mcp"):
        assert ours["methods"][name]["error"] == theirs["methods"][name]["error"]
    assert ours["segnet"] == theirs["segnet"]
