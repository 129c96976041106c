"""The evaluation stages of main.py: --fit_stats (class statistics for sml and mahalanobis)
and --test_only (every method of --test_multi, its table and files)."""
import warnings
from pathlib import Path

from obsnet import bravo_export
from obsnet.component_eval import wants_components
from obsnet.config import RunConfig, TestConfig
from obsnet.data.errors import DatasetError
from obsnet.data.specs import DatasetSpec
from obsnet.errors import ObsnetWarning, UsageError
from obsnet.evaluate import EvalHooks, evaluate
from obsnet.methods import MethodConfig
from obsnet.calibration import calibration_summary
from obsnet.models.calibration import calibration_of
from obsnet.models.checkpoint import weights_fingerprint
from obsnet.models.registry import load_observed, load_segmenter
from obsnet.figures import (diagram_bins, log_figure, reliability_figure, risk_coverage_figure,
                            write_png)
from obsnet.report import (format_frozen_table, format_table, log_pr_curves, log_preview,
                           log_scalars, write_csv, write_json)
from obsnet.run_checks import tboard_files
from obsnet.run_files import RunFiles
from obsnet.runtime import loader_for, log, refuse_missing_dropout
from obsnet.score_export import ScoreExport, check_export_targets
from obsnet.stats import FITTED_METHODS, fit_class_stats, load_stats, save_stats
from obsnet.thresholds import (Targets, fit_points, frozen_rates, load_thresholds, method_settings,
                               save_thresholds, stale_methods, thresholds_path, thresholds_record)


def method_config(test: TestConfig, spec, nclass: int, class_stats=None) -> MethodConfig:
    """Hyper-parameters of the uncertainty methods, from the run's ``test`` settings and the
    spec (its void class among the segmenter's ``nclass`` outputs); ``class_stats``: the
    --fit_stats statistics (``class_stats_for``)."""
    void = None if spec.void_logit is None else spec.void_logit % nclass
    return MethodConfig(mc_passes=test.T, temperature=test.Temp, odin_eps=test.odin_eps,
                        odin_temp=test.odin_temp, gauss_lambda=test.gauss_lambda,
                        void_class=void, sampling_score=test.sampling_score, mean=spec.mean,
                        std=spec.std, progress=True, class_stats=class_stats)


def class_stats_for(cfg: RunConfig, segnet=None):
    """The --fit_stats statistics of --segnet_file when --test_multi asks for them, else None;
    refused when they were fitted on another segmenter than ``segnet`` (when given)."""
    wanted = [n for n in cfg.test.methods if n in FITTED_METHODS]
    if not wanted:
        return None
    segmenter = None if segnet is None else (weights_fingerprint(segnet),
                                             f"--segnet_file {cfg.paths.segnet_file}")
    return load_stats(cfg.paths.stats_file, cfg.model.nclass, wanted[0], segmenter)


def stage_fit_stats(cfg: RunConfig, spec, rt, writer) -> None:
    """--fit_stats: one pass of the frozen --segnet_file over the training split; writes the
    statistics of sml and mahalanobis to ``<segnet stem>.stats.pth``."""
    if rt.distributed:
        raise UsageError("--fit_stats runs in one process: run it without torchrun")
    m = cfg.model
    loader = loader_for(cfg.data, spec, spec.train_split, False, rt, cfg.seed)
    segnet = load_segmenter(m.model, m.nclass, m.width_mult, cfg.paths.segnet_file,
                            device=rt.device, layers=m.observe_layers, probe_size=cfg.data.size)
    stats = fit_class_stats(segnet, loader, m.nclass, rt.device, spec.ignore_id,
                            progress=rt.is_main)
    path = cfg.paths.stats_file
    save_stats(stats, path)
    log(rt, f"statistics of {int(stats.label_counts.sum())} labelled training pixels "
            f"({stats.nclass} classes, {stats.feat_dim}-channel features) written to {path}")


def load_ensemble(cfg: RunConfig, device) -> list:
    """The frozen SegNets of --ensemble."""
    m = cfg.model
    return [load_segmenter(m.model, m.nclass, m.width_mult, f, device=device,
                           label="--ensemble member", probe_size=cfg.data.size)
            for f in cfg.paths.ensemble]


def load_tested(cfg: RunConfig, rt) -> tuple:
    """(frozen segmenter, observer or None, --ensemble members) that the methods of
    --test_multi run, in ``rt``'s memory format: the observer of --obsnet_file as its
    checkpoint records it, when obsnet is among them; a segmenter without dropout layers is
    refused for mc_dropout."""
    m, paths, names = cfg.model, cfg.paths, cfg.test.methods
    if "obsnet" in names:
        segnet, obsnet, _ = load_observed(paths.obsnet_file, m.observer, m.model, m.nclass,
                                          m.width_mult, paths.segnet_file, rt.device,
                                          cfg.data.size)
        obsnet = obsnet.to(memory_format=rt.memory_format)
    else:
        segnet = load_segmenter(m.model, m.nclass, m.width_mult, paths.segnet_file, rt.device,
                                layers=m.observe_layers, probe_size=cfg.data.size)
        obsnet = None
    refuse_missing_dropout(segnet, m.model,
                           [f"--test_multi {n}" for n in names if n == "mc_dropout"])
    return segnet.to(memory_format=rt.memory_format), obsnet, load_ensemble(cfg, rt.device)


def stage_test(cfg: RunConfig, spec, rt, writer) -> None:
    """Evaluate every method of --test_multi on the test split; table, TensorBoard,
    results_<split>.json and .csv in --tboard (and --export_scores' files, last)."""
    if rt.distributed and wants_components(spec):  # the kept frames are not gathered across ranks
        raise UsageError(f"--test_only --data {spec.name}: the component metrics need every "
                         f"frame in one process; run it without torchrun (one process)")
    m, paths, names, split = cfg.model, cfg.paths, list(cfg.test.methods), cfg.test.split
    if rt.distributed and paths.export_bravo is not None:  # each rank sees a share of the frames
        raise UsageError("--export_bravo writes every frame from one process; run it without "
                         "torchrun")
    loader = loader_for(cfg.data, spec, split, False, rt, cfg.seed)
    export_dir, pairs = paths.export_scores, loader.dataset.samples
    if export_dir is not None:  # refused before any work: files of an earlier export
        check_export_targets(export_dir, spec.name, names, pairs, paths.overwrite)
    if paths.export_bravo is not None:
        bravo_export.check_export_targets(paths.export_bravo, names, cfg.data.folder, pairs,
                                          paths.overwrite)
    segnet, obsnet, ensemble = load_tested(cfg, rt)
    frozen = frozen_thresholds(cfg, segnet, obsnet, ensemble)
    export = bravo = None
    if export_dir is not None and rt.is_main:
        export = ScoreExport(export_dir, spec.name, names, loader.dataset.samples)
    try:
        methods = method_config(cfg.test, spec, m.nclass, class_stats_for(cfg, segnet))
        if paths.export_bravo is not None and rt.is_main:
            bravo = bravo_export.BravoExport(paths.export_bravo, names, cfg.data.folder, pairs,
                                             methods)
        results, preview, meters = evaluate(
            segnet, obsnet, loader, names, spec, rt.device, methods, m.nclass, split,
            amp=cfg.amp, progress=rt.is_main, ensemble=ensemble,
            hooks=EvalHooks(on_scores=_fan_out(export and export.add, bravo and bravo.add_scores),
                            on_pred=bravo and bravo.add_pred,
                            # per-image counts are not gathered across ranks
                            image_counts=wants_image_counts(frozen) and not rt.distributed))
        if frozen is not None:
            for name, rates in frozen_rates(frozen, meters).items():
                results["methods"][name]["frozen"] = rates
            results["thresholds"] = {k: frozen[k] for k in ("split", "images", "targets")}
        files = tboard_files(cfg)
        record = calibration_of(obsnet) if obsnet is not None else None
        if record is not None:  # the checkpoint's calibration, its ECE / ACE before and after
            results["methods"]["obsnet"]["calibration"] = record
            log(rt, f"--obsnet_file: {calibration_summary(record)}")
        if getattr(loader.dataset, "labelled", True):
            report_test(rt, writer, results, preview, meters, spec, files)
        else:  # nothing scored: no results file
            log(rt, f"--test_split {split}: no labels, nothing scored; "
                    f"{files.results_json.name} and {files.results_csv.name} not written")
        if bravo is not None:  # after the table: a failed export must not hide it
            log(rt, f"--export_bravo: {len(bravo.finish())} file(s) written under "
                    f"{paths.export_bravo}")
        if export is not None:
            written = export.finish()
            log(rt, f"--export_scores: {len(written)} file(s) written under "
                    f"{Path(export_dir) / 'anomaly_p'}")
    finally:
        for partial in (export, bravo):
            if partial is not None:
                partial.discard()


def frozen_thresholds(cfg: RunConfig, segnet, obsnet, ensemble) -> dict | None:
    """The thresholds --fit_threshold wrote next to --obsnet_file (checked: for this
    segmenter), without the methods whose scores differ now (another observer or
    calibration, other method flags: each said in a warning); None when there are none."""
    path = thresholds_path(cfg.paths.obsnet_file)
    if not path.is_file():
        return None
    record = load_thresholds(path, weights_fingerprint(segnet))
    settings = method_settings(cfg.test, map(weights_fingerprint, ensemble))
    stale = stale_methods(record, None if obsnet is None else weights_fingerprint(obsnet),
                          settings)
    for name, why in stale.items():
        if name in cfg.test.methods:
            warnings.warn(f"{path}: {name}'s thresholds were {why}: not reported; run "
                          f"--fit_threshold again", ObsnetWarning, stacklevel=2)
    methods = {n: p for n, p in record["methods"].items() if n not in stale}
    return record | {"methods": methods}


def wants_image_counts(record: dict | None) -> bool:
    """Whether a thresholds file holds a conformal point (measured per image)."""
    return record is not None and any("conformal_tpr" in points
                                      for points in record["methods"].values())


def stage_fit_threshold(cfg: RunConfig, spec, rt, writer) -> None:
    """--fit_threshold: the methods of --test_multi on --test_split (default: val, which must
    hold no anomaly pixel); each method's operating points for --target_tpr / --target_risk
    written next to the observer (``obsnet.thresholds``)."""
    if rt.distributed:
        raise UsageError("--fit_threshold runs in one process: run it without torchrun")
    m, names, split = cfg.model, list(cfg.test.methods), cfg.test.split
    loader = loader_for(cfg.data, spec, split, False, rt, cfg.seed)
    segnet, obsnet, ensemble = load_tested(cfg, rt)
    methods = method_config(cfg.test, spec, m.nclass, class_stats_for(cfg, segnet))
    results, _, meters = evaluate(segnet, obsnet, loader, names, spec, rt.device, methods,
                                  m.nclass, split, amp=cfg.amp, progress=rt.is_main,
                                  ensemble=ensemble, hooks=EvalHooks(image_counts=True))
    check_scorable(results, spec, rt.is_main)
    if results["pixels"]["anomaly"]:
        raise DatasetError(f"--fit_threshold: --test_split {split} holds "
                           f"{results['pixels']['anomaly']} anomaly pixels; thresholds are fitted "
                           f"on in-distribution data: use a split without anomalies (default: "
                           f"{spec.val_split}); nothing written")
    targets = Targets(cfg.test.target_tpr, cfg.test.target_risk)
    networks = (weights_fingerprint(segnet),
                None if obsnet is None else weights_fingerprint(obsnet))
    record = thresholds_record(fit_points(meters, targets), split, targets, results["n_images"],
                               networks, method_settings(cfg.test,
                                                         map(weights_fingerprint, ensemble)))
    path = thresholds_path(cfg.paths.obsnet_file)
    save_thresholds(path, record)
    log(rt, format_frozen_table(record["methods"], record))
    log(rt, f"thresholds written to {path}; --test_only reports what they give")
def _fan_out(*callbacks):
    """One ``on_scores`` calling each of ``callbacks`` that is not None (None when none is)."""
    live = [c for c in callbacks if c]
    if not live:
        return None
    return lambda name, maps: [c(name, maps) for c in live]


def report_test(rt, writer, results, preview, meters, spec, files: RunFiles) -> None:
    """The test results: printed table, TensorBoard, ``results_<split>.json`` and ``.csv``
    (``files``: those of this stage in --tboard)."""
    check_scorable(results, spec, rt.is_main)
    log(rt, format_table(results))  # first: a file that cannot be written must not hide it
    if "thresholds" in results:
        log(rt, format_frozen_table({n: e["frozen"] for n, e in results["methods"].items()
                                     if "frozen" in e}, results["thresholds"], results))
    log_scalars(writer, results, "Test", 0)
    log_pr_curves(writer, meters, "Test", 0)
    log_preview(writer, preview, spec.colors, spec.mean, spec.std, "Test", 0)
    bins = diagram_bins(meters)
    figures = ((risk_coverage_figure(meters, results["split"]), files.risk_coverage_png,
                "Test/risk_coverage"),
               (reliability_figure(bins, f"split {results['split']}") if bins else None,
                files.reliability_png, "Test/reliability"))
    for figure, _, tag in figures:
        if figure is not None:
            log_figure(writer, figure, tag)
    if rt.is_main:
        write_json(files.claim(files.results_json), results, files.flag)
        write_csv(files.claim(files.results_csv), results, files.flag)
        for figure, path, _ in figures:
            if figure is not None:
                write_png(files.claim(path), figure, files.flag)
            else:  # nothing to draw this time: no figure of an earlier test left beside
                files.withdraw(path)
    drawn = "".join(f"; {path.name}" for figure, path, _ in figures if figure is not None)
    log(rt, f"results written to {files.results_json} and {files.results_csv.name}{drawn}")


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
