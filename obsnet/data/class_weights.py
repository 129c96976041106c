"""Median-frequency class weights for the SegNet's cross-entropy (Eigen & Fergus, 2015), as
SegNet weighs CamVid's classes: weight(c) = median(freq) / freq(c), where freq(c) is the
pixels of class c over the pixels of the training images in which c appears. Its square root
is a softer balance: rare classes gain less, so frequent ones (buildings) are not given up."""
import numpy as np
import torch
from tqdm import tqdm

from obsnet.data.base import PairDataset, label_counts, read_label

# main.py --class_weights: each choice's exponent of median(freq) / freq(c) ("none": unweighted)
WEIGHTING_POWERS = {"median_freq": 1.0, "sqrt_median_freq": 0.5}
WEIGHTINGS = ("none", *WEIGHTING_POWERS)


def class_frequencies(dataset: PairDataset, nclass: int, progress: bool = True) -> np.ndarray:
    """freq(c) of every class 0 .. nclass - 1 over the label files of ``dataset`` (at their
    own resolution); NaN for a class that appears in no image."""
    pixels = np.zeros(nclass, dtype=np.float64)
    image_pixels = np.zeros(nclass, dtype=np.float64)
    for pair in tqdm(dataset.samples, desc="Class frequencies", leave=False, disable=not progress):
        label = dataset.decode(read_label(pair.label, pair.source), dataset.spec)
        counts = label_counts(label)[:nclass].astype(np.float64)
        pixels += counts
        image_pixels += (counts > 0) * label.numel()
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(image_pixels > 0, pixels / image_pixels, np.nan)


def median_frequency_weights(freq: np.ndarray, power: float = 1.0) -> torch.Tensor:
    """(median(freq) / freq(c)) ** power over the classes that appear; 0 for those that never
    do (they have no pixel to weigh)."""
    present = ~np.isnan(freq) & (freq > 0)
    if not present.any():
        raise ValueError("median-frequency weights: no class appears in the training labels")
    weights = np.zeros_like(freq)
    weights[present] = (np.median(freq[present]) / freq[present]) ** power
    return torch.tensor(weights, dtype=torch.float32)
