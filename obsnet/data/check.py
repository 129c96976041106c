"""Check a dataset folder before a long run: every listed file read once, problems collected.

    python -m obsnet.check --data NAME --dset_folder PATH [--splits S ...] [--workers N]

Reports, per split: the split file and its image count; missing or unreadable files;
image / label size mismatches; label values the dataset cannot have (the benchmarks': raw
values other than 0, 1, 255, which the loader reads as void); labels with every pixel ignored;
frames a benchmark's loader refuses (one frame in two files) or leaves out (images of a format
its layout does not name); anomaly and ignore pixel counts; per-class pixel shares (%). The
listing, path resolution and label decoding are the loaders' own
(``obsnet.data.loaders.DATASETS``); no transform or resize is applied.
Exit status: 0 when nothing is wrong, 1 when a problem was found, 2 for a usage error.
"""
import sys
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

from obsnet.data.base import (Pair, PairDataset, check_ids, check_size, label_counts, max_label_id,
                              read_image, read_label)
from obsnet.data.errors import DatasetError
from obsnet.data.loaders import DATASETS
from obsnet.data.specs import SPECS, DatasetSpec

MAX_SHOWN = 50  # problems printed; the count is always complete


@dataclass
class SplitReport:
    """What one split holds: its file, readable pairs, pixel counts per id, problems."""

    split: str
    list_file: Path | None = None
    pairs: list[Pair] = field(default_factory=list)
    images: int = 0  # pairs whose label could be read
    anomaly_images: int = 0
    counts: np.ndarray = field(default_factory=lambda: np.zeros(256, np.int64))
    problems: list[str] = field(default_factory=list)


def list_split(builder: type[PairDataset], root: Path, split: str) -> SplitReport:
    """The split's listing, with every bad line or missing file recorded."""
    report = SplitReport(split)
    try:
        report.list_file, report.pairs = builder.read_pairs(root, split, report.problems)
    except DatasetError as exc:
        report.problems.append(str(exc))
    return report


def _attempt(problems: list[str], fn, *args):
    """``fn(*args)``, or None with its DatasetError recorded in ``problems``."""
    try:
        return fn(*args)
    except DatasetError as exc:
        problems.append(str(exc))
        return None


def inspect_pair(builder: type[PairDataset], spec: DatasetSpec,
                 pair: Pair) -> tuple[np.ndarray | None, list[str]]:
    """Read one pair as the loader does: (label id counts or None if unreadable, problems)."""
    problems: list[str] = []
    image = _attempt(problems, read_image, pair.image, pair.source)
    if pair.label is None:  # hidden labels (a benchmark's test split): the image only
        return (None if image is None else np.zeros(256, np.int64)), problems
    raw = _attempt(problems, read_label, pair.label, pair.source)
    if raw is None:
        return None, problems
    _attempt(problems, builder.check_raw, raw, pair)
    label = _attempt(problems, builder.decode_pair, raw, spec, pair)
    if label is None:
        return None, problems
    counts = label_counts(label)
    if image is not None:
        _attempt(problems, check_size, image, label, pair)
    _attempt(problems, check_ids, counts, spec, pair, builder.raw_offset)
    _attempt(problems, check_labelled, counts, spec, pair)
    return counts, problems


def check_labelled(counts: np.ndarray, spec: DatasetSpec, pair: Pair) -> None:
    """DatasetError when every pixel of the label is the ignore id: nothing to learn or score
    (training skips a batch made only of such labels, and counts it)."""
    if spec.ignore_id is not None and counts[spec.ignore_id] == counts.sum():
        raise DatasetError(f"{pair.source}: annotation {pair.label}: every pixel is the ignore "
                           f"id {spec.ignore_id} (nothing to learn or score)")


def inspect_all(builder, spec, reports: list[SplitReport], workers: int) -> None:
    """Read every listed pair once (threads: image decoding releases the GIL), with a bar."""
    jobs = [(report, pair) for report in reports for pair in report.pairs]
    with ThreadPoolExecutor(max(1, workers)) as pool, \
            tqdm(total=len(jobs), desc="check", unit="img", file=sys.stderr) as bar:
        results = pool.map(lambda job: inspect_pair(builder, spec, job[1]), jobs)
        for (report, _), (counts, problems) in zip(jobs, results):
            report.problems.extend(problems)
            if counts is not None:
                report.images += 1
                report.counts += counts
                report.anomaly_images += bool(counts[list(spec.anomaly_ids)].sum())
            bar.update()


def _id_names(spec: DatasetSpec) -> list[tuple[str, list[int]]]:
    """Table rows: (name, ids) for every class and anomaly id, then ignore."""
    rows = [(f"{i} {spec.class_names[i]}" if i < spec.nclass
             else f"{i} in-distribution" if i == spec.inlier_id else f"{i} anomaly", [i])
            for i in range(max_label_id(spec) + 1)]
    if spec.ignore_id is not None:
        rows.append((f"{spec.ignore_id} ignore", [spec.ignore_id]))
    return rows


def format_summary(spec: DatasetSpec, reports: list[SplitReport]) -> list[str]:
    """Per split: file, images, anomaly pixels / images, ignore pixels, problem count."""
    lines = [f"{'split':<12}{'split file':<20}{'images':>8}{'anomaly px':>13}"
             f"{'anomaly img':>13}{'ignore px':>12}{'problems':>10}"]
    for r in reports:
        anomaly = int(r.counts[list(spec.anomaly_ids)].sum())
        ignore = int(r.counts[spec.ignore_id]) if spec.ignore_id is not None else 0
        name = r.list_file.name if r.list_file else "-"
        lines.append(f"{r.split:<12}{name:<20}{r.images:>8}{anomaly:>13}"
                     f"{r.anomaly_images:>13}{ignore:>12}{len(r.problems):>10}")
    return lines


def format_shares(spec: DatasetSpec, reports: list[SplitReport]) -> list[str]:
    """Per-id pixel shares (% of all the split's pixels), one column per split."""
    lines = ["pixel shares (% of each split's pixels)",
             f"{'id class':<22}" + "".join(f"{r.split:>11}" for r in reports)]
    totals = [max(int(r.counts.sum()), 1) for r in reports]
    for name, ids in _id_names(spec):
        shares = [100 * r.counts[ids].sum() / t for r, t in zip(reports, totals)]
        lines.append(f"{name:<22}" + "".join(f"{s:>11.2f}" for s in shares))
    return lines


def format_problems(reports: list[SplitReport]) -> list[str]:
    """Every problem (the first MAX_SHOWN), then the verdict."""
    problems = [p for r in reports for p in r.problems]
    if not problems:
        return ["OK: no problem found"]
    lines = [f"problems ({len(problems)}):"] + [f"  {p}" for p in problems[:MAX_SHOWN]]
    if len(problems) > MAX_SHOWN:
        lines.append(f"  ... and {len(problems) - MAX_SHOWN} more")
    return lines + [f"FAILED: {len(problems)} problem(s) found"]


def check(name: str, root: Path, splits: Sequence[str] | None = None,
          workers: int = 4) -> tuple[list[str], bool]:
    """Check a dataset folder: (report lines, True when no problem was found)."""
    builder, spec = DATASETS[name], SPECS[name]
    root = root.expanduser().absolute()
    header = f"obsnet.check: {name} in {root}"
    if not root.is_dir():
        return [header, f"FAILED: dataset folder not found: {root}"], False
    default = getattr(builder, "check_splits", ()) or builder.splits
    reports = [list_split(builder, root, split) for split in splits or default]
    inspect_all(builder, spec, reports, workers)
    lines = [header, *format_summary(spec, reports), "", *format_shares(spec, reports), "",
             *format_problems(reports)]
    return lines, not any(r.problems for r in reports)
