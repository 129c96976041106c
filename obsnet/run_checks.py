"""What main.py checks and locks before a stage starts: no output is an input, earlier
checkpoints (--resume / --overwrite), the files of earlier runs in --tboard, the dataset
folder, and the outputs it will write."""
from pathlib import Path

import torch

from obsnet.data.errors import DatasetError
from obsnet.data.loaders import dataset_builder
from obsnet.data.specs import SPECS
from obsnet.data.synthetic import UNTOUCHED, claim, ensure_synthetic, is_complete
from obsnet.data.synthetic import refusal as synthetic_refusal
from obsnet.errors import UsageError
from obsnet.methods import parse_methods
from obsnet.models.registry import observer_path
from obsnet.outputs import Output, OutputLock
from obsnet.ownership import Input, Planned, check_outputs_not_inputs, planned_in
from obsnet.run_files import MANIFEST, RunFiles, stage_name
from obsnet.runtime import segnet_last
from obsnet.score_export import planned_files as export_files
from obsnet.stats import FITTED_METHODS, stats_path


def stage_outputs(args) -> list[Output]:
    """The locations the stage of ``args`` writes: probed and locked before it starts."""
    outputs = [Output("--tboard", Path(args.tboard), folder=True)]
    if getattr(args, "fit_stats", False):
        return [Output("--fit_stats", stats_path(args.segnet_file), folder=False), *outputs]
    if args.test_only:
        export = getattr(args, "export_scores", None)
        return [Output("--export_scores", Path(export), folder=True), *outputs] \
            if export is not None else outputs
    if args.train_segnet:
        return [Output("--segnet_file", Path(args.segnet_file), folder=False), *outputs]
    return [Output("--obsnet_file", Path(args.obsnet_file), folder=True), *outputs]


def tboard_files(args) -> RunFiles:
    """The files the stage of ``args`` writes into --tboard: its config, a test's results
    (TensorBoard's event files aside: each run gives its own a new name)."""
    fit_stats = getattr(args, "fit_stats", False)
    split = args.test_split if args.test_only and not fit_stats else None
    return RunFiles(Path(args.tboard), stage_name(args.train_segnet, fit_stats, split), split)


def observer_files(args) -> list[str]:
    """The checkpoints an observer training run writes in --obsnet_file: best.pth, last.pth
    and epochNNN.pth every 5 epochs (``fit.Saver``)."""
    return ["best.pth", "last.pth", *(f"epoch{e:03d}.pth" for e in range(5, args.epoch + 1, 5))]


def planned_files(args) -> list[Planned]:
    """Every file the stage of ``args`` writes (what ``check_inputs`` compares with its inputs)."""
    files = tboard_files(args)
    planned = planned_in("--tboard", args.tboard, [*(p.name for p in files.planned), MANIFEST])
    segnet = Path(args.segnet_file)
    if getattr(args, "fit_stats", False):
        return [Planned("--segnet_file", segnet, stats_path(segnet)), *planned]
    if args.test_only:
        return [*export_planned(args), *planned]
    if args.train_segnet:
        return [Planned("--segnet_file", segnet, segnet),
                Planned("--segnet_file", segnet, segnet_last(segnet)), *planned]
    return [*planned_in("--obsnet_file", args.obsnet_file, observer_files(args)), *planned]


def model_inputs(args) -> list[Input]:
    """The checkpoint and weight files the stage of ``args`` reads (--resume's file aside: it
    is the run's own output, read to continue it)."""
    if getattr(args, "fit_stats", False):
        return [Input("--segnet_file", Path(args.segnet_file))]
    if args.train_segnet:
        weights = [(flag, getattr(args, flag.lstrip("-"), None))
                   for flag in ("--vgg_weights", "--backbone_weights")]
        return [Input(flag, Path(value)) for flag, value in weights
                if value and value != "imagenet"]
    inputs = [Input("--segnet_file", Path(args.segnet_file))]
    if not args.test_only:
        return inputs
    names = parse_methods(args.test_multi)
    if "obsnet" in names:
        inputs.append(Input("--obsnet_file", observer_path(args.obsnet_file)))
    if any(name in FITTED_METHODS for name in names):
        inputs.append(Input("--segnet_file's statistics", stats_path(args.segnet_file)))
    members = [m.strip() for m in (args.ensemble or "").split(",") if m.strip()]
    return inputs + [Input("--ensemble member", Path(m)) for m in members]


def stage_splits(args) -> list[str]:
    """The dataset splits the stage of ``args`` reads."""
    spec = SPECS[args.data]
    if getattr(args, "fit_stats", False):
        return [spec.train_split]
    return [args.test_split] if args.test_only else [spec.train_split, spec.val_split]


def split_listing(args, split: str):
    """(list file or folder, pairs) of a split of --dset_folder, or None when it cannot be
    read (its loader says why, before anything is written)."""
    try:
        return dataset_builder(args.data).read_pairs(Path(args.dset_folder).expanduser(), split)
    except (DatasetError, OSError):
        return None


def export_planned(args) -> list[Planned]:
    """The score maps and notes --export_scores writes for the frames of --test_split."""
    root = getattr(args, "export_scores", None)
    listing = split_listing(args, args.test_split) if root is not None else None
    if listing is None:
        return []
    files = export_files(root, args.data, parse_methods(args.test_multi), listing[1])
    return [Planned("--export_scores", Path(root), path) for path in files]


def dataset_inputs(args, planned: list[Planned]) -> list[Input]:
    """The list files, images and labels the stage reads, when a planned file lies in
    --dset_folder (nothing to compare otherwise). A split that cannot be read is left to its
    loader, which says so before anything is written."""
    root = Path(args.dset_folder).expanduser()
    if not any(Path(p.path).expanduser().resolve().is_relative_to(root.resolve()) for p in planned):
        return []
    inputs = []
    for listing in filter(None, (split_listing(args, split) for split in stage_splits(args))):
        split_file, pairs = listing
        files = [split_file, *(f for pair in pairs for f in (pair.image, pair.label) if f)]
        inputs += [Input("--dset_folder file", Path(f)) for f in files]
    return inputs


def check_inputs(args) -> None:
    """UsageError, before any work and whatever --overwrite says, when a file the stage would
    write is, or would replace, one of its inputs (``ownership.check_outputs_not_inputs``)."""
    planned = planned_files(args)
    check_outputs_not_inputs(planned, model_inputs(args) + dataset_inputs(args, planned))


def earlier_checkpoints(args) -> tuple[str, Path, Path, list[Path]]:
    """(flag, location, resume file, checkpoint files already there) of a training stage."""
    if args.train_segnet:
        last = segnet_last(args.segnet_file)
        files = [Path(args.segnet_file), last]
        return "--segnet_file", Path(args.segnet_file), last, [f for f in files if f.is_file()]
    folder = Path(args.obsnet_file)
    names = ["best.pth", "last.pth"] + sorted(p.name for p in folder.glob("epoch[0-9]*.pth")) \
        if folder.is_dir() else []
    return "--obsnet_file", folder, folder / "last.pth", [folder / n for n in names
                                                          if (folder / n).is_file()]


def check_earlier_run(args) -> None:
    """UsageError, before any work, when a training run would replace the checkpoints of an
    earlier run without --resume or --overwrite, or --resume has nothing to continue."""
    if getattr(args, "fit_stats", False):
        path = stats_path(args.segnet_file)
        if path.is_file() and not args.overwrite:
            raise UsageError(f"--fit_stats: {path} already exists; add --overwrite to replace it")
        return
    if args.test_only:
        return
    flag, where, last, existing = earlier_checkpoints(args)
    if args.resume and args.overwrite:
        raise UsageError(f"--resume continues the run in {where}, --overwrite starts it over: "
                         f"give one of them")
    if args.resume and not last.is_file():
        raise UsageError(f"--resume: {last} not found (no earlier run to continue); run "
                         f"without --resume to start")
    if existing and not (args.resume or args.overwrite):
        names = ", ".join(p.name for p in existing)
        raise UsageError(f"{flag} {where}: checkpoints of an earlier run are there ({names}); "
                         f"add --resume to continue that run or --overwrite to replace them")


def stage_outputs_exist(args) -> bool:
    """Whether the outputs of the stage of ``args`` are on disk: a training stage's
    checkpoints, --fit_stats' statistics, a test's results files."""
    if getattr(args, "fit_stats", False):
        return stats_path(args.segnet_file).is_file()
    if args.test_only:
        files = tboard_files(args)
        return files.results_json.is_file() or files.results_csv.is_file()
    return bool(earlier_checkpoints(args)[3])


def check_tboard_files(args) -> None:
    """UsageError, before any work, when the stage would replace a file in --tboard that
    main.py did not write, or one of an earlier run without --overwrite (a training stage:
    or --resume, which continues that run)."""
    training = not (args.test_only or getattr(args, "fit_stats", False))
    tboard_files(args).check(args.overwrite or (training and args.resume), resume=training)


def check_dataset_folder(args) -> None:
    """--data Synthetic writes its data only where that loses nothing (UsageError); a folder it
    may write is claimed now, before the run's own outputs (which may lie inside it) exist."""
    if args.data != "Synthetic" or is_complete(args.dset_folder):
        return
    reason = synthetic_refusal(args.dset_folder)
    if reason is not None:
        raise UsageError(f"--dset_folder {args.dset_folder}: {reason}; {UNTOUCHED}")
    claim(args.dset_folder)


def start_run(args, rt) -> OutputLock:
    """Rank 0 checks the flags against what is on disk, probes and locks the outputs and
    generates synthetic data, all before any training; then every rank learns whether that
    went well, so no rank waits for one that stopped. Returns the held lock."""
    lock, failure = OutputLock(stage_outputs(args) if rt.is_main else []), None
    try:
        if rt.is_main:
            check_inputs(args)
            check_earlier_run(args)
            check_dataset_folder(args)
            lock.acquire()
            check_tboard_files(args)  # under the lock: the manifest is the holder's
            if args.data == "Synthetic" and not is_complete(args.dset_folder):
                ensure_synthetic(args.dset_folder, seed=0)
    except BaseException as exc:
        lock.release()
        failure = exc
    if rt.distributed:  # also the barrier the other ranks wait at for the generated data
        ok = torch.tensor([0 if failure else 1], device=rt.device)
        torch.distributed.all_reduce(ok, op=torch.distributed.ReduceOp.MIN)
        if not ok.item() and failure is None:
            failure = UsageError("rank 0 could not start the run (see its message)")
    if failure is not None:
        raise failure
    return lock
