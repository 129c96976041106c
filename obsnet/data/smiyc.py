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
value is void. The ``test`` splits are the frames scored without labels: the leaderboard's, whose labels
are hidden (AnomalyTrack's images not named ``validation*``, ``AnomalyTrack-test``;
ObstacleTrack's images of the official ``ObstacleTrack-test`` scenes), and for Fishyscapes
LostAndFound's ``test`` images (``LostAndFound-test``; LostAndFound's own coarse labels are not
read). Their frames get labels of void only, so they serve ``--export_scores`` and nothing is
scored on them. They decode to the spec's ``inlier_id`` (in-distribution of no known class),
its anomaly id and the ignore id. The split is ``validation`` (the tracks) or ``val``
(Fishyscapes); there is no training split. ObstacleTrack's validation split leaves out the
frames the official ``ObstacleTrack-validation`` excludes (prefixes ``validation_19``,
``validation_21`` .. ``validation_29``). Fishyscapes' frames are its label files; each
image is looked for in LostAndFound's ``train`` then ``test`` split (png, webp, jpg).
"""
from pathlib import Path

import torch
from torchvision import tv_tensors

from obsnet.data.camvid import Pair, PairDataset, parse_all, require_dir
from obsnet.data.errors import DatasetError
from obsnet.data.specs import DatasetSpec

USUAL, ANOMALY, VOID = 0, 1, 255  # the benchmark's label file values
LABEL_SUFFIX = "_labels_semantic.png"
FISHY_SUFFIX = "_fishy-labels.png"
LAF_IMAGE_SUFFIX = "_leftImg8bit"
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


def _track_root(root: Path, folder: str, marker: str) -> Path:
    """The track's folder: ``root`` itself when it holds ``marker``, else ``root/folder``."""
    require_dir(root)
    if (root / marker).is_dir():
        return root
    if (root / folder).is_dir():
        return root / folder
    raise DatasetError(f"{root}: neither a {folder} folder nor one holding {marker}/")


def _labelled(image: Path, labels: Path) -> Pair:
    """An image and its ``<stem>_labels_semantic.png``, or a DatasetError naming both."""
    label = labels / f"{image.stem}{LABEL_SUFFIX}"
    if not label.is_file():
        raise DatasetError(f"{image}: annotation file not found: {label}")
    return Pair(image, label, str(image))


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
        frames = sorted(p for p in images.glob(f"*.{cls.ext}") if cls.in_split(p.stem, split))
        if not frames:
            raise DatasetError(f"{images}: no *.{cls.ext} frame of split '{split}' found")
        if split == "test":
            return images, [Pair(image, None, str(image)) for image in frames]
        return images, parse_all(frames, lambda image: _labelled(image, labels), problems)

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
    """LostAndFound's image of frame ``fid`` (train, then test split), or None."""
    scene = "_".join(fid.split("_")[:-2])  # <NN>_<scene name>: all but seq and time
    for split in ("train", "test"):
        for fmt in LAF_FORMATS:
            path = laf / "leftImg8bit" / split / scene / f"{fid}{LAF_IMAGE_SUFFIX}.{fmt}"
            if path.is_file():
                return path
    return None


def _laf_test_pairs(laf: Path) -> list[Pair]:
    """LostAndFound's test images (the first format found of png, webp, jpg), without labels."""
    folder = laf / "leftImg8bit" / "test"
    for fmt in LAF_FORMATS:
        images = sorted(folder.glob(f"*/*{LAF_IMAGE_SUFFIX}.{fmt}"))
        if images:
            return [Pair(image, None, str(image)) for image in images]
    raise DatasetError(f"{folder}: no *{LAF_IMAGE_SUFFIX}.png/webp/jpg image found (split 'test')")


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
            return laf / "leftImg8bit" / "test", _laf_test_pairs(laf)
        labels = fishy / "labels" / split
        found = sorted(labels.glob(f"*{FISHY_SUFFIX}"))
        if not found:
            raise DatasetError(f"{labels}: no *{FISHY_SUFFIX} label found (split '{split}')")

        def pair(label: Path) -> Pair:
            fid = label.name[:-len(FISHY_SUFFIX)]
            image = _laf_image(laf, fid)
            if image is None:
                raise DatasetError(f"{label}: image file not found: {fid}{LAF_IMAGE_SUFFIX}.png "
                                   f"under {laf / 'leftImg8bit'}/{{train,test}}/")
            return Pair(image, label, str(label))

        return labels, parse_all(found, pair, problems)

    @classmethod
    def decode(cls, label: tv_tensors.Mask, spec: DatasetSpec) -> tv_tensors.Mask:
        return decode_benchmark(label, spec)

