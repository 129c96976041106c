"""ObsNet command line: train the SegNet, train the observer with local adversarial attacks,
or evaluate uncertainty methods. ``python main.py`` alone runs the CPU demo.

The same command line runs as ``python main.py``, ``python -m obsnet`` and the ``obsnet``
console script; only the program name in usage and error lines differs, and the demo (which
writes into the current folder) must be asked for by name there: ``obsnet demo``."""
import argparse
import os
import sys
from pathlib import Path

from obsnet import __version__
from obsnet.attacks import attack_choices
from obsnet.config import DataConfig, ModelConfig, OptimConfig, PathsConfig, RunConfig, TestConfig
from obsnet.data.class_weights import WEIGHTINGS
from obsnet.data.specs import SPECS, DatasetSpec
from obsnet.errors import UsageError
from obsnet.exit_codes import explicit_flags, parse_checked, run_friendly
from obsnet.methods import ALIASES, METHODS, SAMPLING_SCORES, parse_methods
from obsnet.model_flags import (add_model_flags, check_model_flags, check_nclass_and_size,
                                observer_request)
from obsnet.preset import adopt_segmenter_preset
from obsnet.score_export import check_export_data
from obsnet.stages import run_stage
from obsnet.stats import FITTED_METHODS, stats_path
from obsnet.utils import MAX_SEED, UNPOOL_NOTE, seed_everything

# --help shows what main.py's docstring said (the first two lines of this module's)
DESCRIPTION = "\n".join(__doc__.splitlines()[:2])

# `python main.py` with no argument: the three stages of the demo, each a plain command line.
# Every stage passes --overwrite: a rerun of the demo replaces the demo's own checkpoints in
# ckpt/demo/ and its own config and results files in logs/demo/ (the SegNet stage runs only
# when ckpt/demo/segnet.pth is missing).
DEMO_COMMON = ["--data", "Synthetic", "--dset_folder", "data/Synthetic", "--segnet_file",
               "ckpt/demo/segnet.pth", "--obsnet_file", "ckpt/demo/", "--tboard", "logs/demo",
               "--width_mult", "0.125", "--seed", "0", "--bsize", "8"]
DEMO_STAGES = [
    ["--train_segnet", "--epoch", "24", "--optim", "AdamW", "--lr", "0.003", "--overwrite"],
    ["--adv", "min_random_patch", "--epsilon", "0.025", "--epoch", "10", "--lr", "0.5",
     "--overwrite"],
    ["--test_only", "--test_multi", "obsnet,mcp,mc_dropout", "--T", "20", "--overwrite"],
]


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    """The original project's flags plus --nclass, --width_mult, --size, --train_segnet;
    ``prog``: the program name of usage lines (None: argparse's, from ``sys.argv[0]``)."""
    p = argparse.ArgumentParser(prog=prog, description=DESCRIPTION)
    a = p.add_argument
    a("--dset_folder", default=None, help="dataset root (Synthetic: generated there if absent)")
    a("--segnet_file", default=None, help="SegNet checkpoint (default ckpt/<data>/segnet.pth)")
    a("--obsnet_file", default=None,
      help="ObsNet checkpoint folder, or a file to test (default ckpt/<data>/)")
    add_model_flags(p, "channel width multiplier (1.0 = original; the observer's only with "
                       "--model torchvision:... or module:factory)")
    a("--backbone_weights", default=None,
      help="--train_segnet start of DeepLabv3+'s ResNet-101 or a torchvision model's backbone: "
           "'imagenet' (torchvision download) or a local torchvision state_dict file")
    a("--vgg_weights", default=None,
      help="torchvision VGG16 file (or 'imagenet') initialising the SegNet encoder (--train_segnet)")
    a("--data", default="CamVid", choices=sorted(SPECS), help="dataset preset")
    a("--tboard", default=None,
      help="TensorBoard / results folder (default logs/<data>): each stage writes "
           "config_<stage>.json, a test results_<split>.json and .csv")
    a("--seed", type=int, default=-1, help=f"random seed in 0..{MAX_SEED}; -1: not seeded")
    a("--bsize", type=int, default=8, help="batch size")
    a("--lr", type=float, default=2e-2, help="learning rate")
    a("--noise", type=float, default=0.0, help="std of Gaussian noise added to training inputs")
    a("--epsilon", type=float, default=0.1, help="FGSM step size of the attack")
    a("--epoch", type=int, default=50, help="number of epochs")
    a("--num_workers", type=int, default=0, help="data loading workers")
    a("--cache_frames", action="store_true",
      help="decode every frame once and keep it in memory (uint8), so later epochs skip the "
           "JPEG / PNG decoding; forked workers share it (about 0.5 MB per 360x480 frame)")
    a("--num_nodes", type=int, default=1, help="number of nodes")
    a("--adv", default="none", choices=attack_choices(), help="local adversarial attack")
    a("--optim", default="SGD", choices=("SGD", "AdamW"), help="optimizer")
    a("--drop", action="store_true", help="dropout active in the SegNet while training ObsNet")
    a("--no_img", action="store_true", help="ablation: ObsNet does not see the image")
    a("--resume", action="store_true",
      help="continue training from <obsnet_file>/last.pth (with --train_segnet: from "
           "<segnet_file stem>.last.pth)")
    a("--overwrite", action="store_true",
      help="training: replace the checkpoints of an earlier run in --obsnet_file (with "
           "--train_segnet: --segnet_file and its .last.pth) instead of refusing to start; "
           "--test_only: replace the results files of an earlier test of the split in --tboard; "
           "--export_scores / --export_bravo: replace the files of an earlier export")
    a("--skip_bad_samples", action="store_true",
      help="training: leave out (and count) samples that cannot be read instead of stopping")
    a("--size", type=int, nargs=2, metavar=("H", "W"), default=None, help="image size (default: preset)")
    a("--train_segnet", action="store_true", help="train the SegNet and save it to --segnet_file")
    a("--channels_last", action="store_true",
      help="channels-last memory format for models and inputs (faster convolutions on GPU)")
    a("--cudnn_benchmark", action="store_true",
      help="with --seed too: let cuDNN pick its fastest kernels (GPU), so a seeded run is no "
           "longer repeated bit for bit (without --seed it is always on)")
    a("--amp", nargs="?", const="auto", default=None, choices=("auto", "float16", "bfloat16"),
      help="mixed precision: --amp alone is the device's default (float16 + GradScaler on GPU, "
           "bfloat16 on CPU); --amp float16 or --amp bfloat16 on any device")
    _add_training_flags(a)
    _add_method_flags(a)
    _add_evaluation_flags(a)
    a("--debug", action="store_true", help="show tracebacks")
    a("--version", action="version", version=f"obsnet {__version__}")
    return p


def _add_training_flags(a) -> None:
    """Training's loss, augmentation and observer ablations."""
    a("--class_weights", default="none", choices=WEIGHTINGS,
      help="--train_segnet: cross-entropy class weights; median_freq = SegNet's median-frequency "
           "balancing over the training labels; sqrt_median_freq = its square root (softer)")
    a("--scale_jitter", type=float, default=0.0,
      help="training augmentation: random zoom in [1, 1 + S] then a crop, instead of the "
           "preset's fixed crop (0: off)")
    a("--no_residual", action="store_true", help="ablation: ObsNet without the SegNet's maps")
    a("--no_pretrained", action="store_true", help="do not start ObsNet from the SegNet's weights")
    a("--focal", action="store_true", help="focal loss instead of weighted BCE for ObsNet")


def _add_method_flags(a) -> None:
    """The uncertainty methods' flags (``a``: the parser's add_argument)."""
    a("--T", type=int, default=50, help="forward passes of MC dropout")
    a("--Temp", type=float, default=1.2, help="temperature of temperature scaling")
    a("--sampling_score", default="entropy", choices=SAMPLING_SCORES,
      help="score of the mean softmax of mc_dropout, gauss, mcda, ensemble: its entropy "
           "(the original's) or mcp (1 - its max)")
    a("--gauss_lambda", type=float, default=0.002, help="std of the Gaussian weight perturbation")
    a("--odin_eps", type=float, default=0.001, help="ODIN input perturbation size")
    a("--odin_temp", type=float, default=1000.0, help="ODIN temperature")
    a("--ensemble", default=None, help="comma-separated SegNet checkpoints for --test_multi ensemble")
    a("--test_multi", default="obsnet",
      help="comma-separated methods: " + ",".join(list(METHODS) + list(ALIASES)))


def _add_evaluation_flags(a) -> None:
    """What --test_only (and --fit_stats) evaluate and write."""
    a("--test_only", action="store_true", help="evaluate the methods of --test_multi")
    a("--fit_stats", action="store_true",
      help="fit the training-split statistics of sml, sml_post and mahalanobis for the frozen "
           "--segnet_file; written to <segnet_file stem>.stats.pth (--overwrite replaces it)")
    a("--fit_threshold", action="store_true",
      help="fit, on a labelled split without anomalies (--test_split; default: val), each "
           "method's thresholds for --target_tpr (and --target_risk), pooled and conformal; "
           "written next to the observer (best.thresholds.json in a folder), reported by later "
           "--test_only runs")
    a("--target_tpr", type=float, default=0.95,
      help="--fit_threshold: share of the segmenter's correct pixels to accept (no alarm)")
    a("--target_risk", type=float, default=None,
      help="--fit_threshold: largest error rate among the accepted pixels (also fitted)")
    a("--calibrate", action="store_true",
      help="fit Platt scaling of the --obsnet_file observer's logit on --test_split (default: "
           "the val split) and store it in that checkpoint (--overwrite replaces a calibration); "
           "see docs/calibration.md")
    a("--test_split", default=None,
      help="split evaluated by --test_only (default: the dataset's test split, test_ood for "
           "CamVid) or fitted by --calibrate (default: val); e.g. val_ood, written by "
           "python -m obsnet.paste")
    a("--export_scores", default=None, metavar="DIR",
      help="--test_only on RoadAnomaly21 / RoadObstacle21 / FishyscapesLAF: also write each "
           "method's score maps as DIR/anomaly_p/<method>/<dset>/<frame>.hdf5 for the official "
           "SegmentMeIfYouCan evaluator (needs h5py; existing files only with --overwrite)")
    a("--export_bravo", default=None, metavar="DIR",
      help="--test_only: also write each method's DIR/<method>/<image path>_pred.png (8-bit "
           "class) and _conf.png (16-bit confidence) for the BRAVO toolkit's encoder "
           "(docs/bravo.md; existing files only with --overwrite)")


BRAVO_NCLASS = 19  # the benchmark's classes: Cityscapes' train ids


def check_args(args, spec) -> None:
    """Reject values that cannot work, before any heavy work."""
    check_model_flags(args)
    if args.vgg_weights and args.model != "segnet":
        raise UsageError("--vgg_weights initialises the SegNet encoder: use --backbone_weights "
                         f"with --model {args.model}")
    for flag in ("bsize", "epoch", "T"):
        if getattr(args, flag) < 1:
            raise UsageError(f"--{flag} must be at least 1 (got {getattr(args, flag)})")
    for flag in ("lr", "epsilon", "width_mult", "Temp", "odin_temp"):
        if getattr(args, flag) <= 0:
            raise UsageError(f"--{flag} must be positive (got {getattr(args, flag)})")
    for flag in ("odin_eps", "gauss_lambda", "noise", "scale_jitter"):
        if getattr(args, flag) < 0:
            raise UsageError(f"--{flag} must be >= 0 (got {getattr(args, flag)})")
    check_nclass_and_size(args, spec)
    check_observer_ablations(args)
    if not -1 <= args.seed <= MAX_SEED:
        raise UsageError(f"--seed must be -1 (not seeded) or in 0..{MAX_SEED} (got {args.seed})")
    if args.num_workers < 0:
        raise UsageError("--num_workers must be >= 0")


def check_observer_ablations(args) -> None:
    """UsageError for ablations that leave the observer nothing to see, or that its light
    variant (--obs_mlp, which reads the SegNet's up4 map alone) would silently ignore."""
    if args.no_img and args.no_residual:
        raise UsageError("--no_img with --no_residual: the observer would see neither the image "
                         "nor the segmenter's maps; give one of them")
    ignored = [flag for flag in ("no_img", "no_residual") if getattr(args, flag)]
    if args.obs_mlp and ignored:
        raise UsageError(f"--obs_mlp with --{ignored[0]}: the light observer reads the SegNet's up4 "
                         f"map alone, so --{ignored[0]} cannot apply to it; leave one of them out")


def resolve_config(args, explicit=frozenset()) -> tuple[RunConfig, DatasetSpec]:
    """The frozen run config of the parsed flags and its dataset spec: ``resolve_args``, then
    ``run_config``."""
    spec, methods = resolve_args(args, explicit)
    return run_config(args, methods), spec


def resolve_args(args, explicit=frozenset()) -> tuple[DatasetSpec, tuple[str, ...]]:
    """Check the parsed flags and fill their per-dataset defaults in place (the one place
    they change, before ``run_config`` freezes them); returns the dataset spec. ``explicit``:
    the flags the command line gave (an evaluation-only benchmark adopts the rest from the
    segmenter's recorded preset: ``obsnet/preset.py``). Returns the dataset spec and the
    methods of --test_multi (parsed, aliases expanded)."""
    spec = SPECS[args.data]
    if spec.test_only and not args.test_only:
        raise UsageError(f"--data {args.data} is an evaluation-only benchmark (no training "
                         f"split): use it with --test_only")
    tag = args.data.lower()
    args.segnet_file = args.segnet_file or f"ckpt/{tag}/segnet.pth"
    if spec.test_only:
        spec, adopted = adopt_segmenter_preset(vars(args), spec, explicit)
        vars(args).update(adopted)
    check_args(args, spec)
    args.dset_folder = args.dset_folder or (f"data/{args.data}" if args.data == "Synthetic" else None)
    if args.dset_folder is None:
        raise UsageError(f"--dset_folder is required for --data {args.data}")
    args.obsnet_file = args.obsnet_file or f"ckpt/{tag}/"
    args.tboard = args.tboard or f"logs/{tag}"
    args.nclass = spec.nclass if args.nclass is None else args.nclass
    args.size = tuple(args.size or spec.size)
    check_fit_threshold(args)
    fitting = args.fit_threshold or args.calibrate  # on the val split by default
    args.test_split = args.test_split or (spec.val_split if fitting else spec.test_split)
    try:
        names = parse_methods(args.test_multi)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    if "ensemble" in names and not args.ensemble:
        raise UsageError("--test_multi ensemble needs --ensemble FILE,FILE,... (SegNet checkpoints)")
    if args.export_scores is not None:
        check_export_data(spec.name)
    if spec.name == "BRAVO" and args.nclass != BRAVO_NCLASS:
        raise UsageError(f"--data BRAVO scores the {BRAVO_NCLASS} Cityscapes classes: "
                         f"--segnet_file must be a Cityscapes-trained segmenter (got "
                         f"--nclass {args.nclass})")
    if "void" in names and spec.void_logit is None:
        raise UsageError(f"--test_multi void: {spec.name} has no void class")
    check_fit_stats(args, names)
    return spec, tuple(names)


def check_fit_threshold(args) -> None:
    """--fit_threshold is a stage of its own; its targets are shares (UsageError)."""
    if args.fit_threshold and (args.test_only or args.train_segnet or args.resume
                               or args.fit_stats or args.calibrate):
        raise UsageError("--fit_threshold is a stage of its own: leave out --test_only, "
                         "--train_segnet, --resume, --fit_stats and --calibrate")
    if not 0 < args.target_tpr <= 1:
        raise UsageError(f"--target_tpr must be in (0, 1] (got {args.target_tpr})")
    if args.target_risk is not None and not 0 <= args.target_risk < 1:
        raise UsageError(f"--target_risk must be in [0, 1) (got {args.target_risk})")


def check_fit_stats(args, names) -> None:
    """--fit_stats and --calibrate are stages of their own; sml / mahalanobis need --fit_stats'
    file (UsageError)."""
    for flag in ("fit_stats", "calibrate"):
        others = [f"--{o}" for o in ("test_only", "train_segnet", "resume", "fit_stats",
                                     "fit_threshold") if o != flag and getattr(args, o)]
        if getattr(args, flag) and others:
            raise UsageError(f"--{flag} is a stage of its own: leave out {others[0]}")
    fitted = [n for n in names if n in FITTED_METHODS]
    if (args.test_only or args.fit_threshold) and fitted \
            and not stats_path(args.segnet_file).is_file():
        raise UsageError(f"--test_multi {fitted[0]}: {stats_path(args.segnet_file)} not found; "
                         f"run main.py --fit_stats with this --segnet_file first")


def stage_of(args) -> str:
    """The stage the resolved flags ask for (``obsnet.config.STAGES``)."""
    if args.fit_stats:
        return "fit_stats"
    if args.fit_threshold:
        return "fit_threshold"
    if args.calibrate:
        return "calibrate"
    return "test" if args.test_only else "train_segnet" if args.train_segnet else "train_obsnet"


def run_config(args, methods: tuple[str, ...]) -> RunConfig:
    """The frozen run config of resolved flags (``resolve_args``) and their ``methods``."""
    return RunConfig(
        stage=stage_of(args),
        data=DataConfig(name=args.data, folder=args.dset_folder, size=tuple(args.size),
                        bsize=args.bsize, num_workers=args.num_workers,
                        cache_frames=args.cache_frames, scale_jitter=args.scale_jitter,
                        skip_bad_samples=args.skip_bad_samples),
        model=ModelConfig(model=args.model, nclass=args.nclass, width_mult=args.width_mult,
                          vgg_weights=args.vgg_weights, backbone_weights=args.backbone_weights,
                          observer=observer_request(args)),
        optim=OptimConfig(optim=args.optim, lr=args.lr, epoch=args.epoch, adv=args.adv,
                          epsilon=args.epsilon, noise=args.noise, drop=args.drop,
                          focal=args.focal, no_pretrained=args.no_pretrained,
                          class_weights=args.class_weights),
        paths=PathsConfig(segnet_file=args.segnet_file, obsnet_file=args.obsnet_file,
                          tboard=args.tboard, ensemble=ensemble_files(args.ensemble),
                          export_scores=args.export_scores, export_bravo=args.export_bravo,
                          resume=args.resume,
                          overwrite=args.overwrite),
        test=TestConfig(split=args.test_split, methods=methods,
                        T=args.T, Temp=args.Temp, sampling_score=args.sampling_score,
                        gauss_lambda=args.gauss_lambda, odin_eps=args.odin_eps,
                        odin_temp=args.odin_temp, target_tpr=args.target_tpr,
                        target_risk=args.target_risk),
        seed=args.seed, amp=args.amp, channels_last=args.channels_last,
        cudnn_benchmark=args.cudnn_benchmark, num_nodes=args.num_nodes)


def ensemble_files(value: str | None) -> tuple[str, ...]:
    """--ensemble's comma-separated checkpoint files (empty entries left out)."""
    return tuple(f.strip() for f in (value or "").split(",") if f.strip())


PATH_FLAGS = ("dset_folder", "segnet_file", "obsnet_file", "tboard", "export_scores",
              "export_bravo", "vgg_weights", "backbone_weights", "ensemble")


def check_path_flags(args) -> None:
    """UsageError for a path flag given as an empty string: it would silently mean the
    current folder (or the flag's default)."""
    for flag in PATH_FLAGS:
        if getattr(args, flag, None) is not None and not getattr(args, flag).strip():
            raise UsageError(f"--{flag} is empty: give a path (or leave the flag out)")


def run(argv, prog: str = "main.py") -> int:
    """Parse, resolve and run one stage; returns the process exit code."""
    parser = build_parser(prog)
    args = parse_checked(parser, argv)
    check_path_flags(args)
    config, spec = resolve_config(args, explicit_flags(parser, argv))
    rank = int(os.environ.get("RANK", "0"))
    seed_everything((args.seed + rank) % (MAX_SEED + 1) if args.seed >= 0 else -1,
                    fastest_kernels=args.cudnn_benchmark)
    if args.seed >= 0 and args.model == "segnet" and rank == 0:
        print(UNPOOL_NOTE, flush=True)  # stdout: stderr is kept for errors (one line)
    run_stage(config, spec)
    return 0


def run_demo(prog: str = "main.py") -> int:
    """The demo: each stage printed as the command it equals, then run."""
    for stage in DEMO_STAGES:
        argv = DEMO_COMMON + stage
        if "--train_segnet" in stage and Path(DEMO_COMMON[5]).is_file():
            print(f"[demo] {DEMO_COMMON[5]} exists: SegNet training skipped")
            continue
        print(f"[demo] {command_name(prog)} " + " ".join(argv), flush=True)
        run(argv, prog)
    return 0


def command_name(prog: str) -> str:
    """How a user types the program ``prog`` names: ``python main.py`` for the root script."""
    return f"python {prog}" if prog.endswith(".py") else prog


def run_command(argv, prog: str = "main.py") -> int:
    """One command: the demo (``demo`` alone; also no argument at all for ``python main.py``,
    the original project's way), else a stage. The package's faces (``obsnet``, ``python -m
    obsnet``) refuse an empty command line rather than start the demo in the current folder."""
    if list(argv) == ["demo"] or (not argv and prog == "main.py"):
        return run_demo(prog)
    if not argv:
        raise UsageError(f"no flags given: '{command_name(prog)} demo' runs the demo (it writes "
                         f"data/, ckpt/ and logs/ in the current folder); "
                         f"'{command_name(prog)} --help' lists the flags")
    return run(argv, prog)


def main(argv=None, prog: str = "main.py") -> int:
    """Entry point: friendly one-line errors (``prog: error: ...``) unless --debug; see
    ``run_command`` for the demo."""
    argv = sys.argv[1:] if argv is None else argv
    return run_friendly(prog, lambda a: run_command(a, prog), argv)


def console_main() -> int:
    """The ``obsnet`` console script."""
    return main(prog="obsnet")
