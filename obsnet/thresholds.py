"""Operating points fixed before the test.

``main.py --fit_threshold`` runs the methods of --test_multi on a labelled split that holds no
anomaly (default: val) and writes, next to the observer (``thresholds_path``), each method's
thresholds on its score for the user's targets:

- ``tpr``: the smallest threshold that accepts at least --target_tpr of the segmenter's
  correct pixels (pooled over the split);
- ``risk``: the largest threshold whose accepted pixels hold at most --target_risk errors
  (pooled), when --target_risk is given;
- ``conformal_tpr``: conformal risk control of the per-image share of correct pixels that
  raise an alarm (``obsnet.metrics.risk.conformal_tpr_threshold``: its guarantee holds in
  expectation over exchangeable images).

``--test_only`` then reports, at those frozen thresholds, what they give on the test split
(``frozen_rates``), beside the FPR95 tuned on the test split itself. A pixel raises an alarm
when its score is above the threshold. The file is data: every value is checked before use,
and it is refused when fitted for other networks (their weights' fingerprints).
"""
import json
import math
from dataclasses import dataclass
from pathlib import Path

from obsnet.errors import UsageError
from obsnet.metrics.risk import (
    conformal_tpr_threshold,
    fit_risk_threshold,
    fit_tpr_threshold,
    image_accepted_correct,
    rates_at,
)
from obsnet.models.checkpoint import weights_fingerprint
from obsnet.models.observer_spec import observer_path
from obsnet.report import write_json

KINDS = ("tpr", "risk", "conformal_tpr")  # the operating points, in the order they are shown
WRITER = "main.py --fit_threshold"


@dataclass(frozen=True)
class Targets:
    """--target_tpr (share of correct pixels accepted) and --target_risk (error rate among the
    accepted pixels; None: not fitted)."""

    tpr: float = 0.95
    risk: float | None = None


def thresholds_path(obsnet_file) -> Path:
    """Where an observer's thresholds live: ``<stem>.thresholds.json`` next to its checkpoint,
    ``best.thresholds.json`` for a folder (its ``best.pth``), however --obsnet_file names it."""
    path = observer_path(obsnet_file)
    if not path.suffix and not path.exists():  # a folder not made yet
        path = path / "best.pth"
    return path.with_name(f"{path.stem}.thresholds.json")


# The flags each method's score depends on, besides the networks (``TestConfig`` fields; the
# ensemble's members by their fingerprints): a frozen threshold is used only with the same.
METHOD_SETTINGS = {"mc_dropout": ("T", "sampling_score"), "temp_scale": ("Temp",),
                   "odin": ("odin_eps", "odin_temp"),
                   "gauss": ("T", "gauss_lambda", "sampling_score"),
                   "mcda": ("T", "sampling_score"), "ensemble": ("sampling_score", "ensemble")}
SETTINGS = ("T", "Temp", "sampling_score", "gauss_lambda", "odin_eps", "odin_temp", "ensemble")


def method_settings(test, ensemble_fingerprints) -> dict:
    """The settings of ``SETTINGS`` a run scores with (``test``: its ``TestConfig``)."""
    return {**{k: getattr(test, k) for k in SETTINGS[:-1]},
            "ensemble": list(ensemble_fingerprints)}


def stale_methods(record: dict, observer: str | None, settings: dict) -> dict:
    """Method -> why its frozen thresholds do not apply to this run's scores: another
    observer (or calibration) for ``obsnet``, other flags for the methods of
    ``METHOD_SETTINGS``."""
    stale = {}
    for name in record["methods"]:
        if name == "obsnet" and observer is not None and record["observer"] != observer:
            stale[name] = "fitted for another observer (or calibration) than --obsnet_file"
        changed = [k for k in METHOD_SETTINGS.get(name, ()) if record["settings"].get(k) != settings[k]]
        if changed:
            stale[name] = "fitted with other " + ", ".join(
                "--ensemble members" if k == "ensemble" else f"--{k}" for k in changed)
    return stale


def fit_points(meters: dict, targets: Targets) -> dict:
    """Per method: each operating point's threshold and what it gives on the fit split."""
    out = {}
    for name, m in meters.items():
        tables = _tables(m)
        points = {"tpr": fit_tpr_threshold(tables[0], targets.tpr)}
        if targets.risk is not None:
            points["risk"] = fit_risk_threshold(tables[0], targets.risk)
        images = m.get("images")
        if images is not None:
            points["conformal_tpr"], _ = conformal_tpr_threshold(images, targets.tpr)
        out[name] = {kind: {"threshold": t, "fit": _rates(t, tables, images)}
                     for kind, t in points.items()}
    return out


def _tables(meters: dict) -> tuple:
    """One method's (error, OOD) ``OODMeter.coarse_table()``, built once for all its points."""
    return meters["error"].coarse_table(), meters["ood"].coarse_table()


def _rates(threshold: float, tables: tuple, images=None) -> dict:
    """``rates_at`` on one method's tables (``_tables``), plus the per-image mean share of
    correct pixels accepted when ``images`` (its ``ImageCounts``) were counted."""
    if math.isnan(threshold):
        return {}
    rates = rates_at(threshold, *tables)
    if images is not None:
        rates["image_accepted_correct"] = image_accepted_correct(images, threshold)
    return rates


def frozen_rates(record: dict, meters: dict) -> dict:
    """Per method of ``meters`` that ``record`` (a loaded thresholds file) holds: each
    operating point's threshold, what it gave on the fit split, and what it gives here."""
    out = {}
    for name, m in meters.items():
        points = record["methods"].get(name)
        if points:
            tables = _tables(m)
            out[name] = {kind: {"threshold": p["threshold"], "fit": p["fit"],
                                "test": _rates(p["threshold"], tables, m.get("images"))}
                         for kind, p in points.items()}
    return out


def thresholds_record(points: dict, split: str, targets: Targets, n_images: int,
                      networks: tuple[str, str | None], settings: dict) -> dict:
    """The thresholds file's content (JSON): what was fitted, on what, for which networks
    (fingerprints of the segmenter and the observer, None without one) and with which method
    settings (``method_settings``)."""
    return {"written_by": WRITER, "split": split, "images": n_images,
            "targets": {"tpr": targets.tpr, "risk": targets.risk},
            "segmenter": networks[0], "observer": networks[1], "settings": settings,
            "methods": points}


def save_thresholds(path: Path, record: dict) -> None:
    """Write ``record`` to ``path`` atomically, as the results files are written (NaN as null,
    an infinity as "inf" / "-inf": ``obsnet.report.write_json``)."""
    write_json(path, record, "--obsnet_file")


def _threshold_of(value, where: str) -> float:
    """A recorded threshold or rate: a number, null (NaN) or "inf" / "-inf" (UsageError
    otherwise)."""
    if value is None:
        return math.nan
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if value in ("inf", "-inf"):
        return float(value)
    raise UsageError(f"{where}: a threshold is not a number ({str(value)[:40]!r})")


def _check_header(record, where: str) -> None:
    """UsageError unless the file's split, image count, targets and settings are data of the
    expected types."""
    targets, settings = record.get("targets"), record.get("settings")
    ok = (isinstance(record.get("split"), str) and type(record.get("images")) is int
          and isinstance(targets, dict) and _is_share(targets.get("tpr"))
          and (targets.get("risk") is None or _is_share(targets.get("risk")))
          and isinstance(settings, dict) and set(SETTINGS) <= set(settings)
          and (record.get("observer") is None or isinstance(record.get("observer"), str)))
    if not ok:
        raise UsageError(f"{where}: its split, images, targets, settings or observer entry is "
                         f"not what {WRITER} writes; run --fit_threshold again")


def _is_share(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and 0 <= value <= 1


def load_thresholds(path: Path, segmenter: str) -> dict:
    """The checked content of a thresholds file written for this segmenter; UsageError in one
    line otherwise (which methods it still applies to: ``stale_methods``)."""
    where = f"{path}"
    try:
        record = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UsageError(f"{where}: not a thresholds file of {WRITER} ({exc})") from None
    if not isinstance(record, dict) or record.get("written_by") != WRITER \
            or not isinstance(record.get("methods"), dict):
        raise UsageError(f"{where}: not a thresholds file of {WRITER}")
    _check_header(record, where)
    if record.get("segmenter") != segmenter:
        raise UsageError(f"{where}: fitted for another segmenter than --segnet_file; run "
                         f"--fit_threshold again (or move the file away)")
    methods = {}
    for name, points in record["methods"].items():
        if not isinstance(points, dict) or not set(points) <= set(KINDS) or not all(
                isinstance(p, dict) and isinstance(p.get("fit"), dict) for p in points.values()):
            raise UsageError(f"{where}: its entry for {str(name)[:40]!r} is not a set of "
                             f"operating points")
        methods[name] = {kind: {"threshold": _threshold_of(p.get("threshold"), where),
                                "fit": {k: _threshold_of(v, where) for k, v in p["fit"].items()}}
                         for kind, p in points.items()}
    return record | {"methods": methods}



def alarm_logit(value: str, obsnet_file, segmenter, observer) -> float:
    """The observer-logit threshold of ``--threshold VALUE`` (inference.py, the ONNX export):
    one of ``KINDS`` reads the observer's operating point from its thresholds file (checked
    for these networks: ``segmenter``, ``observer`` loaded); a number p in (0, 1) is a
    probability of error, logit log(p / (1 - p)). UsageError in one line otherwise."""
    if value in KINDS:
        path = thresholds_path(obsnet_file)
        if not path.is_file():
            raise UsageError(f"--threshold {value}: {path} not found; run main.py "
                             f"--fit_threshold with this --obsnet_file first")
        record = load_thresholds(path, weights_fingerprint(segmenter))
        stale = stale_methods(record, weights_fingerprint(observer),
                              {**record["settings"]}).get("obsnet")
        if stale:
            raise UsageError(f"--threshold {value}: {path}: {stale}; run main.py --fit_threshold "
                             f"again")
        point = record["methods"].get("obsnet", {}).get(value)
        if point is None:
            raise UsageError(f"--threshold {value}: {path} holds no {value} threshold for the "
                             f"observer (fit it with --test_multi obsnet"
                             f"{' --target_risk R' if value == 'risk' else ''})")
        if math.isnan(point["threshold"]):
            raise UsageError(f"--threshold {value}: {path} could not fit it ({record['images']} "
                             f"images on {record['split']}: too few for the target); choose "
                             f"another operating point")
        return point["threshold"]
    try:
        prob = float(value)
    except ValueError:
        prob = float("nan")
    if not 0 < prob < 1:
        raise UsageError(f"--threshold {value}: give {', '.join(KINDS)} (fitted by "
                         f"--fit_threshold) or a probability of error in (0, 1)")
    return math.log(prob / (1 - prob))
