"""What main.py checks and locks before a stage starts: no output is an input, earlier
checkpoints (--resume / --overwrite), the files of earlier runs in --tboard, the dataset
folder, and the outputs it will write."""
import json
from pathlib import Path

import torch

from obsnet.calibration import check_calibration_target
from obsnet.config import DataConfig, RunConfig
from obsnet.data.errors import DatasetError
from obsnet.data.loaders import dataset_builder
from obsnet.data.specs import SPECS
from obsnet.data.synthetic import UNTOUCHED, claim, ensure_synthetic, is_complete
from obsnet.data.synthetic import refusal as synthetic_refusal
from obsnet.errors import UsageError
from obsnet.models.registry import observer_path
from obsnet.outputs import Output, OutputLock
from obsnet.ownership import Input, Planned, check_outputs_not_inputs, planned_in
from obsnet.run_files import MANIFEST, RunFiles, stage_name
from obsnet.bravo_export import planned_files as bravo_files
from obsnet.score_export import planned_files as export_files
from obsnet.stats import FITTED_METHODS
from obsnet.thresholds import WRITER as THRESHOLDS_WRITER
from obsnet.thresholds import thresholds_path


def stage_outputs(cfg: RunConfig) -> list[Output]:
    """The locations the stage of ``cfg`` writes: probed and locked before it starts."""
    paths = cfg.paths
    outputs = [Output("--tboard", Path(paths.tboard), folder=True)]
    if cfg.stage == "fit_stats":
        return [Output("--fit_stats", paths.stats_file, folder=False), *outputs]
    if cfg.stage == "fit_threshold":
        return [Output("--fit_threshold", thresholds_path(paths.obsnet_file), folder=False),
                *outputs]
    if cfg.stage == "calibrate":  # the observer checkpoint it rewrites
        return [Output("--obsnet_file", observer_path(paths.obsnet_file), folder=False), *outputs]
    if cfg.stage == "test":
        exports = [Output(flag, Path(folder), folder=True) for flag, folder in
                   (("--export_scores", paths.export_scores),
                    ("--export_bravo", paths.export_bravo)) if folder is not None]
        return [*exports, *outputs]
    if cfg.stage == "train_segnet":
        return [Output("--segnet_file", Path(paths.segnet_file), folder=False), *outputs]
    return [Output("--obsnet_file", Path(paths.obsnet_file), folder=True), *outputs]


def tboard_files(cfg: RunConfig) -> RunFiles:
    """The files the stage of ``cfg`` writes into --tboard: its config, a test's results
    (TensorBoard's event files aside: each run gives its own a new name)."""
    split = cfg.test.split if cfg.stage == "test" else None
    if cfg.stage == "fit_threshold":
        return RunFiles(Path(cfg.paths.tboard), "fit_threshold")
    if cfg.stage == "calibrate":
        return RunFiles(Path(cfg.paths.tboard), "calibrate")
    return RunFiles(Path(cfg.paths.tboard),
                    stage_name(cfg.stage == "train_segnet", cfg.stage == "fit_stats", split), split)


def observer_files(epochs: int) -> list[str]:
    """The checkpoints an observer training run writes in --obsnet_file: best.pth, last.pth
    and epochNNN.pth every 5 epochs (``fit.Saver``)."""
    return ["best.pth", "last.pth", *(f"epoch{e:03d}.pth" for e in range(5, epochs + 1, 5))]


def planned_files(cfg: RunConfig) -> list[Planned]:
    """Every file the stage of ``cfg`` writes (what ``check_inputs`` compares with its inputs)."""
    paths, files = cfg.paths, tboard_files(cfg)
    planned = planned_in("--tboard", paths.tboard, [*(p.name for p in files.planned), MANIFEST])
    segnet = Path(paths.segnet_file)
    if cfg.stage == "fit_stats":
        return [Planned("--segnet_file", segnet, paths.stats_file), *planned]
    if cfg.stage == "fit_threshold":
        return [Planned("--obsnet_file", Path(paths.obsnet_file),
                        thresholds_path(paths.obsnet_file)), *planned]
    if cfg.stage == "test":
        return [*export_planned(cfg), *bravo_planned(cfg), *planned]
    if cfg.stage == "calibrate":  # its one other output is its input, rewritten on purpose
        return planned
    if cfg.stage == "train_segnet":
        return [Planned("--segnet_file", segnet, segnet),
                Planned("--segnet_file", segnet, paths.segnet_last), *planned]
    return [*planned_in("--obsnet_file", paths.obsnet_file, observer_files(cfg.optim.epoch)),
            *planned]


def model_inputs(cfg: RunConfig) -> list[Input]:
    """The checkpoint and weight files the stage of ``cfg`` reads (--resume's file aside: it
    is the run's own output, read to continue it)."""
    paths = cfg.paths
    if cfg.stage == "fit_stats":
        return [Input("--segnet_file", Path(paths.segnet_file))]
    if cfg.stage == "train_segnet":
        weights = [("--vgg_weights", cfg.model.vgg_weights),
                   ("--backbone_weights", cfg.model.backbone_weights)]
        return [Input(flag, Path(value)) for flag, value in weights
                if value and value != "imagenet"]
    inputs = [Input("--segnet_file", Path(paths.segnet_file))]
    if cfg.stage == "calibrate":
        return [*inputs, Input("--obsnet_file", observer_path(paths.obsnet_file))]
    if cfg.stage not in ("test", "fit_threshold"):
        return inputs
    names = cfg.test.methods
    if "obsnet" in names:
        inputs.append(Input("--obsnet_file", observer_path(paths.obsnet_file)))
    if any(name in FITTED_METHODS for name in names):
        inputs.append(Input("--segnet_file's statistics", paths.stats_file))
    return inputs + [Input("--ensemble member", Path(m)) for m in paths.ensemble]


def stage_splits(cfg: RunConfig) -> list[str]:
    """The dataset splits the stage of ``cfg`` reads."""
    spec = SPECS[cfg.data.name]
    if cfg.stage == "fit_stats":
        return [spec.train_split]
    if cfg.stage in ("test", "fit_threshold", "calibrate"):
        return [cfg.test.split]
    return [spec.train_split, spec.val_split]


def split_listing(data: DataConfig, split: str):
    """(list file or folder, pairs) of a split of --dset_folder, or None when it cannot be
    read (its loader says why, before anything is written)."""
    try:
        return dataset_builder(data.name).read_pairs(Path(data.folder).expanduser(), split)
    except (DatasetError, OSError):
        return None


def export_planned(cfg: RunConfig) -> list[Planned]:
    """The score maps and notes --export_scores writes for the frames of --test_split."""
    root = cfg.paths.export_scores
    listing = split_listing(cfg.data, cfg.test.split) if root is not None else None
    if listing is None:
        return []
    files = export_files(root, cfg.data.name, list(cfg.test.methods), listing[1])
    return [Planned("--export_scores", Path(root), path) for path in files]


def bravo_planned(cfg: RunConfig) -> list[Planned]:
    """The prediction and confidence files --export_bravo writes for the frames of --test_split."""
    root = cfg.paths.export_bravo
    listing = split_listing(cfg.data, cfg.test.split) if root is not None else None
    if listing is None:
        return []
    files = bravo_files(root, list(cfg.test.methods), cfg.data.folder, listing[1])
    return [Planned("--export_bravo", Path(root), path) for path in files]


def dataset_inputs(cfg: RunConfig, planned: list[Planned]) -> list[Input]:
    """The list files, images and labels the stage reads, when a planned file lies in
    --dset_folder (nothing to compare otherwise). A split that cannot be read is left to its
    loader, which says so before anything is written."""
    root = Path(cfg.data.folder).expanduser()
    if not any(Path(p.path).expanduser().resolve().is_relative_to(root.resolve()) for p in planned):
        return []
    inputs = []
    for listing in filter(None, (split_listing(cfg.data, split) for split in stage_splits(cfg))):
        split_file, pairs = listing
        files = [split_file, *(f for pair in pairs for f in (pair.image, pair.label) if f)]
        inputs += [Input("--dset_folder file", Path(f)) for f in files]
    return inputs


def check_inputs(cfg: RunConfig) -> None:
    """UsageError, before any work and whatever --overwrite says, when a file the stage would
    write is, or would replace, one of its inputs (``ownership.check_outputs_not_inputs``)."""
    planned = planned_files(cfg)
    check_outputs_not_inputs(planned, model_inputs(cfg) + dataset_inputs(cfg, planned))


def earlier_checkpoints(cfg: RunConfig) -> tuple[str, Path, Path, list[Path]]:
    """(flag, location, resume file, checkpoint files already there) of a training stage."""
    paths = cfg.paths
    if cfg.stage == "train_segnet":
        last = paths.segnet_last
        files = [Path(paths.segnet_file), last]
        return "--segnet_file", Path(paths.segnet_file), last, [f for f in files if f.is_file()]
    folder = Path(paths.obsnet_file)
    names = ["best.pth", "last.pth"] + sorted(p.name for p in folder.glob("epoch[0-9]*.pth")) \
        if folder.is_dir() else []
    return "--obsnet_file", folder, folder / "last.pth", [folder / n for n in names
                                                          if (folder / n).is_file()]


def check_earlier_run(cfg: RunConfig) -> None:
    """UsageError, before any work, when a training run would replace the checkpoints of an
    earlier run without --resume or --overwrite, or --resume has nothing to continue."""
    paths = cfg.paths
    if cfg.stage == "fit_stats":
        if paths.stats_file.is_file() and not paths.overwrite:
            raise UsageError(f"--fit_stats: {paths.stats_file} already exists; add --overwrite "
                             f"to replace it")
        return
    if cfg.stage == "fit_threshold":
        check_earlier_thresholds(thresholds_path(paths.obsnet_file), paths.overwrite)
        return
    if cfg.stage == "calibrate":
        check_calibration_target(paths.obsnet_file, paths.overwrite)
        return
    if cfg.stage == "test":
        return
    flag, where, last, existing = earlier_checkpoints(cfg)
    if paths.resume and paths.overwrite:
        raise UsageError(f"--resume continues the run in {where}, --overwrite starts it over: "
                         f"give one of them")
    if paths.resume and not last.is_file():
        raise UsageError(f"--resume: {last} not found (no earlier run to continue); run "
                         f"without --resume to start")
    if existing and not (paths.resume or paths.overwrite):
        names = ", ".join(p.name for p in existing)
        raise UsageError(f"{flag} {where}: checkpoints of an earlier run are there ({names}); "
                         f"add --resume to continue that run or --overwrite to replace them")


def check_earlier_thresholds(path: Path, overwrite: bool) -> None:
    """UsageError when --fit_threshold would replace a thresholds file of an earlier run
    without --overwrite, or a file of that name it did not write (never replaced)."""
    if not path.exists():
        return
    try:
        ours = json.loads(path.read_text()).get("written_by") == THRESHOLDS_WRITER
    except (OSError, UnicodeDecodeError, ValueError, AttributeError):
        ours = False
    if not ours:
        raise UsageError(f"--fit_threshold: {path} is there and was not written by "
                         f"{THRESHOLDS_WRITER}; it is never replaced: move it away")
    if not overwrite:
        raise UsageError(f"--fit_threshold: {path} already exists; add --overwrite to replace it")


def stage_outputs_exist(cfg: RunConfig) -> bool:
    """Whether the outputs of the stage of ``cfg`` are on disk: a training stage's
    checkpoints, --fit_stats' statistics, a test's results files."""
    if cfg.stage == "fit_stats":
        return cfg.paths.stats_file.is_file()
    if cfg.stage == "fit_threshold":
        return thresholds_path(cfg.paths.obsnet_file).is_file()
    if cfg.stage == "test":
        files = tboard_files(cfg)
        return files.results_json.is_file() or files.results_csv.is_file()
    if cfg.stage == "calibrate":  # its output is a checkpoint entry, written last
        return False
    return bool(earlier_checkpoints(cfg)[3])


def check_tboard_files(cfg: RunConfig) -> None:
    """UsageError, before any work, when the stage would replace a file in --tboard that
    main.py did not write, or one of an earlier run without --overwrite (a training stage:
    or --resume, which continues that run)."""
    paths = cfg.paths
    tboard_files(cfg).check(paths.overwrite or (cfg.training and paths.resume),
                            resume=cfg.training)


def check_dataset_folder(data: DataConfig) -> None:
    """--data Synthetic writes its data only where that loses nothing (UsageError); a folder it
    may write is claimed now, before the run's own outputs (which may lie inside it) exist."""
    if data.name != "Synthetic" or is_complete(data.folder):
        return
    reason = synthetic_refusal(data.folder)
    if reason is not None:
        raise UsageError(f"--dset_folder {data.folder}: {reason}; {UNTOUCHED}")
    claim(data.folder)


def start_run(cfg: RunConfig, rt) -> OutputLock:
    """Rank 0 checks the flags against what is on disk, probes and locks the outputs and
    generates synthetic data, all before any training; then every rank learns whether that
    went well, so no rank waits for one that stopped. Returns the held lock."""
    lock, failure = OutputLock(stage_outputs(cfg) if rt.is_main else []), None
    try:
        if rt.is_main:
            check_inputs(cfg)
            check_earlier_run(cfg)
            check_dataset_folder(cfg.data)
            lock.acquire()
            check_tboard_files(cfg)  # under the lock: the manifest is the holder's
            if cfg.data.name == "Synthetic" and not is_complete(cfg.data.folder):
                ensure_synthetic(cfg.data.folder, seed=0)
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
