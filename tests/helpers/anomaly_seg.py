"""StreetHazards and BDD-Anomaly folders in anomaly-seg's layout (``.odgt`` lists, raw label
values = ids + 1; small 24×40 images)."""
import json
from pathlib import Path

import numpy as np
from PIL import Image

from obsnet.data.specs import SPECS

H, W = 24, 40

COUNTS = {"train": 4, "validation": 2, "test": 2}


def raw_label(spec, anomalies: bool, rng) -> np.ndarray:
    """Raw file values (ids + 1): random classes, an anomaly block, one raw 0 pixel."""
    raw = rng.integers(1, spec.nclass + 1, (H, W), dtype=np.uint8)
    if anomalies:
        for k, anomaly in enumerate(spec.anomaly_ids):
            raw[4:10, 4 + 10 * k:10 + 10 * k] = anomaly + 1
    raw[0, 0] = 0
    return raw


def write_odgt(path: Path, entries: list[dict], form: str) -> None:
    """``array``: one JSON array on a single line; ``lines``: one JSON object per line."""
    if form == "array":
        path.write_text(json.dumps(entries) + "\n")
    else:
        path.write_text("".join(json.dumps(entry) + "\n" for entry in entries))


def write_pair(data_root: Path, img_rel: str, seg_rel: str, raw: np.ndarray, rng) -> dict:
    """Write one image and its raw label; return the odgt entry listing them."""
    for rel in (img_rel, seg_rel):
        (data_root / rel).parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.integers(0, 256, (H, W, 3), dtype=np.uint8)).save(data_root / img_rel)
    Image.fromarray(raw).save(data_root / seg_rel)
    return {"fpath_img": img_rel, "fpath_segm": seg_rel, "width": W, "height": H}


def make_street(root: Path, form: str = "array", train_name: str = "train.odgt") -> Path:
    """StreetHazards: images/{training,validation,test}/t*/N.png + annotations/..., PNG."""
    spec, rng = SPECS["StreetHazard"], np.random.default_rng(0)
    towns = {"train": ("training", "t1-3", train_name),
             "validation": ("validation", "t4", "validation.odgt"),
             "test": ("test", "t5", "test.odgt")}
    for split, (folder, town, name) in towns.items():
        entries = [write_pair(root, f"images/{folder}/{town}/{i}.png",
                              f"annotations/{folder}/{town}/{i}.png",
                              raw_label(spec, split == "test", rng), rng)
                   for i in range(COUNTS[split])]
        write_odgt(root / name, entries, form)
    return root


def make_bdd(root: Path, form: str = "array", test_name: str = "test.odgt",
             nested: bool = False) -> Path:
    """BDD-Anomaly: seg/images/{train,val}/NAME.jpg + seg/train_labels/.../NAME_train_id.png;
    the odgt files in ``root``, the data in ``root`` or (``nested``) ``root/bdd100k``."""
    spec, rng = SPECS["BddAnomaly"], np.random.default_rng(1)
    data_root = root / "bdd100k" if nested else root
    folders = {"train": ("train", "train.odgt"), "validation": ("val", "validation.odgt"),
               "test": ("train", test_name)}  # the anomaly-seg test list points into train/
    for s, (split, (folder, name)) in enumerate(folders.items()):
        names = [f"{0x27eed2 + 97 * (s * 10 + i):08x}-60fb{i:04x}" for i in range(COUNTS[split])]
        entries = [write_pair(data_root, f"seg/images/{folder}/{n}.jpg",
                              f"seg/train_labels/{folder}/{n}_train_id.png",
                              raw_label(spec, split == "test", rng), rng) for n in names]
        write_odgt(root / name, entries, form)
    return root

MAKERS = {"StreetHazard": make_street, "BddAnomaly": make_bdd}
