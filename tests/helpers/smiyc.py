"""SegmentMeIfYouCan and Fishyscapes Lost & Found folders in the road_anomaly_benchmark layout:
frames of different sizes, labels 0 in-distribution, 1 anomaly, 255 void."""
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from obsnet.data.loaders import build_dataset
from obsnet.data.specs import SPECS
from obsnet.models.registry import load_segmenter
from tests.helpers.cityscapes import H, W

SIZES = ((72, 160), (96, 192), (80, 136))  # larger than --size: scores are upsampled


def _label(h: int, w: int, rng, stray: bool = True) -> np.ndarray:
    label = np.zeros((h, w), np.uint8)
    label[: h // 4] = 255  # void band
    # anomaly: large enough (> 900 px) to pass the component size limits
    label[h // 2: h // 2 + h // 4, w // 4: w // 4 + w // 3] = 1
    value = rng.integers(2, 5)  # drawn either way: the same images with or without it
    if stray:  # another value: void, as the official code (python -m obsnet.check reports it)
        label[-2:, :3] = value
    return label


def make_track(datasets: Path, folder: str, stems, ext: str, stray: bool = True) -> Path:
    """``datasets/folder/images/<stem>.<ext>`` + ``labels_masks/<stem>_labels_semantic.png``
    (``stray``: a few label pixels of a value other than 0, 1, 255)."""
    rng = np.random.default_rng(0)
    root = datasets / folder
    (root / "images").mkdir(parents=True)
    (root / "labels_masks").mkdir()
    for stem, (h, w) in zip(stems, SIZES * 4):
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(
            root / "images" / f"{stem}.{ext}")
        Image.fromarray(_label(h, w, rng, stray)).save(
            root / "labels_masks" / f"{stem}_labels_semantic.png")
    return root

ANOMALY_STEMS = ("validation0001", "validation0000", "validation0002")

OBSTACLE_STEMS = ("validation_2", "validation_1", "validation_21", "validation_19")

FISHY = ("04_Maurener_Weg_8_000000_000030", "01_Hanns_Klemm_Str_45_000000_000080")


def make_anomaly(datasets: Path) -> Path:
    root = make_track(datasets, "dataset_AnomalyTrack", ANOMALY_STEMS, "jpg")
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(root / "images" / "cow0000.jpg")  # test
    return root


def make_fishy(datasets: Path) -> tuple[Path, Path]:
    rng = np.random.default_rng(1)
    fishy, laf = datasets / "dataset_FishyLAF", datasets / "dataset_LostAndFound"
    (fishy / "labels" / "val").mkdir(parents=True)
    for fid, split, (h, w) in zip(FISHY, ("train", "test"), SIZES):
        scene = "_".join(fid.split("_")[:-2])
        folder = laf / "leftImg8bit" / split / scene
        folder.mkdir(parents=True)
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(
            folder / f"{fid}_leftImg8bit.png")
        Image.fromarray(_label(h, w, rng)).save(fishy / "labels" / "val" / f"{fid}_fishy-labels.png")
    return fishy, laf


def upsample(score: np.ndarray, size) -> np.ndarray:
    """Bilinear upsampling with PIL (an independent reference for torch's, half-pixel centres)."""
    return np.asarray(Image.fromarray(score.astype(np.float32), mode="F").resize(
        (size[1], size[0]), Image.BILINEAR))


def mcp_reference(segnet_file: Path, datasets: Path):
    """MCP's score maps on RoadAnomaly21's frames (sorted), computed here at --size and
    upsampled with PIL to each label's resolution, and the 0 / 1 / 255 labels."""
    spec = SPECS["RoadAnomaly21"]
    segnet = load_segmenter("segnet", 19, 0.0625, segnet_file)
    maps, labels = [], []
    with torch.no_grad():
        for image, label in build_dataset(spec, datasets, "validation", (H, W)):
            assert image.shape[-2:] == (H, W) and label.shape != (H, W)  # the file's resolution
            probs = torch.softmax(segnet(image[None]).float(), dim=1)[0]
            maps.append(upsample(1 - probs.amax(0).numpy(), label.shape))
            label = label.numpy()
            labels.append(np.where(label == 19, 1, np.where(label != 255, 0, 255)).astype(np.uint8))
    return maps, labels
