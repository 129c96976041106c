"""Evaluation-only anomaly benchmarks: SegmentMeIfYouCan's tracks and Fishyscapes Lost & Found.

Layouts, as the official ``road_anomaly_benchmark`` code reads them
(github.com/SegmentMeIfYouCan/road-anomaly-benchmark, ``road_anomaly_benchmark/datasets/``)::

    datasets/                                   (--dset_folder: this folder or the track's)
        dataset_AnomalyTrack/images/validation*.jpg
        dataset_AnomalyTrack/labels_masks/<stem>_labels_semantic.png
        dataset_ObstacleTrack/images/validation_*.webp
        dataset_ObstacleTrack/labels_masks/<stem>_labels_semantic.png
        dataset_FishyLAF/labels/val/<fid>_fishy-labels.png
        dataset_LostAndFound/leftImg8bit/{train,test}/<NN>_<scene>/<fid>_leftImg8bit.png

Label files hold 0 in-distribution, 1 anomaly, 255 void; as the official code, any other
value is void (``python -m obsnet.check`` reports it: ``check_benchmark_values``). The
``test`` splits are the frames scored without labels: the leaderboard's, whose labels are
hidden (AnomalyTrack's images not named ``validation*``, ``AnomalyTrack-test``;
ObstacleTrack's images of the official ``ObstacleTrack-test`` scenes), and for Fishyscapes
LostAndFound's ``test`` images (``LostAndFound-test``; LostAndFound's own coarse labels are not
read). Their frames get labels of void only, so they serve ``--export_scores`` and nothing is
scored on them. They decode to the spec's ``inlier_id`` (in-distribution of no known class),
its anomaly id and the ignore id. The split is ``validation`` (the tracks) or ``val``
(Fishyscapes); there is no training split. ObstacleTrack's validation split leaves out the
frames the official ``ObstacleTrack-validation`` excludes (prefixes ``validation_19``,
``validation_21`` .. ``validation_29``). Fishyscapes' frames are its label files; each
image is looked for in LostAndFound's ``train`` then ``test`` split (png, webp, jpg).

Frames: every file of a format the layout names is read, its extension in any letter case
(``validation0003.JPG``; LostAndFound's png, webp and jpg side by side, where the official
code reads a split in the first of these formats it finds), hidden files (``.*``, e.g.
macOS's ``._x.jpg``) excepted. A frame id held by two files (``x.jpg`` and
``x.JPG``, ``<fid>_leftImg8bit.png`` and ``.webp``) is refused, naming both: its two score
maps would be exported under one name. Images of another format are left out, as the
official code leaves them; ``python -m obsnet.check`` reports each (``read_pairs``'
``problems``).
"""
from collections import defaultdict
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from PIL import Image
from torchvision import tv_tensors

from obsnet.data.base import Pair, PairDataset, parse_all, require_dir
from obsnet.data.errors import DatasetError
from obsnet.data.specs import DatasetSpec

USUAL, ANOMALY, VOID = 0, 1, 255  # the benchmark's label file values
LABEL_SUFFIX = "_labels_semantic.png"
FISHY_SUFFIX = "_fishy-labels.png"
LAF_IMAGE_SUFFIX = "_leftImg8bit"
# What PIL can open: a file of such an extension could be a frame in a format the layout
# does not name (reported as left out by python -m obsnet.check).
IMAGE_EXTENSIONS = frozenset(Image.registered_extensions())
LAF_FORMATS = ("png", "webp", "jpg")
OBSTACLE_EXCLUDED = ("validation_19", *(f"validation_{n}" for n in range(21, 30)))
# ObstacleTrack-test: every scene but the special weather, the night and the validation ones
OBSTACLE_TEST_SCENES = ("curvy-street", "one-way-street", "gravel", "greyasphalt", "motorway",
                        "paving", "darkasphalt", "darkasphalt2")


def decode_benchmark(label: tv_tensors.Mask, spec: DatasetSpec) -> tv_tensors.Mask:
    """Benchmark values -> ids: 0 -> ``spec.inlier_id``, 1 -> the anomaly id, others -> ignore."""
    raw = label.as_subclass(torch.Tensor)
    out = torch.full_like(raw, spec.ignore_id)
    out[raw == USUAL] = spec.inlier_id
    out[raw == ANOMALY] = spec.anomaly_ids[0]
    return tv_tensors.Mask(out)


def check_benchmark_values(raw: tv_tensors.Mask, pair: Pair) -> None:
    """DatasetError naming the label file and its values other than 0, 1 and 255 (the loader
    reads them as void, as the official code does; ``python -m obsnet.check`` reports them)."""
    counts = np.bincount(raw.as_subclass(torch.Tensor).numpy().ravel(), minlength=256)
    counts[[USUAL, ANOMALY, VOID]] = 0
    values = np.flatnonzero(counts)
    if values.size:
        raise DatasetError(f"{pair.source}: annotation {pair.label}: values "
                           f"{', '.join(map(str, values))} ({int(counts.sum())} pixels) are not "
                           f"{USUAL} (in-distribution), {ANOMALY} (anomaly) or {VOID} (void); "
                           f"the loader reads them as void")


class _Found(NamedTuple):
    """Files of one folder by frame id: in a format the layout names, and other images."""

    frames: dict[str, list[Path]]
    others: dict[str, list[Path]]


def _visible_files(folder: Path) -> list[Path]:
    """The files of ``folder`` but hidden ones (none when it is not a folder)."""
    if not folder.is_dir():
        return []
    return [p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".")]


def _by_frame(files: Iterable[Path], suffix: str, formats: tuple[str, ...]) -> _Found:
    """``<fid><suffix>.<ext>`` files by frame id: ``ext`` one of ``formats`` in any letter
    case, or another image extension."""
    found = _Found(defaultdict(list), defaultdict(list))
    for path in files:
        base, dot, ext = path.name.rpartition(".")
        if not dot or not base.endswith(suffix):
            continue
        fid = base[:len(base) - len(suffix)]
        if ext.lower() in formats:
            found.frames[fid].append(path)
        elif f".{ext.lower()}" in IMAGE_EXTENSIONS:
            found.others[fid].append(path)
    return found


def _one_file(fid: str, paths: list[Path]) -> Path:
    """The one file of frame ``fid``; a DatasetError naming every file when there are more."""
    if len(paths) > 1:
        raise DatasetError(f"{' and '.join(map(str, sorted(paths)))}: {len(paths)} files of one "
                           f"frame ({fid}); keep one: a frame is read from one file, and its "
                           f"score maps are exported under its id")
    return paths[0]


def _frames(found: _Found, keep: Callable[[str], bool], problems: list[str] | None,
            formats: str) -> list[tuple[str, Path]]:
    """(frame id, file) of the frames ``keep`` accepts, sorted by file; a frame of several
    files is refused (or recorded in ``problems``, as the images of other formats are: left
    out)."""
    wanted = sorted(fid for fid in found.frames if keep(fid))
    frames = parse_all(wanted, lambda fid: (fid, _one_file(fid, found.frames[fid])), problems)
    if problems is not None:
        problems.extend(f"{path}: left out: only {formats} files are read here (in any letter "
                        f"case), as the official code does"
                        for fid in sorted(found.others) if keep(fid)
                        for path in sorted(found.others[fid]))
    return sorted(frames, key=lambda frame: frame[1])


def _track_root(root: Path, folder: str, marker: str) -> Path:
    """The track's folder: ``root`` itself when it holds ``marker``, else ``root/folder``."""
    require_dir(root)
    if (root / marker).is_dir():
        return root
    if (root / folder).is_dir():
        return root / folder
    raise DatasetError(f"{root}: neither a {folder} folder nor one holding {marker}/")


def _labelled(image: Path, labels: Path, found: _Found) -> Pair:
    """An image and its ``<stem>_labels_semantic.png`` (``found`` in ``labels``), or a
    DatasetError naming both."""
    paths = found.frames.get(image.stem)
    if not paths:
        raise DatasetError(f"{image}: annotation file not found: "
                           f"{labels / (image.stem + LABEL_SUFFIX)}")
    return Pair(image, _one_file(image.stem, paths), str(image))


class _Track(PairDataset):
    """A SegmentMeIfYouCan track: ``images/<fid>.<ext>`` with ``labels_masks/<fid>_labels_semantic.png``."""

    splits = ("validation", "test")
    check_splits = ("validation",)  # python -m obsnet.check's default: the labelled frames
    folder, ext = "", ""
    validation_prefix = "validation"
    excluded: tuple[str, ...] = ()

    @classmethod
    def in_split(cls, stem: str, split: str) -> bool:
        """Whether frame ``stem`` belongs to ``split`` (validation: labelled, test: hidden)."""
        if split == "validation":
            return stem.startswith(cls.validation_prefix) and not stem.startswith(cls.excluded)
        return cls.in_test(stem)

    @classmethod
    def in_test(cls, stem: str) -> bool:
        """Whether frame ``stem`` is one of the leaderboard's test frames."""
        return not stem.startswith("validation")

    @classmethod
    def read_pairs(cls, root: Path, split: str,
                   problems: list[str] | None = None) -> tuple[Path, list[Pair]]:
        if split not in cls.splits:
            raise DatasetError(f"{cls.default_spec}: unknown split '{split}' "
                               f"(known: {', '.join(cls.splits)})")
        track = _track_root(root, cls.folder, "images")
        images, labels = track / "images", track / "labels_masks"
        found = _by_frame(_visible_files(images), "", (cls.ext,))
        frames = [path for _, path in _frames(found, lambda fid: cls.in_split(fid, split),
                                              problems, f".{cls.ext}")]
        if not frames:
            raise DatasetError(f"{images}: no *.{cls.ext} frame of split '{split}' found")
        if split == "test":
            return images, [Pair(image, None, str(image)) for image in frames]
        label_files = _by_frame(_visible_files(labels), LABEL_SUFFIX[:-len(".png")], ("png",))
        return images, parse_all(frames, lambda image: _labelled(image, labels, label_files),
                                 problems)

    @classmethod
    def check_raw(cls, raw: tv_tensors.Mask, pair: Pair) -> None:
        check_benchmark_values(raw, pair)

    @classmethod
    def decode(cls, label: tv_tensors.Mask, spec: DatasetSpec) -> tv_tensors.Mask:
        return decode_benchmark(label, spec)


class RoadAnomaly21(_Track):
    """SegmentMeIfYouCan AnomalyTrack, its 10 labelled validation frames."""

    default_spec = "RoadAnomaly21"
    folder, ext = "dataset_AnomalyTrack", "jpg"


class RoadObstacle21(_Track):
    """SegmentMeIfYouCan ObstacleTrack, its validation frames (off-road pixels are void)."""

    default_spec = "RoadObstacle21"
    folder, ext = "dataset_ObstacleTrack", "webp"
    validation_prefix = "validation_"
    excluded = OBSTACLE_EXCLUDED

    @classmethod
    def in_test(cls, stem: str) -> bool:
        return stem.split("_")[0] in OBSTACLE_TEST_SCENES


def _laf_image(laf: Path, fid: str) -> Path | None:
    """LostAndFound's image of frame ``fid`` (train, then test split; png, webp or jpg), or
    None; a DatasetError when a split holds it in two files."""
    scene = "_".join(fid.split("_")[:-2])  # <NN>_<scene name>: all but seq and time
    for split in ("train", "test"):
        folder = laf / "leftImg8bit" / split / scene
        paths = _by_frame(_visible_files(folder), LAF_IMAGE_SUFFIX, LAF_FORMATS).frames.get(fid)
        if paths:
            return _one_file(fid, paths)
    return None


def _laf_test_pairs(laf: Path, problems: list[str] | None = None) -> list[Pair]:
    """LostAndFound's test images (png, webp and jpg), without labels."""
    folder = laf / "leftImg8bit" / "test"
    scenes = sorted(p for p in folder.iterdir() if p.is_dir()) if folder.is_dir() else []
    found = _by_frame((f for scene in scenes for f in _visible_files(scene)),
                      LAF_IMAGE_SUFFIX, LAF_FORMATS)
    images = _frames(found, lambda fid: True, problems, "/".join(f".{f}" for f in LAF_FORMATS))
    if not images:
        raise DatasetError(f"{folder}: no *{LAF_IMAGE_SUFFIX}.png/webp/jpg image found (split 'test')")
    return [Pair(image, None, str(image)) for _, image in images]


class FishyscapesLAF(PairDataset):
    """Fishyscapes Lost & Found validation: Fishyscapes labels over LostAndFound images; its
    ``test`` split is LostAndFound's test images, read without labels (``LostAndFound-test``)."""

    splits = ("val", "test")
    check_splits = ("val",)  # python -m obsnet.check's default: the labelled frames
    default_spec = "FishyscapesLAF"

    @staticmethod
    def folders(root: Path) -> tuple[Path, Path]:
        """(dataset_FishyLAF, dataset_LostAndFound) from the datasets folder or FishyLAF's."""
        require_dir(root)
        if (root / "labels").is_dir():  # the FishyLAF folder itself
            laf = root if (root / "leftImg8bit").is_dir() else root.parent / "dataset_LostAndFound"
            return root, laf
        fishy, laf = root / "dataset_FishyLAF", root / "dataset_LostAndFound"
        if not fishy.is_dir():
            raise DatasetError(f"{root}: neither a dataset_FishyLAF folder nor one holding labels/")
        return fishy, laf

    @classmethod
    def read_pairs(cls, root: Path, split: str,
                   problems: list[str] | None = None) -> tuple[Path, list[Pair]]:
        if split not in cls.splits:
            raise DatasetError(f"FishyscapesLAF: unknown split '{split}' (known: val, test)")
        fishy, laf = cls.folders(root)
        if not (laf / "leftImg8bit").is_dir():
            raise DatasetError(f"LostAndFound images not found: {laf / 'leftImg8bit'}")
        if split == "test":
            return laf / "leftImg8bit" / "test", _laf_test_pairs(laf, problems)
        labels = fishy / "labels" / split
        found = _frames(_by_frame(_visible_files(labels), FISHY_SUFFIX[:-len(".png")], ("png",)),
                        lambda fid: True, problems, ".png")
        if not found:
            raise DatasetError(f"{labels}: no *{FISHY_SUFFIX} label found (split '{split}')")

        def pair(frame: tuple[str, Path]) -> Pair:
            fid, label = frame
            image = _laf_image(laf, fid)
            if image is None:
                raise DatasetError(f"{label}: image file not found: {fid}{LAF_IMAGE_SUFFIX}"
                                   f".png/webp/jpg under {laf / 'leftImg8bit'}/{{train,test}}/")
            return Pair(image, label, str(label))

        return labels, parse_all(found, pair, problems)

    @classmethod
    def check_raw(cls, raw: tv_tensors.Mask, pair: Pair) -> None:
        check_benchmark_values(raw, pair)

    @classmethod
    def decode(cls, label: tv_tensors.Mask, spec: DatasetSpec) -> tv_tensors.Mask:
        return decode_benchmark(label, spec)

