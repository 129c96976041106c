"""Cityscapes (gtFine) in the cityscapesScripts layout: 19 classes, 255 ignored.

Layout (as downloaded: leftImg8bit_trainvaltest.zip and gtFine_trainvaltest.zip)::

    Cityscapes/
        leftImg8bit/{train,val}/<city>/<city>_<seq>_<frame>_leftImg8bit.png
        gtFine/{train,val}/<city>/<city>_<seq>_<frame>_gtFine_labelTrainIds.png
                                 (or ..._gtFine_labelIds.png)

``*_gtFine_labelTrainIds.png`` (written by cityscapesScripts' ``createTrainIdLabelImgs``)
holds the train ids 0..18 and 255 directly and is preferred. When only
``*_gtFine_labelIds.png`` exists, its label ids are mapped to train ids with the official
table (``LABEL_TO_TRAIN``). The splits are the folders ``train`` and ``val``; the test
labels are not public, so evaluation (``test_split``) uses ``val``. Cityscapes has no
anomaly class: evaluation reports the error-detection metrics, the OOD ones are n/a.
"""
from pathlib import Path

import numpy as np
import torch
from torchvision import tv_tensors

from obsnet.data.base import Pair, PairDataset, parse_all, require_dir
from obsnet.data.errors import DatasetError
from obsnet.data.specs import DatasetSpec

IMAGE_SUFFIX = "_leftImg8bit.png"
TRAIN_IDS_SUFFIX = "_gtFine_labelTrainIds.png"
LABEL_IDS_SUFFIX = "_gtFine_labelIds.png"
IGNORE = 255

# label id -> train id, from the ``labels`` table of cityscapesScripts
# (github.com/mcordts/cityscapesScripts, cityscapesscripts/helpers/labels.py): the 19 ids
# with a train id 0..18; every other id of the table (0..6 void, 9 parking, 10 rail track,
# 14 guard rail, 15 bridge, 16 tunnel, 18 polegroup, 29 caravan, 30 trailer) has train id
# 255, and license plate (id -1, train id -1) is never written to a labelIds image.
TRAIN_ID_OF = {7: 0, 8: 1, 11: 2, 12: 3, 13: 4, 17: 5, 19: 6, 20: 7, 21: 8, 22: 9, 23: 10,
               24: 11, 25: 12, 26: 13, 27: 14, 28: 15, 31: 16, 32: 17, 33: 18}
N_LABEL_IDS = 34  # label ids 0..33 are defined; a larger value is not a Cityscapes label id
UNKNOWN = 254  # marks the values of a labelIds file that are no label id (an error)

LABEL_TO_TRAIN = np.full(256, UNKNOWN, dtype=np.uint8)
LABEL_TO_TRAIN[:N_LABEL_IDS] = IGNORE
for _label_id, _train_id in TRAIN_ID_OF.items():
    LABEL_TO_TRAIN[_label_id] = _train_id


def label_ids_to_train_ids(label_ids: np.ndarray) -> np.ndarray:
    """Cityscapes label ids (uint8 array) -> train ids 0..18 / 255; a value that is no label
    id (34..255) becomes ``UNKNOWN``."""
    return LABEL_TO_TRAIN[label_ids]


def _frame_pair(image: Path, gt_city: Path) -> Pair:
    """The image and its gtFine label (labelTrainIds preferred), or a DatasetError naming
    the image and the label file looked for."""
    stem = image.name[:-len(IMAGE_SUFFIX)]
    train_ids, label_ids = gt_city / f"{stem}{TRAIN_IDS_SUFFIX}", gt_city / f"{stem}{LABEL_IDS_SUFFIX}"
    for label in (train_ids, label_ids):
        if label.is_file():
            return Pair(image, label, str(image))
    raise DatasetError(f"{image}: annotation file not found: {train_ids} "
                       f"(nor {label_ids.name})")


class Cityscapes(PairDataset):
    """Cityscapes gtFine: splits ``train`` / ``val``, frames of every city in sorted order."""

    splits = ("train", "val")
    default_spec = "Cityscapes"

    @classmethod
    def read_pairs(cls, root: Path, split: str,
                   problems: list[str] | None = None) -> tuple[Path, list[Pair]]:
        """``root/leftImg8bit/{split}`` and its frames paired with their gtFine labels."""
        require_dir(root)
        images, labels = root / "leftImg8bit" / split, root / "gtFine" / split
        for folder in (images, labels):
            if not folder.is_dir():
                raise DatasetError(f"split folder not found: {folder} (split '{split}')")
        frames = sorted(images.glob(f"*/*{IMAGE_SUFFIX}"))
        if not frames:
            raise DatasetError(f"{images}: no <city>/*{IMAGE_SUFFIX} frame found")
        return images, parse_all(frames, lambda image: _frame_pair(image, labels / image.parent.name),
                                 problems)

    @classmethod
    def decode_pair(cls, label: tv_tensors.Mask, spec: DatasetSpec,
                    pair: Pair) -> tv_tensors.Mask:
        """labelTrainIds as they are; labelIds through ``LABEL_TO_TRAIN`` (a value that is
        no Cityscapes label id is a DatasetError naming the file)."""
        if not pair.label.name.endswith(LABEL_IDS_SUFFIX):
            return label
        raw = label.as_subclass(torch.Tensor).numpy()
        mapped = label_ids_to_train_ids(raw)
        if (mapped == UNKNOWN).any():
            bad = ", ".join(str(v) for v in np.unique(raw[mapped == UNKNOWN]))
            raise DatasetError(f"{pair.source}: annotation {pair.label}: values {bad} are no "
                               f"Cityscapes label id (0..{N_LABEL_IDS - 1})")
        return tv_tensors.Mask(torch.from_numpy(mapped))
