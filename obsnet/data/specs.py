"""Dataset specification registry: every per-dataset number lives here, once."""
from dataclasses import dataclass, replace

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class DatasetSpec:
    """Static facts and training presets of one dataset.

    Label ids ``0 .. nclass - 1`` are the classes the SegNet predicts (``void_id``, when set,
    is one of them); ``anomaly_ids`` only appear in OOD splits; ``ignore_id`` marks pixels
    that count nowhere.
    """

    name: str
    size: tuple[int, int]  # (H, W) the images are resized to
    crop: tuple[int, int]  # pixels cropped at random from (H, W) before the resize, in training
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    pos_weight: float  # BCE weight of the "SegNet is wrong" pixels
    patch_size: tuple[int, int, int, int]  # attack region (H, W), shape size (min, max), at `size`
    class_names: tuple[str, ...]  # names of the ids 0 .. nclass - 1
    colors: tuple[tuple[int, int, int], ...]  # RGB per id, anomaly ids included
    anomaly_ids: tuple[int, ...]
    void_id: int | None = None  # a predicted class left out of mIoU and of OOD negatives
    # The output whose raw logit the "void" method reads, as the original: CamVid's Void,
    # StreetHazards' "other"; -1: the last output (the original's choice for BDD-Anomaly).
    void_logit: int | None = None
    ignore_id: int | None = 255
    train_split: str = "train"
    val_split: str = "val"
    test_split: str = "test_ood"
    # An id for pixels known to be in-distribution but of no known class (anomaly benchmarks
    # label only in-distribution / anomaly / void): OOD negatives, outside the error protocol
    # and mIoU. A spec with it has no class ground truth: its error metrics are not reported.
    inlier_id: int | None = None
    test_only: bool = False  # no training split: only --test_only may use it

    @property
    def nclass(self) -> int:
        """Number of classes the segmentation network predicts."""
        return len(self.class_names)


CAMVID_CLASSES = ("Sky", "Building", "Pole", "Road", "Sidewalk", "Tree", "SignSymbol",
                  "Fence", "Car", "Pedestrian", "Bicyclist", "Void")
CAMVID_COLORS = ((128, 128, 128), (128, 0, 0), (192, 192, 128), (128, 64, 128), (0, 0, 192),
                 (128, 128, 0), (192, 128, 128), (64, 64, 128), (64, 0, 128), (64, 64, 0),
                 (0, 128, 192), (0, 0, 0), (255, 255, 0))

SPECS: dict[str, DatasetSpec] = {
    "CamVid": DatasetSpec(
        name="CamVid", size=(360, 480), crop=(50, 80),
        mean=(0.4108, 0.4240, 0.4316), std=(0.3066, 0.3111, 0.3068), pos_weight=2.0,
        patch_size=(128, 128, 60, 80), class_names=CAMVID_CLASSES, colors=CAMVID_COLORS,
        anomaly_ids=(12,), void_id=11, void_logit=11),
    # Generated road scenes in the CamVid layout and label set (obsnet/data/synthetic.py).
    "Synthetic": DatasetSpec(
        name="Synthetic", size=(96, 128), crop=(12, 16),
        mean=(0.45, 0.45, 0.45), std=(0.25, 0.25, 0.25), pos_weight=2.0,
        patch_size=(40, 40, 14, 22), class_names=CAMVID_CLASSES, colors=CAMVID_COLORS,
        anomaly_ids=(12,), void_id=11, void_logit=11),
    "StreetHazard": DatasetSpec(
        name="StreetHazard", size=(360, 640), crop=(80, 150),
        mean=IMAGENET_MEAN, std=IMAGENET_STD, pos_weight=3.0, patch_size=(300, 360, 160, 200),
        class_names=("unlabeled", "building", "fence", "other", "pedestrian", "pole",
                     "road line", "road", "sidewalk", "vegetation", "car", "wall",
                     "traffic sign"),
        colors=((0, 0, 0), (70, 70, 70), (190, 153, 153), (250, 170, 160), (220, 20, 60),
                (153, 153, 153), (157, 234, 50), (128, 64, 128), (244, 35, 232),
                (107, 142, 35), (0, 0, 142), (102, 102, 156), (220, 220, 0), (255, 255, 255)),
        anomaly_ids=(13,), void_id=0, void_logit=3, train_split="train", val_split="validation",
        test_split="test"),
    "BddAnomaly": DatasetSpec(
        name="BddAnomaly", size=(360, 640), crop=(80, 150),
        mean=(0.3698, 0.4145, 0.4247), std=(0.2525, 0.2695, 0.2870), pos_weight=3.0,
        patch_size=(300, 360, 160, 200),
        class_names=("other", "road", "sidewalk", "building", "wall", "fence", "pole",
                     "traffic light", "traffic sign", "vegetation", "terrain", "sky",
                     "person", "rider", "car", "truck", "bus"),
        colors=((0, 0, 0), (128, 64, 128), (244, 35, 232), (70, 70, 70), (102, 102, 156),
                (190, 153, 153), (153, 153, 153), (250, 170, 30), (220, 220, 0),
                (107, 142, 35), (152, 251, 152), (70, 130, 180), (220, 20, 60), (255, 0, 0),
                (0, 0, 142), (0, 0, 70), (0, 60, 100), (255, 255, 255), (255, 255, 255),
                (255, 255, 255)),
        anomaly_ids=(17, 18, 19), void_id=0, void_logit=-1, train_split="train", val_split="validation",
        test_split="test"),
    # Cityscapes gtFine, 19 train ids (obsnet/data/cityscapes.py); names and colours are the
    # official ones of cityscapesScripts' helpers/labels.py. Files are 1024×2048; the preset
    # is the common half resolution 512×1024 (sides divisible by 32 for SegNet's 5 poolings).
    # Mean/std: ImageNet's, the usual choice for Cityscapes (pretrained backbones expect it).
    # crop, pos_weight and patch_size: StreetHazards' / BDD's (the same kind of road scenes,
    # the same error rates to expect), the pixel sizes scaled from their 360×640 to 512×1024
    # (×1.42 in H, ×1.6 in W; the shape sizes by the smaller factor).
    # No anomaly class (train/val only; test labels are hidden): evaluation on val scores
    # error detection, the OOD metrics are n/a. No void class either: the unlabelled ids are
    # the ignore id 255, so void_id / void_logit are None (the "void" method is refused).
    "Cityscapes": DatasetSpec(
        name="Cityscapes", size=(512, 1024), crop=(114, 240),
        mean=IMAGENET_MEAN, std=IMAGENET_STD, pos_weight=3.0, patch_size=(426, 576, 228, 284),
        class_names=("road", "sidewalk", "building", "wall", "fence", "pole", "traffic light",
                     "traffic sign", "vegetation", "terrain", "sky", "person", "rider", "car",
                     "truck", "bus", "train", "motorcycle", "bicycle"),
        colors=((128, 64, 128), (244, 35, 232), (70, 70, 70), (102, 102, 156),
                (190, 153, 153), (153, 153, 153), (250, 170, 30), (220, 220, 0),
                (107, 142, 35), (152, 251, 152), (70, 130, 180), (220, 20, 60), (255, 0, 0),
                (0, 0, 142), (0, 0, 70), (0, 60, 100), (0, 80, 100), (0, 0, 230),
                (119, 11, 32)),
        anomaly_ids=(), void_id=None, void_logit=None, train_split="train", val_split="val",
        test_split="val"),
}



def anomaly_benchmark(name: str, split: str, base: DatasetSpec) -> DatasetSpec:
    """An evaluation-only anomaly benchmark (obsnet/data/smiyc.py) for a segmenter trained on
    ``base``: its classes, normalisation and size; labels hold only anomaly (id ``nclass``),
    in-distribution (id ``nclass + 1``) and void (255), so the error metrics and mIoU are not
    applicable."""
    n = base.nclass
    colors = (*base.colors[:n], *[(128, 128, 128)] * (n - len(base.colors[:n])))
    return DatasetSpec(
        name=name, size=base.size, crop=base.crop, mean=base.mean, std=base.std,
        pos_weight=base.pos_weight, patch_size=base.patch_size, class_names=base.class_names,
        colors=(*colors, (255, 255, 255), (64, 64, 64)),  # anomaly, inlier
        anomaly_ids=(n,), inlier_id=n + 1, void_id=None, void_logit=None, train_split=split,
        val_split=split, test_split=split, test_only=True)


# SegmentMeIfYouCan's AnomalyTrack / ObstacleTrack validation frames and Fishyscapes Lost &
# Found validation, as the road_anomaly_benchmark code reads them. By default for a
# Cityscapes segmenter; a segmenter checkpoint that records its preset brings its own
# (obsnet/preset.py).
BENCHMARK_SPLITS = {"RoadAnomaly21": "validation", "RoadObstacle21": "validation",
                    "FishyscapesLAF": "val"}
for _name, _split in BENCHMARK_SPLITS.items():
    SPECS[_name] = anomaly_benchmark(_name, _split, SPECS["Cityscapes"])


def bravo_spec(base: DatasetSpec) -> DatasetSpec:
    """The BRAVO benchmark (obsnet/data/bravo.py) for a segmenter trained on ``base``: its
    classes, normalisation and size; labels hidden, test only. The benchmark scores the 19
    Cityscapes classes: ``base`` must be a Cityscapes-trained segmenter's."""
    return replace(base, name="BRAVO", anomaly_ids=(), void_id=None, void_logit=None,
                   inlier_id=None, train_split="all", val_split="all", test_split="all",
                   test_only=True)


# Test-only presets built on the segmenter's own (obsnet/preset.py), besides BENCHMARK_SPLITS.
UNLABELLED_PRESETS = {"BRAVO": bravo_spec}
SPECS["BRAVO"] = bravo_spec(SPECS["Cityscapes"])
