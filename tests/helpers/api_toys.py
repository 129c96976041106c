"""A toy segmenter of no known family and a loader of random images for the Python API."""
import torch
import torch.nn as nn
from torch.utils.data import DataLoader, TensorDataset


def toy_segmenter(nclass: int = 4) -> nn.Sequential:
    """A small network of no known family: stem, stride-2 block, classifier, upsampling."""
    return nn.Sequential(
        nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU()),
        nn.Sequential(nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.ReLU(), nn.Dropout(0.2)),
        nn.Conv2d(16, nclass, 1),
        nn.Upsample(scale_factor=2, mode="bilinear"))


def toy_loader(nclass: int = 4, n: int = 8, size=(32, 48)) -> DataLoader:
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(n, 3, *size, generator=generator)
    labels = torch.randint(0, nclass, (n, *size), generator=generator)
    labels[:, :2] = 255
    return DataLoader(TensorDataset(images, labels), batch_size=4)
