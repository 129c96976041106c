"""The building blocks every dataset shares: ``Pair`` (an image / label path pair and the
list-file line naming it), ``parse_all`` (parse entries, raising or collecting errors),
``numbered_lines``, ``read_image`` / ``read_label``, ``label_counts`` / ``invalid_ids`` /
``check_ids`` / ``check_size`` (label and size validation) and ``PairDataset``, the ``torch``
dataset over a list of pairs that every layout (``camvid``, ``cityscapes``, ``odgt``, ``smiyc``)
subclasses."""
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import NamedTuple, TypeVar

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset
from torchvision import tv_tensors
from tqdm import tqdm

from obsnet.data.errors import DatasetError
from obsnet.data.specs import SPECS, DatasetSpec


Sample = tuple[torch.Tensor, torch.Tensor]
Transform = Callable[[tv_tensors.Image, tv_tensors.Mask], Sample]
T = TypeVar("T")
R = TypeVar("R")


class Pair(NamedTuple):
    """One listed sample: image and label paths, and ``source`` = "list_file:line". ``label``
    is None for a frame whose labels are hidden (a benchmark's test split)."""

    image: Path
    label: Path | None
    source: str


def parse_all(items: Iterable[T], parse: Callable[[T], R],
              problems: list[str] | None = None) -> list[R]:
    """``parse`` every item; a DatasetError is raised, or appended to ``problems`` and skipped."""
    out = []
    for item in items:
        try:
            out.append(parse(item))
        except DatasetError as exc:
            if problems is None:
                raise
            problems.append(str(exc))
    return out


def require_dir(root: Path) -> None:
    """DatasetError unless the dataset folder exists."""
    if not root.is_dir():
        raise DatasetError(f"dataset folder not found: {root}")


def numbered_lines(path: Path) -> list[tuple[int, str]]:
    """The non-blank lines of a UTF-8 text file with their 1-based numbers."""
    try:
        text = path.read_text(encoding="utf-8-sig")  # a byte-order mark (Windows editors) dropped
    except (OSError, UnicodeDecodeError) as exc:
        raise DatasetError(f"{path}: cannot be read as text: {exc}") from None
    return [(n, line) for n, line in enumerate(text.splitlines(), start=1) if line.strip()]


def _prefix(where: str) -> str:
    """``"where: "`` for the start of a message, or nothing."""
    return f"{where}: " if where else ""


# What PIL raises for a file it cannot decode: OSError (unreadable, truncated, not an image),
# SyntaxError (some malformed headers) and DecompressionBombError (over twice
# Image.MAX_IMAGE_PIXELS, a guard against files that would fill the memory).
IMAGE_ERRORS = (OSError, SyntaxError, Image.DecompressionBombError)
SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")  # 16-bit grey (PNG: "I;16" or "I")


def image_array(img: Image.Image) -> np.ndarray:
    """An opened image as uint8 H×W×3: grey, palette or alpha images become RGB; 16-bit grey
    is scaled to 8 bits (``convert`` would clip it, turning it white)."""
    if img.mode in SIXTEEN_BIT_MODES:
        grey = np.asarray(img).astype(np.float32) / 257  # 0..65535 -> 0..255
        return np.repeat(grey.clip(0, 255).round().astype(np.uint8)[..., None], 3, axis=2)
    return np.asarray(img.convert("RGB"))


def read_image(path: Path, where: str = "") -> tv_tensors.Image:
    """An image file as a uint8 3×H×W tensor (see ``image_array``); the one image reader of
    training, evaluation, ``obsnet.data.check`` and inference.py.

    ``where`` (the "list_file:line" listing it) starts the error message when given.
    """
    try:
        with Image.open(path) as img:
            array = image_array(img)
    except IMAGE_ERRORS as exc:
        raise DatasetError(f"{_prefix(where)}image {path}: cannot be read: {exc}") from None
    return tv_tensors.Image(torch.from_numpy(array.copy()).permute(2, 0, 1))


def read_label(path: Path, where: str = "") -> tv_tensors.Mask:
    """A single-channel label file (mode L, or P read as its palette indices) as uint8 H×W."""
    try:
        with Image.open(path) as img:
            if img.mode not in ("L", "P"):
                raise DatasetError(f"{_prefix(where)}annotation {path}: expected a "
                                   f"single-channel PNG (mode L or P), got mode {img.mode}")
            array = np.array(img, dtype=np.uint8)
    except IMAGE_ERRORS as exc:
        raise DatasetError(f"{_prefix(where)}annotation {path}: cannot be read: {exc}") from None
    return tv_tensors.Mask(torch.from_numpy(array))


def max_label_id(spec: DatasetSpec) -> int:
    """The largest id a label may hold besides the ignore id (a class or an anomaly)."""
    inlier = () if spec.inlier_id is None else (spec.inlier_id,)
    return max((spec.nclass - 1, *spec.anomaly_ids, *inlier))  # anomaly_ids may be empty


def label_counts(label: torch.Tensor) -> np.ndarray:
    """Pixel count of every uint8 id (256 bins) of one decoded label."""
    # numpy: ~1 ms for 1280×720 on any thread count (torch's bincount slows down when
    # several intra-op threads share busy cores).
    return np.bincount(label.as_subclass(torch.Tensor).numpy().ravel(), minlength=256)


def invalid_ids(counts: np.ndarray, spec: DatasetSpec) -> list[int]:
    """Ids present in ``counts`` that ``spec`` cannot have (not a class, anomaly or ignore id)."""
    top = max_label_id(spec)
    return [int(i) for i in np.flatnonzero(counts) if i > top and i != spec.ignore_id]


def check_ids(counts: np.ndarray, spec: DatasetSpec, pair: Pair, raw_offset: int = 0) -> None:
    """DatasetError naming the label file and its impossible ids (with the raw file values
    when the loader shifts them by ``raw_offset``)."""
    bad = invalid_ids(counts, spec)
    if not bad:
        return
    ignore = "" if spec.ignore_id is None else f" or the ignore id {spec.ignore_id}"
    raw = ""
    if raw_offset:
        values = ", ".join(str((i + raw_offset) % 256) for i in bad)
        raw = f" (raw file values {values}; the loader subtracts {raw_offset})"
    raise DatasetError(f"{pair.source}: annotation {pair.label}: label ids "
                       f"{', '.join(map(str, bad))} not in 0..{max_label_id(spec)}{ignore}{raw}")


def check_size(image: torch.Tensor, label: torch.Tensor, pair: Pair) -> None:
    """DatasetError naming both files when image and label differ in (H, W)."""
    if image.shape[-2:] != label.shape[-2:]:
        raise DatasetError(f"{pair.source}: size mismatch: image {pair.image} is "
                           f"{tuple(image.shape[-2:])}, annotation {pair.label} is "
                           f"{tuple(label.shape[-2:])} (H, W)")


class PairDataset(Dataset):
    """``(image 3×H×W float32, label H×W int64)`` pairs listed by a split file.

    Subclasses define ``read_pairs(root, split, problems=None)`` -> (split file, pairs) (the
    listing, validated at construction: every file exists), ``splits`` (their known split
    names), ``default_spec`` and, when the files do not hold the ids directly,
    ``raw_offset`` / ``decode``. Samples are read lazily; their label ids are checked
    against ``spec`` on every read.

    Args:
        root: dataset folder.
        split: split name (see ``splits``).
        transform: joint transform taking ``(tv_tensors.Image, tv_tensors.Mask)``
            (see ``obsnet.data.transforms``); None returns the uint8 image and int64 label.
        spec: dataset spec the label ids are checked against; ``default_spec`` when None.
        native_labels: apply ``transform`` to the image only; the label keeps the file's
            resolution (evaluation of the benchmark presets: ``obsnet.data.native``).
    """

    splits: tuple[str, ...] = ()
    default_spec: str = ""
    raw_offset: int = 0  # the loader subtracts this from the label file values

    def __init__(self, root: str | Path, split: str, transform: Transform | None = None,
                 spec: DatasetSpec | None = None, native_labels: bool = False):
        self.root = Path(root).expanduser().absolute()
        self.split = split
        self.transform = transform
        self.native_labels = native_labels
        self.spec = spec or SPECS[self.default_spec]
        self.list_file, self.samples = self.read_pairs(self.root, split)
        self.frames: list | None = None  # decoded (image, label) pairs: see cache_frames

    def cache_frames(self, progress: bool = True) -> None:
        """Decode every frame once and keep it in memory (uint8 image and label), so that
        later reads skip the JPEG / PNG decoding; a frame that cannot be read keeps its
        DatasetError, raised when it is read (as without the cache).

        Call it before the DataLoader starts its workers: forked workers share the decoded
        frames with this process (copy-on-write, the tensors' memory is never written); under
        the spawn start method each worker gets its own copy.
        """
        frames = []
        for pair in tqdm(self.samples, desc=f"decode {self.split}", unit="img",
                         disable=not progress, leave=False):
            try:
                frames.append(self.load(pair, self.spec)[:2])
            except DatasetError as exc:
                frames.append(exc)
        self.frames = frames

    def decoded(self, index: int) -> tuple[tv_tensors.Image, tv_tensors.Mask]:
        """Frame ``index`` as read from its files, or from the cache when there is one."""
        if self.frames is None:
            return self.load(self.samples[index], self.spec)[:2]
        frame = self.frames[index]
        if isinstance(frame, DatasetError):
            raise frame
        return frame

    @classmethod
    def read_pairs(cls, root: Path, split: str,
                   problems: list[str] | None = None) -> tuple[Path, list[Pair]]:
        """The split file and its validated pairs (subclasses implement it)."""
        raise NotImplementedError

    @classmethod
    def decode(cls, label: tv_tensors.Mask, spec: DatasetSpec) -> tv_tensors.Mask:
        """Label file values -> dataset ids (identity here)."""
        return label

    @classmethod
    def check_raw(cls, raw: tv_tensors.Mask, pair: Pair) -> None:
        """DatasetError for label file values the loader accepts but the dataset cannot hold
        (``python -m obsnet.check`` only; the benchmarks' 0/1/255). Nothing here."""

    @classmethod
    def decode_pair(cls, label: tv_tensors.Mask, spec: DatasetSpec,
                    pair: Pair) -> tv_tensors.Mask:
        """Label file values of ``pair`` -> dataset ids: ``decode``, unless the decoding
        depends on the file (Cityscapes' labelIds vs labelTrainIds)."""
        return cls.decode(label, spec)

    @classmethod
    def load(cls, pair: Pair, spec: DatasetSpec) -> tuple[tv_tensors.Image, tv_tensors.Mask,
                                                           np.ndarray]:
        """Read, decode and validate one pair: (image, label, per-id pixel counts). A pair
        without a label file gets a label of ignore ids (nothing is scored on it)."""
        image = read_image(pair.image, pair.source)
        if pair.label is None:
            label = tv_tensors.Mask(torch.full(image.shape[-2:], spec.ignore_id, dtype=torch.uint8))
            return image, label, label_counts(label)
        label = cls.decode_pair(read_label(pair.label, pair.source), spec, pair)
        check_size(image, label, pair)
        counts = label_counts(label)
        check_ids(counts, spec, pair, cls.raw_offset)
        return image, label, counts

    def __len__(self) -> int:
        return len(self.samples)

    @property
    def labelled(self) -> bool:
        """False when the split's labels are hidden (pairs without a label file)."""
        return all(pair.label is not None for pair in self.samples)

    def __getitem__(self, index: int) -> Sample:
        image, label = self.decoded(index)
        if self.transform is not None and self.native_labels:
            image = self.transform(image)
        elif self.transform is not None:
            image, label = self.transform(image, label)
        return image.as_subclass(torch.Tensor), label.as_subclass(torch.Tensor).long()

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(root={str(self.root)!r}, split={self.split!r}, "
                f"n={len(self)})")
