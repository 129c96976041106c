"""Issue 25's smaller faults: a new Synthetic folder that holds the run's own outputs, observer
ablations that leave nothing to see, the package's faces with no argument (an explicit demo),
``--version``."""
import pytest
import torch

from obsnet import __version__, cli, run_checks
from obsnet.data.synthetic import OWNER, generate
from tests.helpers.nets import segnet_file
from tests.helpers.runner import TINY_SERIAL as TINY


def call(capsys, *argv, prog="main.py") -> tuple[int, str, str]:
    """``obsnet.cli.main(ARGV)`` in this process: (exit code, stdout, the last line of stderr)."""
    capsys.readouterr()
    code = cli.main([str(a) for a in argv], prog=prog)
    torch.use_deterministic_algorithms(False)  # a seeded run sets it for this process
    out = capsys.readouterr()
    err = out.err.strip().splitlines()
    return code, out.out, (err[-1] if err else "")


def test_a_new_synthetic_folder_may_hold_the_runs_own_outputs(tmp_path, monkeypatch, capsys):
    """--dset_folder new, with --segnet_file and --tboard inside it: the outputs' folders are
    created before the data is generated, and must not make the folder look foreign."""
    monkeypatch.setattr(run_checks, "ensure_synthetic", lambda root, seed: generate(
        root, seed, n_train=8, n_val=2, n_test=2, size=(32, 48)))
    new = tmp_path / "new"
    code, _, last = call(capsys, *TINY, "--dset_folder", new, "--segnet_file",
                         new / "ckpt" / "segnet.pth", "--tboard", new / "logs", "--train_segnet",
                         "--epoch", "1")
    assert code == 0, last
    assert (new / OWNER).is_file() and (new / "train.txt").is_file()
    assert (new / "ckpt" / "segnet.pth").is_file()


def test_a_foreign_synthetic_folder_is_still_refused_and_left_alone(tmp_path, capsys):
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "notes.txt").write_text("a user's file")
    code, _, last = call(capsys, *TINY, "--dset_folder", folder, "--segnet_file",
                         tmp_path / "segnet.pth", "--tboard", tmp_path / "logs", "--train_segnet",
                         "--epoch", "1")
    assert code == 2 and last.startswith(f"main.py: error: --dset_folder {folder}: it holds files "
                                         f"the synthetic generator did not write (notes.txt)")
    assert sorted(p.name for p in folder.iterdir()) == ["notes.txt"]


@pytest.mark.parametrize("flags, line", [
    (["--no_img", "--no_residual"], "--no_img with --no_residual: the observer would see neither "
                                    "the image nor the segmenter's maps; give one of them"),
    (["--obs_mlp", "--no_img"], "--obs_mlp with --no_img: the light observer reads the SegNet's "
                                "up4 map alone, so --no_img cannot apply to it; leave one of them out"),
    (["--obs_mlp", "--no_residual"], "--obs_mlp with --no_residual: the light observer reads the "
                                     "SegNet's up4 map alone, so --no_residual cannot apply to it; "
                                     "leave one of them out"),
])
def test_observer_ablations_that_see_nothing_are_refused(tmp_path, capsys, flags, line):
    segnet_file(tmp_path / "segnet.pth")
    code, _, last = call(capsys, *TINY, "--dset_folder", tmp_path / "data", "--segnet_file",
                         tmp_path / "segnet.pth", "--obsnet_file", tmp_path / "obs", "--tboard",
                         tmp_path / "logs", *flags)
    assert (code, last) == (2, f"main.py: error: {line}")
    assert not (tmp_path / "obs").exists() and not (tmp_path / "data").exists()


@pytest.mark.parametrize("prog", ["obsnet", "python -m obsnet"])
def test_the_package_faces_never_start_the_demo_unasked(tmp_path, monkeypatch, capsys, prog):
    monkeypatch.chdir(tmp_path)
    command = "obsnet" if prog == "obsnet" else "python -m obsnet"
    code, _, last = call(capsys, prog=prog)
    assert (code, last) == (2, f"{prog}: error: no flags given: '{command} demo' runs the demo (it "
                               f"writes data/, ckpt/ and logs/ in the current folder); '{command} "
                               f"--help' lists the flags")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("prog, argv, command", [("obsnet", ["demo"], "obsnet"),
                                                 ("main.py", [], "python main.py"),
                                                 ("main.py", ["demo"], "python main.py")])
def test_the_demo_is_asked_for_by_name_and_printed_as_typed(monkeypatch, capsys, prog, argv,
                                                            command):
    ran = []
    monkeypatch.setattr(cli, "run", lambda stage_argv, stage_prog: ran.append(stage_argv))
    monkeypatch.setattr(cli, "DEMO_STAGES", [["--test_only"]])
    code, out, _ = call(capsys, *argv, prog=prog)
    assert code == 0 and ran == [cli.DEMO_COMMON + ["--test_only"]]
    assert out.splitlines() == [f"[demo] {command} " + " ".join(cli.DEMO_COMMON + ["--test_only"])]


def test_version(capsys):
    with pytest.raises(SystemExit) as stop:
        cli.main(["--version"], prog="obsnet")
    assert stop.value.code == 0
    assert capsys.readouterr().out.strip() == f"obsnet {__version__}"


def test_the_version_is_the_projects(request):
    pyproject = (request.config.rootpath / "pyproject.toml").read_text()
    assert f'\nversion = "{__version__}"\n' in pyproject
