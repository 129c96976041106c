"""The evaluation stages of main.py: --fit_stats (class statistics for sml and mahalanobis)
and --test_only (every method of --test_multi, its table and files)."""
import warnings
from pathlib import Path

from obsnet.component_eval import wants_components
from obsnet.data.errors import DatasetError
from obsnet.data.specs import DatasetSpec
from obsnet.errors import ObsnetWarning, UsageError
from obsnet.evaluate import evaluate
from obsnet.methods import MethodConfig, parse_methods
from obsnet.models.checkpoint import weights_fingerprint
from obsnet.model_flags import observer_request
from obsnet.models.observer_spec import resolve_observer
from obsnet.models.registry import load_observer, load_segmenter
from obsnet.report import format_table, log_pr_curves, log_preview, log_scalars, write_csv, write_json
from obsnet.run_checks import tboard_files
from obsnet.run_files import RunFiles
from obsnet.runtime import loader_for, log, refuse_missing_dropout
from obsnet.score_export import ScoreExport, check_export_targets
from obsnet.stats import FITTED_METHODS, fit_class_stats, load_stats, save_stats, stats_path


def method_config(args, spec, segnet=None) -> MethodConfig:
    """Hyper-parameters of the uncertainty methods, from the command line and the spec;
    ``segnet``: the loaded segmenter, which the --fit_stats statistics must have been fitted
    on."""
    void = None if spec.void_logit is None else spec.void_logit % args.nclass
    return MethodConfig(mc_passes=args.T, temperature=args.Temp, odin_eps=args.odin_eps,
                        odin_temp=args.odin_temp, gauss_lambda=args.gauss_lambda,
                        void_class=void, sampling_score=args.sampling_score, mean=spec.mean,
                        std=spec.std, progress=True, class_stats=class_stats_for(args, segnet))


def class_stats_for(args, segnet=None):
    """The --fit_stats statistics of --segnet_file when --test_multi asks for them, else None;
    refused when they were fitted on another segmenter than ``segnet`` (when given)."""
    asked = getattr(args, "test_multi", None)
    wanted = [n for n in parse_methods(asked) if n in FITTED_METHODS] if asked else []
    if not wanted:
        return None
    segmenter = None if segnet is None else (weights_fingerprint(segnet),
                                             f"--segnet_file {args.segnet_file}")
    return load_stats(stats_path(args.segnet_file), args.nclass, wanted[0], segmenter)


def stage_fit_stats(args, spec, rt, writer) -> None:
    """--fit_stats: one pass of the frozen --segnet_file over the training split; writes the
    statistics of sml and mahalanobis to ``<segnet stem>.stats.pth``."""
    if rt.distributed:
        raise UsageError("--fit_stats runs in one process: run it without torchrun")
    loader = loader_for(args, spec, spec.train_split, False, rt)
    segnet = load_segmenter(args.model, args.nclass, args.width_mult, args.segnet_file,
                            device=rt.device, layers=args.observe_layers, probe_size=args.size)
    stats = fit_class_stats(segnet, loader, args.nclass, rt.device, spec.ignore_id,
                            progress=rt.is_main)
    path = stats_path(args.segnet_file)
    save_stats(stats, path)
    log(rt, f"statistics of {int(stats.label_counts.sum())} labelled training pixels "
            f"({stats.nclass} classes, {stats.feat_dim}-channel features) written to {path}")


def load_ensemble(args, device) -> list:
    """The frozen SegNets of --ensemble (comma-separated checkpoint files)."""
    files = [f for f in args.ensemble.split(",") if f.strip()] if args.ensemble else []
    return [load_segmenter(args.model, args.nclass, args.width_mult, f.strip(), device=device,
                           label="--ensemble member", probe_size=args.size) for f in files]


def stage_test(args, spec, rt, writer) -> None:
    """Evaluate every method of --test_multi on the test split; table, TensorBoard,
    results_<split>.json and .csv in --tboard (and --export_scores' files, last)."""
    if rt.distributed and wants_components(spec):  # the kept frames are not gathered across ranks
        raise UsageError(f"--test_only --data {spec.name}: the component metrics need every "
                         f"frame in one process; run it without torchrun (one process)")
    names = parse_methods(args.test_multi)
    loader = loader_for(args, spec, args.test_split, False, rt)
    export_dir = getattr(args, "export_scores", None)
    if export_dir is not None:  # refused before any work: files of an earlier export
        check_export_targets(export_dir, spec.name, names, loader.dataset.samples, args.overwrite)
    observed = "obsnet" in names
    observer = resolve_observer(args.obsnet_file, observer_request(args)) if observed else None
    segnet = load_segmenter(args.model, args.nclass, args.width_mult, args.segnet_file, rt.device,
                            layers=observer.layers if observed else args.observe_layers,
                            probe_size=args.size)
    obsnet = None
    if observed:
        obsnet = load_observer(args.obsnet_file, observer, segnet, args.nclass, args.width_mult,
                               rt.device, f"--segnet_file {args.segnet_file}")[0]
        obsnet = obsnet.to(memory_format=rt.memory_format)
    refuse_missing_dropout(segnet, args.model,
                           [f"--test_multi {n}" for n in names if n == "mc_dropout"])
    segnet = segnet.to(memory_format=rt.memory_format)
    export = None
    if export_dir is not None and rt.is_main:
        export = ScoreExport(export_dir, spec.name, names, loader.dataset.samples)
    try:
        results, preview, meters = evaluate(
            segnet, obsnet, loader, names, spec, rt.device, method_config(args, spec, segnet),
            args.nclass, args.test_split, amp=args.amp, progress=rt.is_main,
            ensemble=load_ensemble(args, rt.device), on_scores=export and export.add)
        files = tboard_files(args)
        if getattr(loader.dataset, "labelled", True):
            report_test(rt, writer, results, preview, meters, spec, files)
        else:  # nothing scored: no results file
            log(rt, f"--test_split {args.test_split}: no labels, nothing scored; "
                    f"{files.results_json.name} and {files.results_csv.name} not written")
        if export is not None:  # after the table: a failed export must not hide it
            written = export.finish()
            log(rt, f"--export_scores: {len(written)} file(s) written under "
                    f"{Path(export_dir) / 'anomaly_p'}")
    finally:
        if export is not None:
            export.discard()


def report_test(rt, writer, results, preview, meters, spec, files: RunFiles) -> None:
    """The test results: printed table, TensorBoard, ``results_<split>.json`` and ``.csv``
    (``files``: those of this stage in --tboard)."""
    check_scorable(results, spec, rt.is_main)
    log(rt, format_table(results))  # first: a file that cannot be written must not hide it
    log_scalars(writer, results, "Test", 0)
    log_pr_curves(writer, meters, "Test", 0)
    log_preview(writer, preview, spec.colors, spec.mean, spec.std, "Test", 0)
    if rt.is_main:
        write_json(files.claim(files.results_json), results, files.flag)
        write_csv(files.claim(files.results_csv), results, files.flag)
    log(rt, f"results written to {files.results_json} and {files.results_csv.name}")


def check_scorable(results: dict, spec: DatasetSpec, warn: bool = True) -> None:
    """A DatasetError when the labelled split gives no metric at all: every label pixel void
    or ignored, or no anomaly pixel on a preset whose metrics are all OOD ones (the anomaly
    benchmarks); an ObsnetWarning (when ``warn``) when only the OOD metrics are undefined."""
    split, images = f"--test_split {results['split']}", f"{results['n_images']} image(s)"
    pixels = results["pixels"]
    if pixels["scored"] == 0:
        raise DatasetError(f"{split}: nothing to score: every label pixel of its {images} is "
                           f"void or ignored; nothing written")
    if pixels["anomaly"] or not spec.anomaly_ids:  # Cityscapes: no anomaly class, OOD n/a
        return
    if spec.inlier_id is not None:  # no class ground truth: only OOD metrics
        raise DatasetError(f"{split}: nothing to score: its {images} hold no anomaly pixel "
                           f"(label 1), and {spec.name}'s metrics are all OOD ones; nothing written")
    if warn:
        warnings.warn(f"{split}: its {images} hold no anomaly pixel: the OOD metrics are "
                      f"undefined (n/a); the error-detection metrics are scored", ObsnetWarning,
                      stacklevel=2)
