"""Run the project's command lines (``python main.py ...``, ``python -m obsnet.check ...``) as
a user would, in a fresh process, without paying the interpreter's start each time.

Each call is a new process forked from a multiprocessing *forkserver* that has already
imported torch, torchvision and the project (several seconds per interpreter on a small
machine). The server never runs torch code, so forking from it is safe. The child changes to
``cwd``, takes ``env`` as its environment, writes to its own stdout / stderr files, runs the
script or module as ``__main__`` and exits with the code the interpreter would give:

- ``SystemExit(None)`` 0, ``SystemExit(int)`` that int, any other ``SystemExit`` value printed
  to stderr and 1; an uncaught exception prints its traceback to stderr and gives 1;
- atexit handlers run, then the streams are flushed.

What differs from a new interpreter: anything read at import time is the server's (the hash
seed, ``OPENBLAS_NUM_THREADS``...; the server starts with ``OMP_NUM_THREADS=1``, the value the
tests pass); the modules of PRELOAD are not imported again; ``multiprocessing`` sees the child
as a child (``current_process().name``, ``parent_process()``); ``sys.path`` keeps the test
session's entries after the script's own first entry. Reset as at a fresh start: the random
seeds of python, numpy and torch, torch's thread count (from the call's ``OMP_NUM_THREADS``)
and multiprocessing's default start method (fork, so DataLoader workers fork as they would).
The child is not a daemon: DataLoader workers can start.

``OBSNET_TEST_SUBPROCESS=1`` runs every call as a real ``subprocess.run`` (and :func:`spawn`
as ``torch.multiprocessing.spawn``) instead.
"""
import atexit
import functools
import multiprocessing
import os
import random
import runpy
import subprocess
import sys
import tempfile
import traceback
from multiprocessing import forkserver
from pathlib import Path
from unittest import mock

from tests.helpers import ROOT

PRELOAD = ["numpy", "PIL.Image", "torch", "torchvision", "torch.utils.tensorboard",
           "obsnet.data.loaders", "obsnet.models.registry", "obsnet.evaluate", "obsnet.train",
           "obsnet.stages", "obsnet.cli", "obsnet.inference", "obsnet.check", "obsnet.paste",
           "obsnet.export"]
SUBPROCESS = os.environ.get("OBSNET_TEST_SUBPROCESS") == "1"
TINY = ["--data", "Synthetic", "--size", "32", "48", "--width_mult", "0.0625", "--bsize", "4",
        "--seed", "0"]
TINY_SERIAL = [*TINY, "--num_workers", "0"]  # the loader in the main process
ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")  # for a real process


def paths(root) -> list[str]:
    """main.py's data, checkpoint and log flags for a run folder ``root``."""
    return ["--dset_folder", str(root / "data"), "--segnet_file", str(root / "segnet.pth"),
            "--obsnet_file", str(root / "obsnet"), "--tboard", str(root / "logs")]


def run_paths(root, data="data", segnet="segnet.pth", obsnet="obsnet") -> list[str]:
    """As :func:`paths`, each file named, the logs in ``logs_<obsnet>``: runs of one folder that
    write beside each other."""
    return ["--dset_folder", str(root / data), "--segnet_file", str(root / segnet),
            "--obsnet_file", str(root / obsnet), "--tboard", str(root / f"logs_{obsnet}")]


def one_line_error(out, *fragments) -> str:
    """main.py's single error line of a failed run (no traceback), holding each fragment."""
    lines = out.stderr.strip().splitlines()
    assert lines and lines[-1].startswith("main.py: error: "), out.stderr
    assert "Traceback" not in out.stderr and "DataLoader worker" not in out.stderr, out.stderr
    for fragment in fragments:
        assert fragment in lines[-1], out.stderr
    return lines[-1]


def main_py(*args, env=None, timeout=300) -> subprocess.CompletedProcess:
    """``python main.py ARGS`` from the repository root (``env``: as :func:`python`)."""
    return python(str(ROOT / "main.py"), *args, env=env, timeout=timeout)


def inference_py(*args, timeout=120) -> subprocess.CompletedProcess:
    """``python inference.py ARGS`` from the repository root with ``OMP_NUM_THREADS=1``."""
    return python(str(ROOT / "inference.py"), *args, timeout=timeout)


def python(*argv, cwd=ROOT, env=None, timeout=300, log=None) -> subprocess.CompletedProcess:
    """``python ARGV`` (a script and its arguments, or ``-m MODULE ...``) in ``cwd``.

    ``env`` defaults to this process's environment with ``OMP_NUM_THREADS=1``. With ``log`` (a
    file name) stdout and stderr are both appended to it, and the result holds no output.
    Raises ``subprocess.TimeoutExpired`` after ``timeout`` seconds (None: no limit).
    """
    env = dict(os.environ, OMP_NUM_THREADS="1") if env is None else dict(env)
    command = [sys.executable, *map(str, argv)]
    if SUBPROCESS:
        return _subprocess(command, cwd, env, timeout, log)
    if log:
        return subprocess.CompletedProcess(command, _forked(command, cwd, env, timeout, log, log))
    with tempfile.TemporaryDirectory(prefix="cli-") as tmp:
        out, err = f"{tmp}/stdout", f"{tmp}/stderr"
        code = _forked(command, cwd, env, timeout, out, err)
        return subprocess.CompletedProcess(command, code, _read(out), _read(err))


def _forked(command, cwd, env, timeout, out, err) -> int:
    """Run ``command`` in a child of the forkserver, its output appended to the files ``out``
    and ``err``; its exit code (-N if signal N ended it, as ``subprocess`` says)."""
    for path in (out, err):
        Path(path).touch()  # there to read even if the child dies before writing
    umask = os.umask(0o022)
    os.umask(umask)  # read, not changed: the child gets this process's, as a subprocess would
    child = _context().Process(target=_child, args=(command[1:], str(cwd), env, umask, out, err))
    child.start()
    try:
        child.join(timeout)
        if child.exitcode is None:
            child.kill()
            child.join()
            raise subprocess.TimeoutExpired(command, timeout)
        return child.exitcode
    finally:
        child.close()


def spawn(fn, args, nprocs) -> None:
    """``torch.multiprocessing.spawn(fn, args, nprocs)`` (each rank a process of its own), the
    processes forked from the preloaded server instead of started as new interpreters."""
    import torch.multiprocessing as mp
    if SUBPROCESS:
        return mp.spawn(fn, args=args, nprocs=nprocs, join=True)
    _context()  # the server, with PRELOAD, before torch asks for one
    mp.start_processes(fn, args=args, nprocs=nprocs, join=True, start_method="forkserver")


class SubprocessModule:
    """Stands in for the ``subprocess`` module of code that runs ``[sys.executable, ...]``
    commands with ``subprocess.run(command, cwd=..., stdout=FILE, stderr=subprocess.STDOUT)``:
    the commands run through :func:`python` with the caller's environment."""

    STDOUT = subprocess.STDOUT

    @staticmethod
    def run(command, cwd, stdout, stderr) -> subprocess.CompletedProcess:
        """Run ``command`` (it must start with ``sys.executable``), output appended to ``stdout``."""
        assert command[0] == sys.executable and stderr == subprocess.STDOUT, command
        stdout.flush()
        return python(*command[1:], cwd=cwd, env=os.environ, timeout=None, log=stdout.name)


def _subprocess(command, cwd, env, timeout, log) -> subprocess.CompletedProcess:
    """The same call as a real new interpreter (``OBSNET_TEST_SUBPROCESS=1``)."""
    if not log:
        return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True,
                              timeout=timeout)
    with open(log, "a") as out:
        return subprocess.run(command, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT,
                              timeout=timeout)


def _read(path) -> str:
    """A captured stream as ``subprocess.run(..., text=True)`` returns it (universal newlines)."""
    with open(path) as stream:
        return stream.read()


@functools.cache
def _context():
    """The forkserver context; its server imports PRELOAD with ``OMP_NUM_THREADS=1`` set."""
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(PRELOAD)
    with mock.patch.dict(os.environ, OMP_NUM_THREADS="1"):
        forkserver.ensure_running()
    return context


def _child(argv, cwd, env, umask, out, err) -> None:
    """In the forked process: become ``python ARGV`` in ``cwd`` with ``env`` and ``umask``,
    then exit."""
    os.chdir(cwd)
    os.umask(umask)
    os.environ.clear()
    os.environ.update(env)
    _redirect(out, err, unbuffered=bool(env.get("PYTHONUNBUFFERED")))
    _fresh_state(env)
    code = _exit_code(argv)
    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _redirect(out, err, unbuffered: bool) -> None:
    """File descriptors 1 and 2 appended to the files ``out`` and ``err`` (may be one file)."""
    sys.stdout.flush()
    sys.stderr.flush()
    flags = os.O_WRONLY | os.O_CREAT | os.O_APPEND
    for fd, path in ((1, out), (2, err)):
        target = os.open(path, flags, 0o644)
        os.dup2(target, fd)
        os.close(target)
    if unbuffered:
        sys.stdout.reconfigure(write_through=True)


def _fresh_state(env) -> None:
    """What a new interpreter would differ in: its random seeds (python, numpy, torch), torch's
    thread count and multiprocessing's default start method (forkserver in a forkserver
    child, fork in a new interpreter)."""
    import numpy
    import torch
    multiprocessing.set_start_method(None, force=True)
    random.seed()
    numpy.random.seed()
    torch.seed()
    threads = env.get("OMP_NUM_THREADS", "")
    torch.set_num_threads(int(threads) if threads.isdigit() else len(os.sched_getaffinity(0)))


def _exit_code(argv) -> int:
    """Run ``argv`` as ``__main__``; the exit code the interpreter would give."""
    try:
        _run_main(argv)
    except SystemExit as stop:
        if stop.code is None or isinstance(stop.code, int):
            return stop.code or 0
        print(stop.code, file=sys.stderr)
        return 1
    except BaseException as exc:
        traceback.print_exception(type(exc), exc, _script_frames(exc.__traceback__))
        return 1
    return 0


def _script_frames(tb):
    """The traceback from the script's first frame on (this module and runpy left out)."""
    while tb is not None and tb.tb_frame.f_code.co_filename in (__file__, "<frozen runpy>"):
        tb = tb.tb_next
    return tb


def _run_main(argv) -> None:
    """``python SCRIPT ARGS`` or ``python -m MODULE ARGS`` in this process."""
    if argv[0] == "-m":
        sys.argv = [argv[1], *argv[2:]]
        sys.path.insert(0, os.getcwd())
        if not hasattr(sys.modules.get(argv[1]), "__path__"):  # a package runs its __main__
            sys.modules.pop(argv[1], None)  # run afresh as __main__, as `python -m` does
        runpy.run_module(argv[1], run_name="__main__", alter_sys=True)
    else:
        sys.argv = list(argv)
        sys.path.insert(0, os.path.dirname(os.path.abspath(argv[0])))
        runpy.run_path(argv[0], run_name="__main__")
