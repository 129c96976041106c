"""What a test run and a score export write, and what they never replace (issue 25, items 4, 5
and 10): --export_scores DIR is locked; each stage keeps its own config and results files in
--tboard, recorded in a manifest; SIGTERM outside training is handled as Ctrl-C; a full disk
during the export's temporary writes comes after the table, in one line; empty paths and a
file given for the export folder are refused."""
import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from obsnet import cli as obsnet_cli
from obsnet import score_export
from obsnet.data.specs import SPECS
from obsnet.models.checkpoint import save_checkpoint
from obsnet.models.registry import build_segmenter
from tests.helpers.runner import ENV
from tests.helpers.runner import TINY_SERIAL as TINY, run_paths as paths
from tests.helpers import ROOT
from tests.helpers.smiyc import make_anomaly

pytest.importorskip("h5py")
MANIFEST = ".obsnet-written.json"  # obsnet.run_files.MANIFEST, spelled out: the name users see


def main_in_process(capsys, *args) -> tuple[int, str, str]:
    """``obsnet_cli.main(ARGS)`` in this process: (exit code, stdout, the last line of stderr)."""
    capsys.readouterr()
    code = obsnet_cli.main([str(a) for a in args])
    captured = capsys.readouterr()
    torch.use_deterministic_algorithms(False)  # main seeded and set it for this process
    err = captured.err.strip().splitlines()
    return code, captured.out, (err[-1] if err else "")


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    """RoadAnomaly21 folders (3 labelled frames) and a freshly initialised Cityscapes-sized
    SegNet (a plain state_dict: the benchmark's defaults apply)."""
    root = tmp_path_factory.mktemp("bench")
    make_anomaly(root / "datasets")
    torch.manual_seed(0)
    net = build_segmenter("segnet", SPECS["Cityscapes"].nclass, 0.0625)
    save_checkpoint(root / "segnet.pth", {"model": net.state_dict()})
    return root


@pytest.fixture(scope="module")
def synthetic(small_data):  # noqa: F811  (the imported fixture, by pytest)
    """Tiny synthetic data and a SegNet checkpoint (conftest's ``small_data``)."""
    return small_data


def bench_args(bench, tboard, *extra) -> list[str]:
    """A --test_only of MCP on RoadAnomaly21's validation frames."""
    return ["--data", "RoadAnomaly21", "--dset_folder", str(bench / "datasets"), "--segnet_file",
            str(bench / "segnet.pth"), "--width_mult", "0.0625", "--size", "64", "128",
            "--bsize", "2", "--seed", "0", "--tboard", str(tboard), "--test_only",
            "--test_multi", "mcp", *map(str, extra)]


@pytest.fixture
def sleeper():
    """A live process (another run, for a lock file to name)."""
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    yield proc
    proc.kill()
    proc.wait()


# --------------------------------------------------------------------------- item 4: lock DIR

def test_a_live_export_holds_its_folder(bench, tmp_path, capsys, sleeper):
    export, logs = tmp_path / "export", tmp_path / "logs"
    export.mkdir()
    (export / ".obsnet.lock").write_text(f"{sleeper.pid}\n")
    code, _, line = main_in_process(capsys, *bench_args(bench, logs, "--export_scores", export))
    assert code == 2 and line == (
        f"main.py: error: --export_scores {export}: in use by another run (PID {sleeper.pid}), "
        f"which holds {export / '.obsnet.lock'}; wait for it to end or choose another "
        f"--export_scores")
    assert sorted(os.listdir(export)) == [".obsnet.lock"]  # nothing written, the lock not ours
    assert (export / ".obsnet.lock").read_text() == f"{sleeper.pid}\n"
    assert not logs.exists()  # refused before any work


def test_an_export_releases_its_lock_and_leaves_no_temporary_folder(bench, tmp_path, capsys):
    export = tmp_path / "export"
    stale = export / ".anomaly_p.999999999.abcd1234.tmp"  # a killed run's (its PID gone)
    stale.mkdir(parents=True)
    (stale / "mcp-000000.npy").write_bytes(b"x")
    (export / ".anomaly_p.mine.tmp").mkdir()  # not of our pattern: left alone
    code, _, line = main_in_process(capsys, *bench_args(bench, tmp_path / "logs",
                                                        "--export_scores", export))
    assert code == 0, line
    assert sorted(os.listdir(export)) == [".anomaly_p.mine.tmp", "anomaly_p"]


def test_an_export_never_writes_over_an_input(bench, tmp_path, capsys):
    """Item 2 for --export_scores: a file the export would write (its mapping.txt, where the
    SegNet checkpoint was put) is refused even with --overwrite, before any work."""
    export = tmp_path / "export"
    segnet = export / "anomaly_p" / "mcp" / "AnomalyTrack-all" / "mapping.txt"
    segnet.parent.mkdir(parents=True)
    segnet.write_bytes((bench / "segnet.pth").read_bytes())
    before = segnet.read_bytes()
    args = bench_args(bench, tmp_path / "logs", "--export_scores", export, "--overwrite")
    args[args.index("--segnet_file") + 1] = str(segnet)
    code, _, line = main_in_process(capsys, *args)
    assert code == 2 and line == (
        f"main.py: error: --export_scores {export}: anomaly_p/mcp/AnomalyTrack-all/mapping.txt "
        f"there would replace --segnet_file {segnet}, an input of this run; choose another "
        f"--export_scores")
    assert segnet.read_bytes() == before and not (tmp_path / "logs").exists()


# --------------------------------------------------------------------------- item 10: paths

def test_export_into_a_file_names_the_flag(bench, tmp_path, capsys):
    afile = tmp_path / "afile"
    afile.write_text("the user's")
    code, _, line = main_in_process(capsys, *bench_args(bench, tmp_path / "logs",
                                                        "--export_scores", afile))
    assert code == 1 and line == (f"main.py: error: --export_scores {afile}: cannot be written "
                                  f"(it is a file; a folder is needed)")
    assert afile.read_text() == "the user's"


@pytest.mark.parametrize("flag", ["--export_scores", "--tboard", "--obsnet_file", "--segnet_file",
                                  "--dset_folder"])
def test_an_empty_path_is_refused(bench, tmp_path, capsys, monkeypatch, flag):
    monkeypatch.chdir(tmp_path)  # where an empty path would write
    args = bench_args(bench, tmp_path / "logs", "--export_scores", tmp_path / "export",
                      "--obsnet_file", tmp_path / "obsnet")
    args[args.index(flag) + 1] = ""
    code, _, line = main_in_process(capsys, *args)
    assert code == 2 and line == f"main.py: error: {flag} is empty: give a path (or leave the flag out)"
    assert os.listdir(tmp_path) == []  # nothing written, here or anywhere under tmp_path


# ------------------------------------------------------------------ item 10: SIGTERM

# main.py --test_only --export_scores, held inside the pass once a frame's maps are stored,
# so that the signal lands while the temporary folder exists
HELD_IN_THE_PASS = """
import sys, time
from pathlib import Path
from obsnet import score_export
from obsnet.cli import main

ready, add = Path(sys.argv[1]), score_export.ScoreExport.add

def add_then_wait(self, name, maps):
    add(self, name, maps)
    ready.write_text(str(self.tmp))
    time.sleep(120)

score_export.ScoreExport.add = add_then_wait
sys.exit(main(sys.argv[2:]))
"""


def wait_for(path: Path, proc, seconds=240) -> str:
    deadline = time.monotonic() + seconds
    while not path.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise AssertionError(f"rc {proc.wait()}: {proc.communicate()}")
        time.sleep(0.05)
    time.sleep(0.05)  # written, not only created
    return path.read_text()


def test_sigterm_during_a_test_run_is_one_line_and_cleans_up(bench, tmp_path):
    export, logs, ready = tmp_path / "export", tmp_path / "logs", tmp_path / "ready"
    proc = subprocess.Popen([sys.executable, "-c", HELD_IN_THE_PASS, str(ready),
                             *bench_args(bench, logs, "--export_scores", export)],
                            cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    temporary = Path(wait_for(ready, proc))
    assert temporary.is_dir() and temporary.parent == export
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err
    assert "Traceback" not in err and err.strip().splitlines()[-1] == "main.py: interrupted (SIGTERM)"
    assert os.listdir(export) == []  # temporary folder and lock removed
    assert not (logs / ".obsnet.lock").exists()
    assert not list(logs.glob("*.json*")) or json.loads((logs / MANIFEST).read_text())["files"] == []


# any command: run_friendly raises SIGTERM as an interrupt in its own process only (a process
# forked inside dies of the signal as before), runs the finally blocks, restores the handler
ANY_COMMAND = """
import os, signal, sys, time
from obsnet.exit_codes import run_friendly

def command(argv):
    started, running = os.pipe()
    child = os.fork()
    if child == 0:
        os.write(running, b"x")  # past the fork (a signal during it is lost to any handler)
        time.sleep(60)
        os._exit(0)
    os.read(started, 1)
    os.kill(child, signal.SIGTERM)
    _, status = os.waitpid(child, 0)
    print("child", os.WTERMSIG(status) if os.WIFSIGNALED(status) else "exited", flush=True)
    try:
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(60)
    finally:
        print("finally", flush=True)

code = run_friendly("prog", command, [])
print("restored", signal.getsignal(signal.SIGTERM) is signal.SIG_DFL, flush=True)
sys.exit(code)
"""


def test_sigterm_is_an_interrupt_in_any_command():
    out = subprocess.run([sys.executable, "-W", "ignore", "-c", ANY_COMMAND], cwd=ROOT, env=ENV,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 143, out.stdout + out.stderr
    assert out.stdout.split("\n") == ["child 15", "finally", "restored True", ""]
    assert out.stderr.strip() == "prog: interrupted (SIGTERM)"


def test_sigint_outside_training_names_its_signal(capsys):
    from obsnet.exit_codes import run_friendly

    def command(argv):
        raise KeyboardInterrupt  # what Python raises on SIGINT

    assert run_friendly("prog", command, []) == 130
    assert capsys.readouterr().err.strip() == "prog: interrupted (SIGINT)"


# ------------------------------------------------------------------ item 10: a full disk

@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs Linux's /dev/full")
def test_a_full_disk_during_the_export_comes_after_the_table(bench, tmp_path, capsys,
                                                              monkeypatch):
    """The second temporary map goes to /dev/full, where every write fails with ENOSPC."""
    export, logs = tmp_path / "export", tmp_path / "logs"
    made = []
    real_init = score_export.ScoreExport.__init__

    def init_next_to_a_full_disk(self, *args, **kwargs):
        real_init(self, *args, **kwargs)
        os.symlink("/dev/full", self.tmp / "mcp-000001.npy")
        made.append(self.tmp)

    monkeypatch.setattr(score_export.ScoreExport, "__init__", init_next_to_a_full_disk)
    code, stdout, line = main_in_process(capsys, *bench_args(bench, logs, "--export_scores", export))
    assert code == 1 and line == (
        f"main.py: error: --export_scores {made[0] / 'mcp-000001.npy'}: cannot be written "
        f"({os.strerror(errno.ENOSPC)}); no score map exported, the temporary folder "
        f"{made[0].name} removed")
    assert "split validation (3 images)" in stdout and "mcp" in stdout  # the table, first
    results = json.loads((logs / "results_validation.json").read_text())
    assert results["n_images"] == 3 and (logs / "results_validation.csv").is_file()
    assert os.listdir(export) == []  # no score map, no temporary folder, no lock


# ------------------------------------------------------------------ item 5: files in --tboard

def test_a_test_run_keeps_the_training_config_and_never_replaces_a_users_file(synthetic, capsys):
    root = synthetic
    logs = root / "logs_obsnet"
    code, _, line = main_in_process(capsys, *TINY, *paths(root), "--epoch", "1")
    assert code == 0, line
    trained = (logs / "config_train_obsnet.json").read_bytes()
    test = [*TINY, *paths(root), "--test_only", "--test_multi", "mcp"]
    code, stdout, line = main_in_process(capsys, *test)
    assert code == 0, line
    assert (logs / "config_train_obsnet.json").read_bytes() == trained
    assert json.loads((logs / "config_test_test_ood.json").read_text())["test_only"] is True
    assert json.loads((logs / "results_test_ood.json").read_text())["split"] == "test_ood"
    assert f"results written to {logs / 'results_test_ood.json'} and results_test_ood.csv" in stdout
    assert json.loads((logs / MANIFEST).read_text())["files"] == [
        "config_test_test_ood.json", "config_train_obsnet.json", "reliability_test_ood.png",
        "results_test_ood.csv", "results_test_ood.json", "risk_coverage_test_ood.png"]
    assert "risk_coverage_test_ood.png; reliability_test_ood.png" in stdout

    first = {p.name: p.stat().st_mtime_ns for p in logs.glob("*_test_ood.*")}
    code, _, line = main_in_process(capsys, *test)  # a second test of the split
    assert code == 2 and line == (
        f"main.py: error: --tboard {logs}: config_test_test_ood.json, results_test_ood.json, "
        f"results_test_ood.csv, risk_coverage_test_ood.png, reliability_test_ood.png of an "
        f"earlier run are there; add "
        f"--overwrite to replace them")
    assert {p.name: p.stat().st_mtime_ns for p in logs.glob("*_test_ood.*")} == first
    code, _, line = main_in_process(capsys, *test, "--overwrite")
    assert code == 0, line
    assert (logs / "results_test_ood.json").stat().st_mtime_ns != first["results_test_ood.json"]

    (logs / "results_val.csv").write_text("the user's")  # a file main.py did not write
    for extra in ([], ["--overwrite"]):
        code, _, line = main_in_process(capsys, *test, "--test_split", "val", *extra)
        assert code == 2 and line == (
            f"main.py: error: --tboard {logs}: results_val.csv is there and was not written by "
            f"main.py (not listed in {MANIFEST}); it is never replaced: move it away or choose "
            f"another --tboard")
    assert (logs / "results_val.csv").read_text() == "the user's"
    assert not (logs / "config_test_val.json").exists()


def test_a_training_stage_keeps_an_earlier_config(synthetic, tmp_path, capsys):
    logs = tmp_path / "logs"
    logs.mkdir()
    (logs / "config_train_obsnet.json").write_text("{}")
    train = [*TINY, *paths(synthetic), "--obsnet_file", tmp_path / "obsnet", "--tboard", logs,
             "--epoch", "1"]
    code, _, line = main_in_process(capsys, *train, "--overwrite")  # not ours: never replaced
    assert code == 2 and line.endswith("config_train_obsnet.json is there and was not written by "
                                       f"main.py (not listed in {MANIFEST}); it is never "
                                       f"replaced: move it away or choose another --tboard")
    (logs / MANIFEST).write_text(json.dumps({"files": ["config_train_obsnet.json"]}))
    code, _, line = main_in_process(capsys, *train)  # ours: only with --overwrite (or --resume)
    assert code == 2 and line == (
        f"main.py: error: --tboard {logs}: config_train_obsnet.json of an earlier run is there; "
        f"add --overwrite to replace it (or --resume to continue that run)")
    assert (logs / "config_train_obsnet.json").read_text() == "{}"
    assert not (tmp_path / "obsnet").exists() or not any((tmp_path / "obsnet").iterdir())


def test_a_run_stopped_before_any_output_leaves_no_config(synthetic, tmp_path, capsys):
    """Its config withdrawn (it describes nothing on disk): the rerun needs no --overwrite."""
    logs = tmp_path / "logs"
    test = [*TINY, *paths(synthetic), "--tboard", logs, "--test_only"]
    code, _, line = main_in_process(capsys, *test, "--test_multi", "obsnet", "--obsnet_file",
                                    tmp_path / "missing.pth")  # fails once the stage started
    assert code == 1 and "missing.pth" in line, line
    assert not (logs / "config_test_test_ood.json").exists()
    assert json.loads((logs / MANIFEST).read_text())["files"] == []
    code, _, line = main_in_process(capsys, *test, "--test_multi", "mcp")
    assert code == 0, line
    assert (logs / "config_test_test_ood.json").is_file() and (logs / "results_test_ood.json").is_file()
